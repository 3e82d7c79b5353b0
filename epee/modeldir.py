"""The model directory: everything needed to run a trained early-exit model, and nothing pickled.

Layout (all files listed in ``epee_config.json["files"]`` so a remote copy can be fetched file by
file from ``s3://`` or ``gs://`` without listing a bucket)::

    config.json            the backbone's transformers config
    epee_config.json       {"model": task, labels, exit policy (calibrated values),
                            "backbone": family, "preprocessing": tokenizer or image settings,
                            "calibration": {...}, "training": {...}, "files": [...],
                            "weights": {"file": "model.safetensors", "sha256": ...}}
    model.safetensors      backbone + exit-head weights
    tokenizer.json, ...    text models: the tokenizer, saved by transformers

Every entry the loader reads is required (:data:`REQUIRED_FIELDS`, checked by
:func:`validate_config`, which the pipelines also run before a job starts); ``weights`` records the
SHA-256 of the weights file when the directory is saved, which the pipelines verify.

A directory whose weights are a pickle file instead (``pytorch_model.bin``, ``model.pt``, ...) is
refused unless the caller passes ``allow_pickle=True``; :func:`convert_pickle_weights` turns it
into a safetensors directory once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

from .config import HEAD_INPUTS, POLICY_KINDS, POOLINGS, TASKS, EarlyExitConfig, ExitPolicyConfig
from .encoding import ImagePreprocessor, TextPreprocessor, TextSettings
from .modeling import EPEE_CONFIG_NAME, EarlyExitModel
from .weights import (
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_NAMES,
    WEIGHTS_NAME,
    PickleWeightsRefused,
    check_weights_stream,
    is_pickle_weights,
    weights_path,
)

if TYPE_CHECKING:  # images.py imports pydicom; text-only processes never need it
    from .images import ImageSettings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# What epee_config.json must hold: one list, read by the loader and by the pipelines' start-up check
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigField:
    """One entry of epee_config.json, by its dotted path (``model.policy.patience``): what it must
    be, in our words, and the check; ``applies`` narrows it to text or image model directories."""

    path: str
    expected: str
    ok: Callable[[Any], bool]
    applies: Callable[[dict], bool] = lambda doc: True


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(choices: tuple) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _text(doc: dict) -> bool:
    return doc["preprocessing"]["input"] == "text"


def _image(doc: dict) -> bool:
    return doc["preprocessing"]["input"] == "image"


def _channels(v: Any) -> bool:
    from .images import CHANNEL_COUNTS

    return isinstance(v, int) and not isinstance(v, bool) and v in CHANNEL_COUNTS


def _frame_policy(v: Any) -> bool:
    from .images import FRAME_POLICIES

    return isinstance(v, str) and v in FRAME_POLICIES


_OBJECT = "a JSON object"
DATA_TASKS = (*TASKS, "image")  # preprocessing.data_task: an image model's exit heads run task "sequence"

# Every entry the loader reads, in the order they are checked (a section before its fields). All are
# written by save_model_dir; a missing one is refused rather than defaulted, because a default
# (max_length 256, the uncalibrated exit policy, [CLS] pooling) would run a different model silently.
REQUIRED_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("model", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("model.task", f"one of {', '.join(TASKS)}", _one_of(TASKS)),
    ConfigField("model.label_names", "a list of at least 2 distinct label names (strings)",
                lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(n, str) for n in v)
                and len(set(v)) == len(v)),
    ConfigField("model.policy", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("model.policy.kind", f"one of {', '.join(POLICY_KINDS)}", _one_of(POLICY_KINDS)),
    ConfigField("model.policy.entropy_threshold", "a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    ConfigField("model.policy.patience", "an integer >= 1", _int_at_least(1)),
    ConfigField("model.policy.min_exit_layer", "an integer >= 1", _int_at_least(1)),
    ConfigField("model.pooling", f"one of {', '.join(POOLINGS)}", _one_of(POOLINGS)),
    ConfigField("model.num_prompts", "an integer >= 0", _int_at_least(0)),
    ConfigField("model.prompt_position", "an integer >= 0", _int_at_least(0)),
    ConfigField("model.head_input", f"one of {', '.join(HEAD_INPUTS)}", _one_of(HEAD_INPUTS)),
    ConfigField("preprocessing", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("preprocessing.input", "text or image", _one_of(("text", "image"))),
    ConfigField("preprocessing.data_task", f"one of {', '.join(DATA_TASKS)}", _one_of(DATA_TASKS)),
    ConfigField("preprocessing.text", _OBJECT, lambda v: isinstance(v, dict), _text),
    ConfigField("preprocessing.text.max_length", "an integer >= 8", _int_at_least(8), _text),
    ConfigField("preprocessing.text.relation_markers", "a list of 4 non-blank strings",
                lambda v: isinstance(v, list) and len(v) == 4 and all(isinstance(m, str) and m.strip() for m in v),
                _text),
    ConfigField("preprocessing.image", _OBJECT, lambda v: isinstance(v, dict), _image),
    ConfigField("preprocessing.image.image_size", "an integer >= 1", _int_at_least(1), _image),
    ConfigField("preprocessing.image.num_channels", "1 (grey) or 3 (RGB)", _channels, _image),
    ConfigField("preprocessing.image.mean", "a list of finite numbers, one per channel",
                lambda v: isinstance(v, list) and bool(v) and all(_number(x) for x in v), _image),
    ConfigField("preprocessing.image.std", "a list of numbers > 0, one per channel",
                lambda v: isinstance(v, list) and bool(v) and all(_number(x) and x > 0 for x in v), _image),
    ConfigField("preprocessing.image.frame_policy", "middle or all", _frame_policy, _image),
    ConfigField("files", "a list of the directory's relative file names",
                lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
)

# Checked only where present: they do not change what a loaded model predicts (head_dropout acts in
# training, negative_label in scoring) or were recorded later (weights).
OPTIONAL_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("model.head_dropout", "a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    ConfigField("model.negative_label", "null or one of model.label_names", lambda v: v is None or isinstance(v, str)),
    ConfigField("model_id", "a string", lambda v: isinstance(v, str)),
    ConfigField("weights", _OBJECT, lambda v: isinstance(v, dict)),
    ConfigField("weights.file", "a file name of the directory", lambda v: isinstance(v, str) and bool(v)),
    ConfigField("weights.sha256", "64 hexadecimal digits",
                lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v)),
)

_MISSING = object()


def _lookup(doc: dict, path: str) -> Any:
    node: Any = doc
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _missing_message(path: str) -> str:
    if path == "preprocessing":
        return (f"{EPEE_CONFIG_NAME} has no preprocessing section: the tokenizer or image settings the model was "
                "trained with are unknown, and running with default settings would silently differ from them; "
                "save the directory again with `epee train` (or epee.modeldir.save_model_dir)")
    return f"{EPEE_CONFIG_NAME} has no {path}, which the loader needs; save the directory again with `epee train`"


def validate_config(doc: Any) -> None:
    """Refuse an epee_config.json the loader could not use as written: a missing entry of
    :data:`REQUIRED_FIELDS`, an entry of the wrong type or value, or sections that disagree.

    Pure (the document only, no files): the loader and the pipelines' start-up check both call it,
    so what is refused before a job starts is exactly what a worker would fail on. Raises
    ``ValueError`` naming the field; the message never quotes the document's values."""
    if not isinstance(doc, dict):
        raise ValueError(f"{EPEE_CONFIG_NAME} is not a JSON object")
    for spec, required in [(f, True) for f in REQUIRED_FIELDS] + [(f, False) for f in OPTIONAL_FIELDS]:
        if not spec.applies(doc):
            continue
        value = _lookup(doc, spec.path)
        if value is _MISSING:
            if required:
                raise ValueError(_missing_message(spec.path))
            continue
        if not spec.ok(value):
            raise ValueError(f"{EPEE_CONFIG_NAME}: {spec.path} must be {spec.expected}")
    model, prep = doc["model"], doc["preprocessing"]
    if model.get("negative_label") is not None and model["negative_label"] not in model["label_names"]:
        raise ValueError(f"{EPEE_CONFIG_NAME}: model.negative_label must be one of model.label_names")
    if _image(doc) != (prep["data_task"] == "image"):
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.data_task must be image exactly when preprocessing.input is")
    if ("sequence" if _image(doc) else prep["data_task"]) != model["task"]:  # an image model's heads classify
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.data_task disagrees with model.task")
    if _image(doc) and not len(prep["image"]["mean"]) == len(prep["image"]["std"]) == prep["image"]["num_channels"]:
        raise ValueError(f"{EPEE_CONFIG_NAME}: preprocessing.image.mean and .std need one value per channel")
    # the frozen configs' own rules as well (unknown keys among them), in case they grow ahead of the list
    for section, build in (("model", lambda: EarlyExitConfig.from_dict(model)), ("preprocessing", lambda: _settings(prep))):
        try:
            build()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{EPEE_CONFIG_NAME}: its {section} section is not valid ({type(exc).__name__}: "
                             "unknown keys or values out of range)") from None


