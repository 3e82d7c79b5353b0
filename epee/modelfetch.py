"""Reading a model directory where it is stored: a local path, ``s3://`` or ``gs://``.

Remote directories are copied file by file as their epee_config.json lists them (no bucket
listing); :func:`check_model_weights` reads the weights once to check them without loading them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from .modeling import EPEE_CONFIG_NAME
from .weights import WEIGHTS_NAME, check_weights_stream

log = logging.getLogger(__name__)


def is_remote(uri: str | os.PathLike) -> bool:
    """``s3://``, ``gs://`` and the like: fetched through smart-open; local paths and ``file://`` are read in place."""
    uri = str(uri)
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    """A local directory's path (``file://`` removed)."""
    return Path(str(uri).removeprefix("file://"))


def transport_params(uri: str, s3_client_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
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


def fetch_remote(uri: str, target: Path, skip: Callable[[str], bool] = lambda name: False,
                 s3_client_kwargs: Mapping[str, Any] | None = None, only: tuple[str, ...] | None = None) -> bytes:
    """Copy a remote model directory file by file, as listed in its epee_config.json, into
    ``target``; files for which ``skip(name)`` holds are left out. With ``only``, just those files are copied
    (epee_config.json is then not read again). Returns epee_config.json's bytes (empty with ``only``)."""
    from smart_open import open as smart_open

    base = uri.rstrip("/")
    params = transport_params(uri, s3_client_kwargs)
    raw = b""
    if only is None:
        with smart_open(f"{base}/{EPEE_CONFIG_NAME}", "rb", transport_params=params) as fh:
            raw = fh.read()
        (target / EPEE_CONFIG_NAME).write_bytes(raw)
    for name in json.loads(raw).get("files", []) if only is None else only:
        if skip(name):
            continue
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"model directory lists an unsafe file name: {name!r}")
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with smart_open(f"{base}/{name}", "rb", transport_params=params) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return raw


@contextlib.contextmanager
def open_model_file(uri: str, name: str, s3_client_kwargs: Mapping[str, Any] | None = None) -> Iterator[BinaryIO]:
    """One file of a model directory, opened for reading as the loader reaches it: a local path
    directly, ``s3://`` / ``gs://`` through smart-open with the loader's client arguments."""
    uri = str(uri)
    if is_remote(uri):
        from smart_open import open as smart_open

        with smart_open(f"{uri.rstrip('/')}/{name}", "rb", transport_params=transport_params(uri, s3_client_kwargs)) as fh:
            yield fh
    else:
        with open(local_path(uri) / name, "rb") as fh:
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
