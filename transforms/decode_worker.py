"""DICOM decoding in a child process, so that a decode that hangs or crashes costs one file.

A pixel decoder can loop forever on a hostile stream, or take the process down with it (a
segfault in a C plugin, the kernel's OOM killer). Python cannot interrupt a thread stuck in C, so
:class:`IsolatedDecoder` keeps a long-lived child process (:class:`SharedDecoders` gives all the
reading DoFn instances of one worker process one pool of them) and sends it files over a pipe, a
batch per message. What the child runs and how the two talk (the decode function, the progress
record, outcomes with large images as raw bytes) is :mod:`transforms.decode_protocol`. When one
file takes longer than the timeout the child is killed, that file is reported, and the batch's
other files go to a new child; when the child dies, the file it was on is reported as a crash.

A batch per message, not a file: a round trip (two process wake-ups and the parent's thread
taking the GIL back) costs about as much as decoding a small image (docs/analyses.md, "Pipelined
DICOM decoding"). :class:`PipelinedDecoder` feeds the child from a queue on its own thread, so the
DoFn reads the next files and runs inference while the child decodes.

The child is a fresh interpreter (``python -c``, talking over a socket pair), not a
``multiprocessing`` child: ``spawn`` re-imports the parent's main module (the whole pipeline with
Beam, torch and transformers, seconds per start) and ``fork`` copies torch threads and Beam state.
The child imports only pydicom, numpy and Pillow, and its stdout and stderr go to /dev/null.
"""

from __future__ import annotations

import mmap
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Callable

# the protocol's names stay importable from here, where callers have always found them
from .decode_protocol import (  # noqa: F401 - re-exported
    _PROGRESS,
    PART_BYTES,
    RAW_BYTES,
    DecodeOutcome,
    _RawPixels,
    _receive_part,
    _send_part,
    _serve,
    decode_bytes,
    decode_failure,
    route_pydicom_logs,
)

if TYPE_CHECKING:
    from epee.images import DicomLimits

__all__ = [
    "PART_BYTES", "RAW_BYTES", "DecodeOutcome", "IsolatedDecoder", "PipelinedDecoder", "SharedDecoders",
    "decode_bytes", "decode_failure", "route_pydicom_logs",
]