def _settings(prep: dict) -> TextSettings | ImageSettings:
    """The preprocessing settings of a validated ``preprocessing`` section (text or image)."""
    if prep["input"] == "image":
        from .images import ImageSettings

        return ImageSettings.from_dict(prep["image"])
    return TextSettings.from_dict(prep["text"])


def backbone_num_layers(config: Any) -> int:
    """The number of transformer layers in a backbone's config.json (BERT, ALBERT and ViT name it
    num_hidden_layers, GPT-2 n_layer); ``ValueError`` naming the field where it is missing."""
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError("config.json has no model_type (not a transformers backbone config)")
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if not _int_at_least(1)(layers):
        raise ValueError("config.json has no num_hidden_layers (or n_layer) that is an integer >= 1")
    return layers


@dataclass
class ModelBundle:
    """A loaded model directory: model, matching preprocessor and the recorded sections."""

    model: EarlyExitModel
    preprocessor: TextPreprocessor | ImagePreprocessor
    data_task: str  # "sequence", "relation", "token" or "image"
    sections: dict[str, Any] = field(default_factory=dict)
    uri: str = ""

    @property
    def model_id(self) -> str:
        return str(self.sections.get("model_id", ""))


def _file_list(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*")
        if p.is_file() and p.name != EPEE_CONFIG_NAME and "checkpoint" not in p.relative_to(directory).parts
    )


