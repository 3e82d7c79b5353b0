"""The model directory: everything needed to run a trained early-exit model, and nothing pickled.

Layout (all files listed in ``epee_config.json["files"]`` so a remote copy can be fetched file by
file from ``s3://`` or ``gs://`` without listing a bucket)::

    config.json            the backbone's transformers config
    epee_config.json       {"model": task, labels, exit policy (calibrated values),
                            "backbone": family, "preprocessing": tokenizer or image settings,
                            "calibration": {...}, "training": {...}, "files": [...]}
    model.safetensors      backbone + exit-head weights
    tokenizer.json, ...    text models: the tokenizer, saved by transformers

A directory whose weights are a pickle file instead (``pytorch_model.bin``, ``model.pt``, ...) is
refused unless the caller passes ``allow_pickle=True``; :func:`convert_pickle_weights` turns it
into a safetensors directory once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .config import ExitPolicyConfig
from .encoding import ImagePreprocessor, TextPreprocessor, TextSettings
from .modeling import EPEE_CONFIG_NAME, EarlyExitModel
from .weights import (
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_NAMES,
    WEIGHTS_NAME,
    PickleWeightsRefused,
    is_pickle_weights,
    weights_path,
)

log = logging.getLogger(__name__)


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
    sections["model_id"] = f"{out.name}@{weights_digest(out)[:12]}"
    _write_sections(out, model, sections)


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
    model_id = f"{previous.split('@')[0] or out.name}@{weights_digest(out)[:12]}"
    update_model_dir(out, model_id=model_id)
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
    doc = json.loads((directory / EPEE_CONFIG_NAME).read_text())
    model = EarlyExitModel.from_pretrained(directory, device=device, allow_pickle=allow_pickle)
    prep = doc.get("preprocessing", {})
    if prep.get("input") == "image":
        from .images import ImageSettings

        preprocessor: TextPreprocessor | ImagePreprocessor = ImagePreprocessor(
            model.config.label_names, ImageSettings.from_dict(prep["image"])
        )
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        preprocessor = TextPreprocessor(
            tokenizer, prep.get("data_task", model.config.task), model.config.label_names,
            TextSettings.from_dict(prep.get("text", {})), num_prompts=model.config.num_prompts,
        )
        if model.config.num_prompts and preprocessor.prompt_position != model.config.prompt_position:
            raise ValueError(f"model directory {directory}: the tokenizer puts prompts at position "
                             f"{preprocessor.prompt_position}, the model expects {model.config.prompt_position}")
    sections = {k: v for k, v in doc.items() if k not in ("model", "files")}
    return ModelBundle(model=model, preprocessor=preprocessor, data_task=prep.get("data_task", model.config.task),
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
    doc = json.loads((directory / EPEE_CONFIG_NAME).read_text())
    labels = tuple(doc["model"]["label_names"])
    prep = doc.get("preprocessing", {})
    if prep.get("input") == "image":
        from .images import ImageSettings

        return ImagePreprocessor(labels, ImageSettings.from_dict(prep["image"])), "image"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    task = prep.get("data_task", doc["model"]["task"])
    return TextPreprocessor(tokenizer, task, labels, TextSettings.from_dict(prep.get("text", {})),
                            num_prompts=int(doc["model"].get("num_prompts", 0))), task
