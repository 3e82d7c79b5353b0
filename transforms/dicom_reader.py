"""Reading DICOM files: ReadableFile -> InputRecord with decoded pixels, or a dead letter."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from epee.errors import InputError, describe

from .decode_worker import DecodeOutcome, SharedDecoders, decode_bytes, route_pydicom_logs
from .files import DEAD, INPUTS, NAMESPACE, FileDigest, OpenFiles, _FileReader, read_limited, record_uri
from .records import DeadLetter, InputRecord

@dataclass
class _InFlight:
    """A file handed to the decoder process whose outputs are not out yet."""

    readable: fileio.ReadableFile
    digest: str
    size: int
    outcome: Future
    window: Any
    timestamp: Any


class DecodeDicomFile(_FileReader):
    """ReadableFile -> InputRecord with decoded pixels (middle frame, or one per frame).

    Before anything is decoded: files over ``max_file_bytes`` are refused unread, and
    :func:`epee.images.check_dicom` refuses non-image SOP classes and headers whose declared
    pixels exceed ``max_pixel_bytes``. With ``decode_timeout_s > 0`` decoding runs in a child
    process (:class:`~transforms.decode_worker.IsolatedDecoder`) that is killed when one file
    takes longer; 0 decodes in this process (no protection against a hanging decoder).

    With the child process, decoding is pipelined (:class:`~transforms.decode_worker.PipelinedDecoder`,
    one pool of ``decode_processes`` children per worker process, :class:`~transforms.decode_worker.SharedDecoders`):
    a file's bytes go to the child and the DoFn goes on reading the next files, and running
    inference on the records already out, while the child decodes. Up to ``max_in_flight_files``
    files (and ``max_in_flight_bytes`` of their bytes; always at least one file) wait for the
    child; their outputs leave in input order, each in its own window and with its own
    timestamp, and the last ones leave in ``finish_bundle``. The per-file timeout is unchanged:
    the child decodes one file at a time and each file's clock starts when the child starts it.
    """

    def __init__(self, frame_policy: str = "middle", *, run_id: str, max_file_bytes: int = 1 << 30,
                 max_pixel_bytes: int = 1 << 30, decode_timeout_s: float = 120.0,
                 decode_path: str = "transforms.decode_worker:decode_bytes", previous: str | None = None,
                 key_source=None, max_in_flight_files: int = 64, max_in_flight_bytes: int = 64 << 20,
                 decode_processes: int = 1) -> None:
        if min(max_in_flight_files, max_in_flight_bytes, decode_processes) < 1:
            raise ValueError(f"max_in_flight_files ({max_in_flight_files!r}), max_in_flight_bytes "
                             f"({max_in_flight_bytes!r}) and decode_processes ({decode_processes!r}) must be >= 1")
        self.previous, self.key_source = previous, key_source
        self.frame_policy, self.run_id = frame_policy, run_id
        self.max_file_bytes, self.max_pixel_bytes = max_file_bytes, max_pixel_bytes
        self.decode_timeout_s, self.decode_path = decode_timeout_s, decode_path
        self.max_in_flight_files, self.max_in_flight_bytes = max_in_flight_files, max_in_flight_bytes
        self.decode_processes = decode_processes
        self.records_read = Metrics.counter(NAMESPACE, "records_read")
        self.decoder = None

    @property
    def limits(self):
        """What the decoder may spend on one file: the pixel budget, and --max_file_bytes for a
        deflated dataset's inflated size (a 1 MB file can inflate to gigabytes)."""
        from epee.images import DicomLimits

        return DicomLimits(max_pixel_bytes=self.max_pixel_bytes, max_inflated_bytes=self.max_file_bytes)

    def setup(self) -> None:
        super().setup()
        route_pydicom_logs()
        if self.decode_timeout_s > 0:
            # one pool of decode_processes children per worker process, shared by every instance
            self.decoder = SharedDecoders.acquire(self.decode_timeout_s, self.decode_path, self.decode_processes)

    def start_bundle(self) -> None:
        self._in_flight: deque[_InFlight] = deque()
        self._in_flight_bytes = 0

    def teardown(self) -> None:
        if self.decoder is not None:
            SharedDecoders.release(self.decoder)
            self.decoder = None

    def _dead(self, uri: str, kind: str, message: str, stage: str = "decode"):
        self.records_read.inc()
        Metrics.counter(NAMESPACE, f"dead_letters_{kind}").inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, uri, stage, kind, message, self.run_id))

    def process(self, readable: fileio.ReadableFile, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator:
        if self.decoder is None:  # decoding in this process (--decode_timeout 0): read_file
            yield from super().process(readable)
            return
        yield from self.per_file(readable, lambda r, uri, digest: self._submit(r, uri, digest, window, timestamp))

    def _submit(self, readable: fileio.ReadableFile, uri: str, digest: str | None, window, timestamp) -> Iterator:
        """Hand the file's bytes to the decoder process; yield the outputs of the files it has
        finished (:meth:`_release`), oldest first, while too many wait. A file that cannot be read
        is its dead letter and its ``inputs`` row at once."""
        data, stored_digest, dead = self._read(readable)
        if dead is not None:
            yield dead
            yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, digest, "processed", 1))
            return
        digest = digest or stored_digest
        outcome = self.decoder.submit(data, self.frame_policy, self.limits)
        self._in_flight.append(_InFlight(readable, digest, len(data), outcome, window, timestamp))
        self._in_flight_bytes += len(data)
        del data
        while self._in_flight and (self._in_flight[0].outcome.done() or len(self._in_flight) > self.max_in_flight_files
                                   or self._in_flight_bytes > self.max_in_flight_bytes):
            yield from self._release()

    def finish_bundle(self) -> Iterator:
        while self._in_flight:
            yield from self._release()

    def _release(self) -> Iterator:
        """The oldest file's outputs, once the child has decoded it (waits for it), windowed as its input was."""
        job = self._in_flight.popleft()
        self._in_flight_bytes -= job.size
        uri = record_uri(job.readable)
        outputs = list(self._outputs(uri, job.outcome.result()))  # decode() turns every failure into an outcome
        row = self._input_row(uri, job.readable, job.digest, "processed", len(outputs))  # records or a dead letter
        for out in (*outputs, beam.pvalue.TaggedOutput(INPUTS, row)):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, job.timestamp, (job.window,)))
            else:
                yield WindowedValue(out, job.timestamp, (job.window,))

    def _read(self, readable: fileio.ReadableFile):
        """(the file's content, SHA-256 of the stored file, None) or (None, None, its dead letter).
        A compressed file (``.dcm.gz``, by its name) is inflated in 1 MiB steps and counted
        against ``--max_file_bytes`` as it grows (:func:`transforms.files.read_limited`)."""
        uri = record_uri(readable)
        try:
            data, digest = read_limited(readable, self.max_file_bytes)
        except InputError as exc:  # too large once inflated, a corrupt compressed stream: our words
            return None, None, self._dead(uri, exc.error_type, describe(exc, ""), "read")
        except Exception as exc:  # noqa: BLE001 - storage errors: the file is one unreadable record
            return None, None, self._dead(uri, "read_error", f"could not read file ({type(exc).__name__})", "read")
        return data, digest, None

    def read_file(self, readable: fileio.ReadableFile, digest: FileDigest) -> Iterator:
        """Read and decode one file in this process (``decode_timeout_s == 0``)."""
        data, digest.value, dead = self._read(readable)
        if dead is not None:
            yield dead
            return
        outcome = decode_bytes(data, self.frame_policy, self.limits)
        del data
        yield from self._outputs(record_uri(readable), outcome)

    def _outputs(self, uri: str, outcome: DecodeOutcome) -> Iterator:
        """A decoded file's records (one per frame with ``frame_policy="all"``), or its dead letter."""
        if outcome.warnings:
            Metrics.counter(NAMESPACE, "dicom_decoder_warnings").inc(outcome.warnings)
        if outcome.reason is not None:
            yield self._dead(uri, outcome.reason, outcome.message)
            return
        if self.frame_policy == "all":
            for i, frame in enumerate(outcome.pixels):
                self.records_read.inc()  # every frame is a record: one prediction or dead letter each
                yield InputRecord(record_id=f"{uri}#frame={i}", source_uri=uri, pixels=frame)
        else:
            self.records_read.inc()
            yield InputRecord(record_id=uri, source_uri=uri, pixels=outcome.pixels)


class ReadDicom(beam.PTransform):
    def __init__(self, pattern: str, frame_policy: str = "middle", *, run_id: str, **limits) -> None:
        super().__init__()
        self.pattern, self.decode = pattern, DecodeDicomFile(frame_policy, run_id=run_id, **limits)

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> OpenFiles(self.pattern)
            | "Decode" >> beam.ParDo(self.decode).with_outputs(DEAD, INPUTS, main="records")
        )
