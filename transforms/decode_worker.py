"""DICOM decoding in a child process, so that a decode that hangs or crashes costs one file.

A pixel decoder can loop forever on a hostile stream, or take the process down with it (a
segfault in a C plugin, the kernel's OOM killer). Python cannot interrupt a thread stuck in C, so
:class:`IsolatedDecoder` keeps one long-lived child process per DoFn instance and sends it one
file at a time over a pipe. When a file takes longer than the timeout the child is killed and a
new one is started for the next file; when the child dies, the file is reported as a crash. The
child routes pydicom's logging and warnings itself (they can quote tag values), and only counts
them.

The child is a fresh interpreter (``python -c``, talking over a socket pair), not a
``multiprocessing`` child: ``spawn`` re-imports the parent's main module (the whole pipeline with
Beam, torch and transformers: 3-4 s per start, measured) and ``fork`` copies torch threads and
Beam state. The child imports only pydicom, numpy and Pillow, and its stdout and stderr go to
/dev/null.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class DecodeOutcome:
    """What decoding one file gave: pixels, or a reason and a message written by our code."""

    pixels: Any = None
    reason: str | None = None
    message: str | None = None
    warnings: int = 0


def decode_bytes(data: bytes, frame_policy: str, max_pixel_bytes: int) -> DecodeOutcome:
    """Decode one DICOM file held in memory; every failure becomes an outcome, never an exception."""
    import io

    from epee.images import DicomLimits, DicomRejected, DicomUnsupported, read_dicom

    route_pydicom_logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pixels = read_dicom(io.BytesIO(data), frame_policy=frame_policy, limits=DicomLimits(max_pixel_bytes))
        except (DicomRejected, DicomUnsupported) as exc:
            return DecodeOutcome(reason=exc.reason, message=str(exc), warnings=len(caught))
        except MemoryError:
            return DecodeOutcome(reason="out_of_memory", message="decoding ran out of memory", warnings=len(caught))
        except Exception as exc:  # noqa: BLE001 - one file must never stop the job; the text may quote values
            return DecodeOutcome(reason="decode_error", message=f"unexpected {type(exc).__name__} while decoding",
                                 warnings=len(caught))
    return DecodeOutcome(pixels=pixels, warnings=len(caught))


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


def _child_main(conn, decode_path: str) -> None:  # pragma: no cover - runs in the child process
    logging.getLogger().handlers[:] = [logging.NullHandler()]  # the child never writes logs anywhere
    decode = _resolve(decode_path)
    importlib.import_module("epee.images")  # the imports happen before "ready", not on a file's clock
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(decode(*job))


def _serve(fd: int, decode_path: str) -> None:  # pragma: no cover - the child's entry point
    _child_main(Connection(fd), decode_path)


def _child_env() -> dict[str, str]:
    """The parent's environment, with its import path so the child finds the same modules."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class IsolatedDecoder:
    """Decode files in a child process with a per-file timeout.

    ``decode_path`` names the decode function as ``"module:function"`` (importable in the child);
    tests pass their own to simulate a hang or a crash.
    """

    STARTUP_TIMEOUT_S = 300.0

    def __init__(self, timeout_s: float, decode_path: str = "transforms.decode_worker:decode_bytes") -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s!r}) must be > 0")
        self.timeout_s, self.decode_path = timeout_s, decode_path
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = socket.socketpair()
        try:
            code = f"from transforms.decode_worker import _serve; _serve({child.fileno()}, {self.decode_path!r})"
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(),),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, env=_child_env(), close_fds=True)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        # start-up (imports) is not on a file's clock; a child that cannot start is a crash
        if not self._conn.poll(self.STARTUP_TIMEOUT_S) or self._conn.recv() != "ready":
            raise OSError("the decoder process did not start")

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self.restarts += 1

    def decode(self, data: bytes, frame_policy: str, max_pixel_bytes: int) -> DecodeOutcome:
        try:
            if not self._alive():
                if self._conn is not None:
                    self._kill()  # the child died between files
                self._start()
            self._conn.send((data, frame_policy, max_pixel_bytes))
            if self._conn.poll(self.timeout_s):
                return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            self._kill()
            return DecodeOutcome(reason="decoder_crashed",
                                 message="the decoder process died while decoding this file (crash or out of memory)")
        self._kill()
        return DecodeOutcome(reason="decode_timeout",
                             message=f"decoding took longer than the {self.timeout_s:g} s per-file timeout; stopped")

    def close(self) -> None:
        if self._alive():
            try:
                self._conn.send(None)
                self._proc.wait(2)
            except (OSError, BrokenPipeError, subprocess.TimeoutExpired):
                pass
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(2)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