def _child_env() -> dict[str, str]:
    """The parent's environment, with its import path so the child finds the same modules."""
    env = dict(os.environ)
    paths = [p or os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class IsolatedDecoder:
    """Decode files in a child process with a per-file timeout.

    ``decode_path`` names the decode function as ``"module:function"`` (importable in the child);
    tests pass their own to simulate a hang or a crash. Not thread-safe: one thread talks to it.
    """

    STARTUP_TIMEOUT_S = 300.0

    def __init__(self, timeout_s: float, decode_path: str = "transforms.decode_worker:decode_bytes",
                 part_bytes: int = PART_BYTES) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s!r}) must be > 0")
        self.timeout_s, self.decode_path, self.part_bytes = timeout_s, decode_path, part_bytes
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._progress: mmap.mmap | None = None
        self.restarts = 0
        self.batches = 0

    def _start(self) -> None:
        parent, child = socket.socketpair()
        with tempfile.TemporaryFile() as shared:  # unlinked: only the two mappings keep it
            shared.write(_PROGRESS.pack(0.0, -1))
            shared.flush()
            self._progress = mmap.mmap(shared.fileno(), _PROGRESS.size)
            try:
                code = (f"from transforms.decode_protocol import _serve; "
                        f"_serve({child.fileno()}, {shared.fileno()}, {self.decode_path!r})")
                self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child.fileno(), shared.fileno()),
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, env=_child_env(), close_fds=True)
            finally:
                child.close()
        self._conn = Connection(parent.detach())
        # start-up (imports) is not on a file's clock; a child that cannot start is a crash
        if not self._conn.poll(self.STARTUP_TIMEOUT_S) or self._conn.recv() != "ready":
            self._kill()
            raise OSError("the decoder process did not start")

    def start(self) -> None:
        """Start the child if none is running (one that died is replaced)."""
        if not self._alive():
            if self._conn is not None:
                self._kill()
            self._start()

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _running(self) -> tuple[int, float]:
        """(index in the batch of the file the child is decoding, or -1; when it started)."""
        # the child rewrites the record between files: two equal reads in a row are not a torn one
        seen, now = None, _PROGRESS.unpack_from(self._progress)
        while now != seen:
            seen, now = now, _PROGRESS.unpack_from(self._progress)
        started, index = now
        return index, started

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        if self._progress is not None:
            self._progress.close()
        self._proc = self._conn = self._progress = None
        self.restarts += 1

    def decode(self, data: bytes, frame_policy: str, limits: DicomLimits | int) -> DecodeOutcome:
        """``limits``: what :func:`decode_bytes` takes (a ``DicomLimits`` or the pixel budget)."""
        return self.decode_many([(data, frame_policy, limits)])[0]

    def decode_many(self, jobs: list[tuple[bytes, str, DicomLimits | int]],
                    on_outcome: Callable[[int, DecodeOutcome], None] | None = None) -> list[DecodeOutcome]:
        """One outcome per ``(data, frame_policy, limits)``, in order; ``on_outcome(i,
        outcome)`` is called for each as it arrives. The jobs go to the child as one batch. A file
        that hangs or kills the child gets its outcome, and the files of the batch not answered
        yet go to a new child. Where the child died before it named a file (e.g. out of memory
        reading the batch), those files are retried one per message, so the file at fault is the
        only one that pays."""
        outcomes: list[DecodeOutcome | None] = [None] * len(jobs)

        def deliver(i: int, outcome: DecodeOutcome) -> None:
            outcomes[i] = outcome
            if on_outcome is not None:
                on_outcome(i, outcome)

        todo, single = list(range(len(jobs))), False
        while todo:
            batch = todo[:1] if single else todo
            answered, at, failure = self._run_batch([jobs[i] for i in batch], lambda k, o: deliver(batch[k], o))
            if at < answered:  # a file whose outcome already came is not the one at fault (the child died sending it)
                at = -1
            done = set(batch[:answered])
            if failure is not None and (at >= 0 or len(batch) == 1):
                deliver(batch[max(at, 0)], failure)
                done.add(batch[max(at, 0)])
            elif failure is not None:
                single = True
            todo = [i for i in todo if i not in done]
        return outcomes

    def _run_batch(self, batch: list[tuple],
                   deliver: Callable[[int, DecodeOutcome], None]) -> tuple[int, int, DecodeOutcome | None]:
        """Sends the batch and delivers its outcomes as they come. Returns (outcomes delivered,
        -1, None) when all came, else (outcomes delivered, index of the file at fault or -1, its outcome)."""
        answered = 0
        try:
            self.start()  # a child that died between batches is replaced
            self.batches += 1
            sent = time.monotonic()
            self._conn.send((self.part_bytes, batch))
            while answered < len(batch):
                while not self._conn.poll(min(0.1, self.timeout_s / 4)):
                    at, started = self._running()
                    if time.monotonic() - (started if at >= 0 else sent) > self.timeout_s:
                        self._kill()
                        timeout = DecodeOutcome(reason="decode_timeout", message=f"decoding took longer than the "
                                                f"{self.timeout_s:g} s per-file timeout; stopped")
                        return answered, at, timeout
                part = _receive_part(self._conn)
                if answered + len(part) > len(batch):
                    raise TypeError("the decoder process answered out of step")
                for outcome in part:
                    deliver(answered, outcome)
                    answered += 1
            return answered, -1, None
        except (EOFError, OSError, BrokenPipeError):
            message = "the decoder process died while decoding this file (crash or out of memory)"
        except Exception as exc:  # noqa: BLE001 - e.g. an answer that cannot be unpickled: the pipe is out of step
            message = f"the decoder process's answer for this file could not be read ({type(exc).__name__})"
        at = self._running()[0] if self._progress is not None else -1
        self._kill()
        return answered, at, DecodeOutcome(reason="decoder_crashed", message=message)

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
        if self._progress is not None:
            self._progress.close()
        self._proc = self._conn = self._progress = None


