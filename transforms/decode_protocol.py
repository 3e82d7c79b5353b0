"""What the DICOM decoder child runs, and the wire between it and its parent.

:func:`decode_bytes` decodes one file held in memory and turns every failure into a
:class:`DecodeOutcome` (never an exception); the child routes pydicom's logging and warnings
itself (they can quote tag values) and only counts them. :func:`_serve` is the child's entry
point: it receives a batch of files per message, writes the index and start time of the file it
is on into a small shared mapping (:data:`_PROGRESS`, read by the parent's timeout), and answers
with the batch's outcomes in parts of about :data:`PART_BYTES` of pixels, each large image as raw
bytes after its pickled outcome (:func:`_send_part`, :func:`_receive_part`). The process pool
that starts, watches and replaces children is :mod:`transforms.decode_worker`.

This module imports only the standard library and numpy (pydicom through :mod:`epee.images`
when a file is decoded): it is what the child imports.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import struct
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # imported where it is used: the parent of the child never needs pydicom
    from epee.images import DicomLimits

@dataclass
class DecodeOutcome:
    """What decoding one file gave: pixels, or a reason and a message written by our code."""

    pixels: Any = None
    reason: str | None = None
    message: str | None = None
    warnings: int = 0


def decode_bytes(data: bytes, frame_policy: str, limits: DicomLimits | int) -> DecodeOutcome:
    """Decode one DICOM file held in memory; every failure becomes an outcome, never an exception.

    ``limits``: an :class:`epee.images.DicomLimits` (pixel budget, limit on inflated data), or an
    int, the pixel budget alone (the limit on inflated data is then its default)."""
    from epee.images import DicomLimits, DicomRejected, DicomUnsupported, read_dicom

    if not isinstance(limits, DicomLimits):
        limits = DicomLimits(max_pixel_bytes=limits)
    route_pydicom_logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pixels = read_dicom(data, frame_policy=frame_policy, limits=limits)
        except (DicomRejected, DicomUnsupported) as exc:
            return DecodeOutcome(reason=exc.reason, message=exc.message, warnings=len(caught))
        except MemoryError:
            return DecodeOutcome(reason="out_of_memory", message="decoding ran out of memory", warnings=len(caught))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - one file must never stop the job (a Rust plugin's
            # PanicException is a BaseException); the exception's text may quote values: its type only
            return decode_failure(exc, len(caught))
    return DecodeOutcome(pixels=pixels, warnings=len(caught))


def decode_failure(exc: BaseException, warnings_seen: int = 0) -> DecodeOutcome:
    """The outcome of a decode that raised something unforeseen: ``decode_error``, by its type
    (``out_of_memory`` for a MemoryError)."""
    from epee.errors import describe

    if isinstance(exc, MemoryError):
        return DecodeOutcome(reason="out_of_memory", message="decoding ran out of memory", warnings=warnings_seen)
    return DecodeOutcome(reason="decode_error", message=describe(exc, "unexpected failure while decoding"),
                         warnings=warnings_seen)


class _CountingHandler(logging.Handler):
    """Swallows pydicom's log records (they can quote tag values) and counts them."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


_PYDICOM_SINK = _CountingHandler()


def route_pydicom_logs() -> None:
    """Route the whole ``pydicom`` logger tree (its decoders log ERROR records with tracebacks)
    into a counting sink instead of the process's log handlers. Idempotent; stays in force for
    the worker, since toggling global logger state per file would race between threads."""
    logger = logging.getLogger("pydicom")
    if _PYDICOM_SINK not in logger.handlers:
        logger.addHandler(_PYDICOM_SINK)
    logger.propagate = False


def _resolve(path: str) -> Callable[..., DecodeOutcome]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# the shared progress record: (start time on the monotonic clock, index of the file in the batch; -1: none)
_PROGRESS = struct.Struct("<dq")
# the child sends the outcomes it holds once their pixels reach this size, so that a batch of large
# images is not held whole in the child (nor arrives whole in the parent)
PART_BYTES = 8 << 20
# decoded images at least this large travel as raw bytes next to their outcome (see _send_part)
RAW_BYTES = 256 << 10


@dataclass(frozen=True)
class _RawPixels:
    """Stands in an outcome for pixels that follow it on the pipe as raw bytes."""

    shape: tuple[int, ...]
    dtype: str


def _send_part(conn: Connection, outcomes: list[DecodeOutcome]) -> None:
    """Outcomes in one pickled message, each large image after it as a raw message of its own.

    Pickling and unpickling copy an array on top of the pipe's own copies (measured in
    docs/analyses.md, "Pipelined DICOM decoding"); written as raw bytes, its buffer goes to the
    pipe as it is and :func:`_receive_part` reads it straight into a new array."""
    raw = []
    for outcome in outcomes:
        pixels = outcome.pixels
        if isinstance(pixels, np.ndarray) and pixels.nbytes >= RAW_BYTES:
            raw.append(np.ascontiguousarray(pixels))
            outcome.pixels = _RawPixels(pixels.shape, pixels.dtype.str)
    conn.send(outcomes)
    for pixels in raw:
        conn.send_bytes(pixels.reshape(-1).view(np.uint8))  # any dtype, either byte order


def _receive_part(conn: Connection) -> list[DecodeOutcome]:
    """What :func:`_send_part` sent, with its images back in place."""
    outcomes = conn.recv()
    if not isinstance(outcomes, list) or not outcomes:
        raise TypeError("the decoder process answered out of step")
    for outcome in outcomes:
        if isinstance(outcome.pixels, _RawPixels):
            pixels = np.empty(outcome.pixels.shape, np.dtype(outcome.pixels.dtype))
            if conn.recv_bytes_into(pixels.reshape(-1).view(np.uint8)) != pixels.nbytes:
                raise TypeError("the decoder process answered out of step")
            outcome.pixels = pixels
    return outcomes


def _set_progress(progress: mmap.mmap, index: int, started: float) -> None:
    _PROGRESS.pack_into(progress, 0, started, index)


def _child_main(conn: Connection, progress: mmap.mmap, decode_path: str) -> None:  # pragma: no cover - runs in the child
    logging.getLogger().handlers[:] = [logging.NullHandler()]  # the child never writes logs anywhere
    decode = _resolve(decode_path)
    importlib.import_module("epee.images")  # the imports happen before "ready", not on a file's clock
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        part_bytes, jobs = message
        outcomes, held = [], 0
        for i, job in enumerate(jobs):
            _set_progress(progress, i, time.monotonic())
            try:
                outcomes.append(decode(*job))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - a decode function that raises costs its file only
                outcomes.append(decode_failure(exc))
            held += getattr(outcomes[-1].pixels, "nbytes", 0)
            if held >= part_bytes and i < len(jobs) - 1:  # large images leave as they come, not all at the end
                _send_part(conn, outcomes)
                outcomes, held = [], 0
        _set_progress(progress, -1, 0.0)
        _send_part(conn, outcomes)


def _serve(fd: int, progress_fd: int, decode_path: str) -> None:  # pragma: no cover - the child's entry point
    _child_main(Connection(fd), mmap.mmap(progress_fd, _PROGRESS.size), decode_path)
