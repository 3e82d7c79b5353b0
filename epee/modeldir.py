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
:func:`validate_config`, which the pipelines also run before a job starts: epee/modelconfig.py);
``weights`` records the SHA-256 of the weights file when the directory is saved, which the
pipelines verify (:func:`check_model_weights`, epee/modelfetch.py).

A :class:`ModelDir` is one directory opened once: its checked epee_config.json, a local copy of a
remote one (fetched file by file, the weights only when a model is loaded), and the data task it
serves. :func:`load_model_dir` and :func:`load_preprocessor` open one each call;
``shared=True`` reuses one per process (:func:`shared_model_dir`), so a worker's preparation step
and its model handler fetch the directory once between them.

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
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import ExitPolicyConfig
from .encoding import ImagePreprocessor, TextPreprocessor
from .modelconfig import (  # noqa: F401 - public names of epee.modeldir
    DATA_TASKS,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    ConfigField,
    backbone_num_layers,
    preprocessing_settings,
    read_config,
    validate_config,
)
from .modelfetch import (  # noqa: F401 - public names of epee.modeldir
    WeightsCheck,
    check_model_weights,
    fetch_remote,
    is_remote,
    local_path,
    open_model_file,
)
from .modeling import EPEE_CONFIG_NAME, EarlyExitModel
from .weights import PICKLE_SUFFIXES, WEIGHTS_NAME, PickleWeightsRefused, is_pickle_weights, weights_path

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



def _is_weights_file(name: str) -> bool:
    """A file only a model load needs (fetched then, not for a preprocessor): the weights, top-level."""
    return "/" not in name and (name == WEIGHTS_NAME or Path(name).suffix in PICKLE_SUFFIXES)


class ModelDir:
    """One model directory, opened once: its epee_config.json (checked), where its files are, and
    what it serves.

    A local directory is read in place. A remote one (``s3://``, ``gs://``) is copied file by file
    into a temporary directory that lives as long as this object: everything but the weights when
    it is opened, the weights on the first :meth:`load_model`. ``storage_options`` are the boto3
    S3 client arguments for ``s3://`` (endpoint, credentials); unset ones come from the ``AWS_*``
    environment."""

    def __init__(self, uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self._lock = threading.Lock()
        if is_remote(self.uri):
            tmp = tempfile.mkdtemp(prefix="epee-model-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
            self.local = Path(tmp)
            fetch_remote(self.uri, self.local, s3_client_kwargs=self.storage_options, skip=_is_weights_file)
            self._weights_fetched = False
        else:
            self.local = local_path(self.uri)
            if not (self.local / EPEE_CONFIG_NAME).is_file():
                d = self.local
                pickles = [p.name for p in d.glob("*") if p.suffix in PICKLE_SUFFIXES] if d.is_dir() else []
                hint = f"; found pickle checkpoint(s) {pickles}, which are never loaded" if pickles else ""
                raise FileNotFoundError(f"{d} is not an epee model directory (no {EPEE_CONFIG_NAME}){hint}")
            self._weights_fetched = True
        self.doc = read_config(self.local)  # validated: what the loader needs is there
        prep = self.doc["preprocessing"]
        self.data_task: str = prep["data_task"]  # "sequence", "relation", "token" or "image"
        self.settings = preprocessing_settings(prep)
        # what a bundle records besides the model: calibration, sparsity, model_id, weights, ...
        self.sections = {k: v for k, v in self.doc.items() if k not in ("model", "files")}

    @property
    def model_id(self) -> str:
        return str(self.sections.get("model_id", ""))

    def preprocessor(self) -> TextPreprocessor | ImagePreprocessor:
        """A new preprocessor from the directory's tokenizer or image settings (no weights read).

        A new one per caller: a fast tokenizer is not safe to share between threads that encode at
        once, and each DoFn instance of a worker may run on its own thread."""
        labels = tuple(self.doc["model"]["label_names"])
        if self.doc["preprocessing"]["input"] == "image":
            return ImagePreprocessor(labels, self.settings)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.local), local_files_only=True)
        return TextPreprocessor(tokenizer, self.data_task, labels, self.settings,
                                num_prompts=self.doc["model"]["num_prompts"])

    def load_model(self, device: str = "cpu", allow_pickle: bool = False) -> EarlyExitModel:
        """A new model from the directory's weights (model.safetensors; pickle weights only with
        ``allow_pickle``, through PyTorch's restricted unpickler: see
        :meth:`EarlyExitModel.from_pretrained`)."""
        with self._lock:  # the first load of a remote directory fetches its weights, once
            if not self._weights_fetched:
                names = tuple(n for n in self.doc.get("files", []) if _is_weights_file(n))
                fetch_remote(self.uri, self.local, s3_client_kwargs=self.storage_options, only=names)
                self._weights_fetched = True
        try:
            return EarlyExitModel.from_pretrained(self.local, device=device, allow_pickle=allow_pickle)
        except PickleWeightsRefused as exc:  # name the URI, not the temporary copy
            if self.local == local_path(self.uri):
                raise
            raise PickleWeightsRefused(str(exc).replace(str(self.local), self.uri.rstrip("/"))) from None

    def bundle(self, device: str = "cpu", allow_pickle: bool = False) -> ModelBundle:
        """The model, its matching preprocessor and the recorded sections."""
        model = self.load_model(device, allow_pickle)
        preprocessor = self.preprocessor()
        if (isinstance(preprocessor, TextPreprocessor) and model.config.num_prompts
                and preprocessor.prompt_position != model.config.prompt_position):
            raise ValueError(f"model directory {self.local}: the tokenizer puts prompts at position "
                             f"{preprocessor.prompt_position}, the model expects {model.config.prompt_position}")
        return ModelBundle(model=model, preprocessor=preprocessor, data_task=self.data_task,
                           sections=dict(self.sections), uri=self.uri)