class PipelinedDecoder:
    """``processes`` :class:`IsolatedDecoder` children, each fed from one queue by a thread of its own.

    :meth:`submit` returns a future at once. A thread sends whatever files are waiting (up to
    ``max_batch`` files, and past ``max_batch_bytes`` of them no more) to its child as one batch,
    so batches grow by themselves when the caller submits faster than the children decode, and
    stay single files when it does not. Each future is set as its outcome arrives.
    """

    def __init__(self, timeout_s: float, decode_path: str = "transforms.decode_worker:decode_bytes",
                 max_batch: int = 32, processes: int = 1, max_batch_bytes: int = 16 << 20) -> None:
        if min(max_batch, processes, max_batch_bytes) < 1:
            raise ValueError(f"max_batch ({max_batch!r}), processes ({processes!r}) and max_batch_bytes "
                             f"({max_batch_bytes!r}) must be >= 1")
        self.decoders = [IsolatedDecoder(timeout_s, decode_path) for _ in range(processes)]
        self.max_batch, self.max_batch_bytes = max_batch, max_batch_bytes
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()  # submit may be called from several DoFn threads (SharedDecoders)

    def submit(self, data: bytes, frame_policy: str, limits: DicomLimits | int) -> Future:
        """Queue one file's bytes; the future's result is its :class:`DecodeOutcome`. Thread-safe."""
        if not self._threads:
            with self._start_lock:
                if not self._threads:
                    threads = [threading.Thread(target=self._loop, args=(d,), name=f"dicom-decoder-{i}", daemon=True)
                               for i, d in enumerate(self.decoders)]
                    for t in threads:
                        t.start()
                    self._threads = threads
        future: Future = Future()
        self._queue.put((future, (data, frame_policy, limits)))
        return future

    def _loop(self, decoder: IsolatedDecoder) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, size = [item], len(item[1][0])
            while len(batch) < self.max_batch and size < self.max_batch_bytes:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # the stop signal: back for this thread's next turn (or another thread)
                    self._queue.put(None)
                    break
                batch.append(item)
                size += len(item[1][0])
            try:
                decoder.decode_many([job for _, job in batch], lambda i, outcome: batch[i][0].set_result(outcome))
            except BaseException as exc:  # noqa: BLE001 - a bug here must reach the caller, not hang it
                for future, _ in batch:
                    if not future.done():
                        future.set_exception(exc)

    def close(self) -> None:
        with self._start_lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            t.join()
        for d in self.decoders:
            d.close()


class SharedDecoders:
    """One :class:`PipelinedDecoder` per worker process and setting, shared by every DoFn instance.

    A runner may run many instances of the reading DoFn in one process: one per bundle-processing
    thread (Dataflow's Python workers run several), or one per stage that reads DICOM. The first
    :meth:`acquire` of a setting starts its pool, later ones share it, and the last :meth:`release`
    closes it. So ``--decode_processes N`` means N children per worker process. The pool's queue is thread-safe and each file's outcome goes to the future
    its caller holds, so instances never see each other's files; a timeout or crash still costs
    the one file at fault."""

    _lock = threading.Lock()
    _pools: dict[tuple, tuple[PipelinedDecoder, int]] = {}

    @classmethod
    def acquire(cls, timeout_s: float, decode_path: str, processes: int) -> PipelinedDecoder:
        key = (float(timeout_s), decode_path, int(processes))
        with cls._lock:
            pool, users = cls._pools.get(key, (None, 0))
            if pool is None:
                pool = PipelinedDecoder(timeout_s, decode_path, processes=processes)
            cls._pools[key] = (pool, users + 1)
            return pool

    @classmethod
    def release(cls, pool: PipelinedDecoder) -> None:
        """Drop one user of ``pool``; the last one closes it (its children exit)."""
        with cls._lock:
            key = next((k for k, (p, _) in cls._pools.items() if p is pool), None)
            if key is None:
                return
            users = cls._pools[key][1] - 1
            if users:
                cls._pools[key] = (pool, users)
                return
            del cls._pools[key]
        pool.close()

    @classmethod
    def users(cls, pool: PipelinedDecoder) -> int:
        with cls._lock:
            return next((n for p, n in cls._pools.values() if p is pool), 0)