def weights_digest(directory: str | os.PathLike) -> str:
    """sha256 of the weights file the directory's model loads from (model.safetensors, else its
    pickle weights file); the model_id is ``{directory name}@{first 12 hex digits}``."""
    path = weights_path(directory)
    if path is None:
        raise FileNotFoundError(f"model directory {directory} has no {WEIGHTS_NAME}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model_dir(
    directory: str | os.PathLike,
    model: EarlyExitModel,
    preprocessor: TextPreprocessor | ImagePreprocessor,
    sections: dict[str, Any] | None = None,
) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(preprocessor, TextPreprocessor):
        preprocessor.tokenizer.save_pretrained(out)
        prep = {"input": "text", "data_task": preprocessor.task, "text": preprocessor.settings.to_dict()}
    else:
        prep = {"input": "image", "data_task": "image", "image": preprocessor.settings.to_dict()}
    sections = {**(sections or {}), "preprocessing": prep}
    model.save_pretrained(out, sections)
    digest = weights_digest(out)
    sections["model_id"] = f"{out.name}@{digest[:12]}"
    sections["weights"] = weights_record(WEIGHTS_NAME, digest)
    _write_sections(out, model, sections)


def weights_record(name: str, sha256: str) -> dict[str, str]:
    """epee_config.json ``weights``: the file the model loads from and its SHA-256, which the
    pipelines verify before a job starts (a changed or damaged byte is refused, not run)."""
    return {"file": name, "sha256": sha256}


def _write_sections(out: Path, model: EarlyExitModel, sections: dict[str, Any]) -> None:
    doc = json.loads((out / EPEE_CONFIG_NAME).read_text())
    doc.update(sections)
    doc["model"] = model.config.to_dict()
    doc["files"] = _file_list(out)
    tmp = out / (EPEE_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / EPEE_CONFIG_NAME)


def update_model_dir(directory: str | os.PathLike, policy: ExitPolicyConfig | None = None, **sections: Any) -> None:
    """Rewrite epee_config.json with a new exit policy and/or sections (weights untouched)."""
    out = Path(directory)
    doc = json.loads((out / EPEE_CONFIG_NAME).read_text())
    if policy is not None:
        doc["model"]["policy"] = policy.to_dict()
    doc.update(sections)
    doc["files"] = _file_list(out)
    tmp = out / (EPEE_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out / EPEE_CONFIG_NAME)