_SHARED: dict[tuple, ModelDir] = {}
_SHARED_LOCK = threading.Lock()


def shared_model_dir(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> ModelDir:
    """This process's :class:`ModelDir` for ``uri``, opened on first use and kept for the process:
    a worker's preparation step and its model handler share one fetch. Keyed by the URI, the
    storage options and the SHA-256 of epee_config.json as read now, so a directory saved again
    under the same URI is opened anew (only that small file is read to tell)."""
    uri = str(uri)
    options = dict(storage_options or {})
    with open_model_file(uri, EPEE_CONFIG_NAME, options) as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    key = (uri, tuple(sorted((k, repr(v)) for k, v in options.items())), digest)
    with _SHARED_LOCK:
        opened = _SHARED.get(key)
        if opened is None:
            opened = _SHARED[key] = ModelDir(uri, options)
        return opened


def load_model_dir(uri: str | os.PathLike, device: str = "cpu", s3_client_kwargs: dict[str, Any] | None = None,
                   allow_pickle: bool = False, shared: bool = False) -> ModelBundle:
    """Load a model directory from a local path or an ``s3://`` / ``gs://`` URI; no network
    beyond that storage. ``s3_client_kwargs``: boto3 S3 client arguments
    (endpoint, credentials) for ``s3://``; unset ones come from the ``AWS_*`` environment.
    ``shared``: through this process's :func:`shared_model_dir`.

    Weights come from model.safetensors. A directory with only pickle weights raises
    :class:`~epee.modeling.PickleWeightsRefused` unless ``allow_pickle=True``, which loads them
    through PyTorch's restricted unpickler (no code in the file is executed; see
    :meth:`EarlyExitModel.from_pretrained`)."""
    opened = shared_model_dir(uri, s3_client_kwargs) if shared else ModelDir(uri, s3_client_kwargs)
    return opened.bundle(device, allow_pickle)


def load_preprocessor(uri: str | os.PathLike, s3_client_kwargs: dict[str, Any] | None = None, shared: bool = False,
                      ) -> tuple[TextPreprocessor | ImagePreprocessor, str]:
    """Only the preprocessor of a model directory (tokenizer or image settings), no weights:
    what a preparation step needs on every worker. Returns (preprocessor, data task)."""
    opened = shared_model_dir(uri, s3_client_kwargs) if shared else ModelDir(uri, s3_client_kwargs)
    return opened.preprocessor(), opened.data_task