def convert_pickle_weights(directory: str | os.PathLike) -> dict[str, str]:
    """Replace a local model directory's pickle weights by ``model.safetensors``, once, where the
    file is trusted.

    The pickle is read as ``allow_pickle=True`` reads it (PyTorch's restricted unpickler, so no
    code in it runs) and loaded strictly into the model, so every tensor must fit; then
    ``model.safetensors`` is written, the pickle file removed, and ``files`` and ``model_id`` in
    epee_config.json updated (the id's digest is that of the new file). Returns what changed.
    """
    out = Path(directory)
    if not (out / EPEE_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{out} is not an epee model directory (no {EPEE_CONFIG_NAME})")
    src = weights_path(out)
    if src is None or not is_pickle_weights(src.name):
        raise ValueError(f"{out}: nothing to convert, the weights are " + (src.name if src else "missing"))
    model = EarlyExitModel.from_pretrained(out, allow_pickle=True)
    model.save_weights(out / WEIGHTS_NAME)
    src.unlink()
    previous = str(json.loads((out / EPEE_CONFIG_NAME).read_text()).get("model_id", ""))
    digest = weights_digest(out)
    model_id = f"{previous.split('@')[0] or out.name}@{digest[:12]}"
    update_model_dir(out, model_id=model_id, weights=weights_record(WEIGHTS_NAME, digest))
    log.info("converted %s to %s in %s", src.name, WEIGHTS_NAME, out)
    return {"model": str(out), "removed": src.name, "written": WEIGHTS_NAME, "model_id": model_id,
            "previous_model_id": previous}


def _transport_params(uri: str, s3_client_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """smart-open transport parameters for one directory fetch.

    ``s3://``: one boto3 client for every file of the fetch, from a fresh session (boto3's default
    session is not thread-safe, and a pipeline loads the model and the preprocessor on different
    threads). ``s3_client_kwargs`` are that client's keyword arguments (``endpoint_url``,
    ``aws_access_key_id``, ``aws_secret_access_key``, ``region_name``, ...); ``None`` values are
    dropped, and whatever is not given comes from boto3's own chain: the ``AWS_*`` environment
    variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` included), then ``~/.aws``.
    """
    if not uri.startswith("s3://"):
        return {}
    import boto3
    from botocore.config import Config

    kwargs = {k: v for k, v in (s3_client_kwargs or {}).items() if v is not None}
    kwargs.setdefault("config", Config(retries={"max_attempts": 6, "mode": "adaptive"}))
    return {"client": boto3.session.Session().client("s3", **kwargs)}


def _fetch_remote(uri: str, target: Path, skip: tuple[str, ...] = (),
                  s3_client_kwargs: dict[str, Any] | None = None) -> None:
    """Copy a remote model directory file by file, as listed in its epee_config.json."""
    from smart_open import open as smart_open

    base = uri.rstrip("/")
    params = _transport_params(uri, s3_client_kwargs)
    with smart_open(f"{base}/{EPEE_CONFIG_NAME}", "rb", transport_params=params) as fh:
        raw = fh.read()
    doc = json.loads(raw)
    (target / EPEE_CONFIG_NAME).write_bytes(raw)
    for name in doc.get("files", []):
        if name in skip:
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"model directory lists an unsafe file name: {name!r}")
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with smart_open(f"{base}/{name}", "rb", transport_params=params) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def load_model_dir(uri: str | os.PathLike, device: str = "cpu",
                   s3_client_kwargs: dict[str, Any] | None = None, allow_pickle: bool = False) -> ModelBundle:
    """Load a model directory from a local path or an ``s3://`` / ``gs://`` URI; no network
    beyond that storage. ``s3_client_kwargs``: boto3 S3 client arguments
    (endpoint, credentials) for ``s3://``; unset ones come from the ``AWS_*`` environment.

    Weights come from model.safetensors. A directory with only pickle weights raises
    :class:`~epee.modeling.PickleWeightsRefused` unless ``allow_pickle=True``, which loads them
    through PyTorch's restricted unpickler (no code in the file is executed; see
    :meth:`EarlyExitModel.from_pretrained`)."""
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        with tempfile.TemporaryDirectory(prefix="epee-model-") as tmp:
            _fetch_remote(uri, Path(tmp), s3_client_kwargs=s3_client_kwargs)
            try:
                bundle = _load_local(Path(tmp), device, allow_pickle)
            except PickleWeightsRefused as exc:  # name the URI, not the temporary copy
                raise PickleWeightsRefused(str(exc).replace(tmp, uri.rstrip("/"))) from None
        bundle.uri = uri
        return bundle
    return _load_local(Path(uri.removeprefix("file://")), device, allow_pickle)


def _load_local(directory: Path, device: str, allow_pickle: bool = False) -> ModelBundle:
    if not (directory / EPEE_CONFIG_NAME).is_file():
        pickles = [p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES] if directory.is_dir() else []
        hint = f"; found pickle checkpoint(s) {pickles}, which are never loaded" if pickles else ""
        raise FileNotFoundError(f"{directory} is not an epee model directory (no {EPEE_CONFIG_NAME}){hint}")
    doc = read_config(directory)
    model = EarlyExitModel.from_pretrained(directory, device=device, allow_pickle=allow_pickle)
    prep = doc["preprocessing"]
    if prep["input"] == "image":
        preprocessor: TextPreprocessor | ImagePreprocessor = ImagePreprocessor(model.config.label_names, _settings(prep))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        preprocessor = TextPreprocessor(tokenizer, prep["data_task"], model.config.label_names, _settings(prep),
                                        num_prompts=model.config.num_prompts)
        if model.config.num_prompts and preprocessor.prompt_position != model.config.prompt_position:
            raise ValueError(f"model directory {directory}: the tokenizer puts prompts at position "
                             f"{preprocessor.prompt_position}, the model expects {model.config.prompt_position}")
    sections = {k: v for k, v in doc.items() if k not in ("model", "files")}
    return ModelBundle(model=model, preprocessor=preprocessor, data_task=prep["data_task"],
                       sections=sections, uri=str(directory))


def load_preprocessor(uri: str | os.PathLike, s3_client_kwargs: dict[str, Any] | None = None,
                      ) -> tuple[TextPreprocessor | ImagePreprocessor, str]:
    """Only the preprocessor of a model directory (tokenizer or image settings), no weights:
    what a preparation step needs on every worker. Returns (preprocessor, data task)."""
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        with tempfile.TemporaryDirectory(prefix="epee-prep-") as tmp:
            _fetch_remote(uri, Path(tmp), skip=(WEIGHTS_NAME, *PICKLE_WEIGHTS_NAMES), s3_client_kwargs=s3_client_kwargs)
            return _load_preprocessor_local(Path(tmp))
    return _load_preprocessor_local(Path(uri.removeprefix("file://")))


def _load_preprocessor_local(directory: Path) -> tuple[TextPreprocessor | ImagePreprocessor, str]:
    if not (directory / EPEE_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} is not an epee model directory (no {EPEE_CONFIG_NAME})")
    doc = read_config(directory)
    labels = tuple(doc["model"]["label_names"])
    prep = doc["preprocessing"]
    if prep["input"] == "image":
        return ImagePreprocessor(labels, _settings(prep)), "image"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return TextPreprocessor(tokenizer, prep["data_task"], labels, _settings(prep),
                            num_prompts=doc["model"]["num_prompts"]), prep["data_task"]


def read_config(directory: Path) -> dict:
    """A local model directory's epee_config.json, validated (:func:`validate_config`), and its
    backbone's config.json checked for the layer count (:func:`backbone_num_layers`)."""
    doc = json.loads((directory / EPEE_CONFIG_NAME).read_text())
    validate_config(doc)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model directory {directory} has no config.json")
    backbone_num_layers(json.loads((directory / "config.json").read_text()))
    return doc


@contextlib.contextmanager
def open_model_file(uri: str, name: str, s3_client_kwargs: dict[str, Any] | None = None) -> Iterator[BinaryIO]:
    """One file of a model directory, opened for reading as the loader reaches it: a local path
    directly, ``s3://`` / ``gs://`` through smart-open with the loader's client arguments."""
    uri = str(uri)
    if "://" in uri and not uri.startswith("file://"):
        from smart_open import open as smart_open

        with smart_open(f"{uri.rstrip('/')}/{name}", "rb", transport_params=_transport_params(uri, s3_client_kwargs)) as fh:
            yield fh
    else:
        with open(Path(uri.removeprefix("file://")) / name, "rb") as fh:
            yield fh


@dataclass(frozen=True)
class WeightsCheck:
    """What the start-up check of a model directory's weights found."""

    file: str  # the weights file, relative to the directory
    sha256: str  # its SHA-256, computed while it was checked (the run manifest records it)
    verified: bool  # True: it matched the SHA-256 recorded in epee_config.json


def check_model_weights(uri: str, doc: dict, name: str, s3_client_kwargs: dict[str, Any] | None = None) -> WeightsCheck:
    """Check the weights file ``name`` of the model directory ``uri`` (validated ``doc``) without
    loading it: safetensors structure (:func:`epee.weights.check_weights_stream`), and its bytes
    against ``weights.sha256`` where epee_config.json records it for this file. The file is read
    once, in 1 MiB chunks. Raises :class:`epee.weights.WeightsFileError` or ``OSError``."""
    record = doc.get("weights") or {}
    recorded = record.get("sha256") if record.get("file") == name else None
    if recorded is None:
        log.warning("epee_config.json records no SHA-256 for %s (saved before it was recorded, or its weights were "
                 "replaced): %s", name, "only its header is checked" if name == WEIGHTS_NAME else "it is not checked")
    with open_model_file(uri, name, s3_client_kwargs) as fh:
        sha256 = check_weights_stream(fh, name, recorded)
    return WeightsCheck(file=name, sha256=sha256, verified=recorded is not None)
