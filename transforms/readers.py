"""Reading notes and DICOM files from storage, with a dead letter for everything unreadable.

Files are found with Beam's file matching (local paths, ``s3://``, ``gs://``) and read whole.
Every record that the reader attempts ends up either as an :class:`InputRecord` or as a
:class:`DeadLetter`; nothing is dropped. Messages are written here and never quote the input.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from .decode_worker import DecodeOutcome, SharedDecoders, decode_bytes, route_pydicom_logs
from .records import DeadLetter, InputRecord

log = logging.getLogger(__name__)

DEAD = "dead_letters"
NOTE_FORMATS = ("jsonl", "csv", "parquet", "txt")
NAMESPACE = "epee"


def note_format(path: str, forced: str | None = None) -> str | None:
    if forced and forced != "auto":
        return forced
    name = path.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                     (".parquet", "parquet"), (".txt", "txt")):
        if name.endswith(ext):
            return fmt
    return None


def _utf8(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte offset {exc.start}"


_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f]")  # below 32, except \t \n \v \f \r (9-13)


def _binary(text: str) -> bool:
    """NUL bytes, or more than 10% control characters other than whitespace: not a note."""
    if "\x00" in text:
        return True
    sample = text[:65536]
    controls = len(_CONTROLS.findall(sample))  # C speed; a Python loop over characters was 1% of a run
    return controls > 0.1 * max(1, len(sample))


def bounded_lines(fh, max_line: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line bytes without the newline) for each line of a binary file, reading
    ``chunk`` bytes at a time; a line longer than ``max_line`` is skipped and given as ``None``,
    so one huge line never sits in memory whole."""
    n, buf, skipping = 0, b"", False
    while True:
        block = fh.read(chunk)
        if not block:
            break
        buf += block
        while True:
            cut = buf.find(b"\n")
            if cut < 0:
                break
            line, buf = buf[:cut], buf[cut + 1:]
            n += 1
            yield n, (None if skipping or len(line) > max_line else line)
            skipping = False
        if len(buf) > max_line:  # inside an over-long line: drop what we have, remember it
            buf, skipping = b"", True
    if buf or skipping:
        n += 1
        yield n, (None if skipping or len(buf) > max_line else buf)


INPUTS = "inputs"


def read_bounded(fh, limit: int, size_hint: int | None = None) -> bytes:
    """The file's bytes, or its first ``limit + 1`` when it is longer than ``limit`` (0: no limit).

    ``fh.read(limit + 1)`` would allocate ``limit + 1`` bytes (1 GiB by default) for every file
    before shrinking the result, about 25 us per small file; this reads the size the file is said
    to have, plus one byte, then on in chunks while the file turns out longer."""
    if not limit:
        return fh.read()
    chunks = [fh.read(min(limit, size_hint) + 1 if size_hint else min(limit + 1, 1 << 20))]
    total = len(chunks[0])
    while total <= limit and chunks[-1]:  # until end of file (a stream may return short reads before it)
        chunks.append(fh.read(min(limit + 1 - total, 1 << 24)))
        total += len(chunks[-1])
    return b"".join(chunks)


def file_digest(readable: fileio.ReadableFile, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with readable.open() as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class _HashingReader:
    """A binary reader that hashes what passes through it (one pass for parsing and hashing)."""

    def __init__(self, fh) -> None:
        self.fh, self.h = fh, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        block = self.fh.read(n)
        self.h.update(block)
        return block

    def hexdigest(self) -> str:
        return self.h.hexdigest()


class _FileReader(beam.DoFn):
    """What both readers do per file besides parsing: the ``inputs`` table row (URI, size,
    SHA-256, records it gave, processed or skipped) and ``--skip_processed``: a file whose URI and
    content hash equal a previous run's is skipped (no records, an ``inputs`` row saying so).

    ``previous``: the previous run's inputs table (Parquet glob) or None. ``key_source``: with
    ``--pseudonymize_ids``, URIs in the inputs table are HMACs (see transforms.privacy).
    """

    previous: str | None = None
    key_source = None

    def setup(self) -> None:
        self._seen: dict[str, str] = {}
        self._pz = None
        if self.key_source is not None:
            from .privacy import Pseudonymizer

            self._pz = Pseudonymizer(self.key_source.load())
        if self.previous:
            self._seen = load_processed(self.previous)

    def _uri_key(self, uri: str) -> str:
        return self._pz(uri) if self._pz else uri

    def process(self, readable: fileio.ReadableFile) -> Iterator:
        digest, skipped = self._skip_check(readable)
        if skipped is not None:
            yield skipped
            return
        records = 0
        self._digest = None
        for out in self.read_file(readable):
            if not (isinstance(out, beam.pvalue.TaggedOutput) and out.tag != DEAD):
                records += 1
            yield out
        yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(readable.metadata.path, readable,
                                                               digest or self._digest, "processed", records))

    def _skip_check(self, readable: fileio.ReadableFile):
        """(digest or None, the ``inputs`` row of a file skipped as unchanged or None)."""
        if not self._seen:
            return None, None
        uri = readable.metadata.path
        try:
            digest = file_digest(readable)
        except Exception:  # noqa: BLE001 - unreadable: let the parser report it
            return None, None
        if self._seen.get(self._uri_key(uri)) == digest:
            Metrics.counter(NAMESPACE, "files_skipped_unchanged").inc()
            return digest, beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, digest, "skipped", 0))
        return digest, None

    def _input_row(self, uri, readable, digest, status, records) -> dict:
        return {"uri": self._uri_key(uri), "size": int(readable.metadata.size_in_bytes or 0), "sha256": digest,
                "status": status, "records": records, "run_id": self.run_id}

    def read_file(self, readable: fileio.ReadableFile) -> Iterator:
        raise NotImplementedError


def load_processed(pattern: str) -> dict[str, str]:
    """{uri: sha256} of the files a previous run processed, from its inputs table."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    seen: dict[str, str] = {}
    for meta in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(meta.path) as fh:
            for row in pq.read_table(fh, columns=["uri", "sha256", "status"]).to_pylist():
                if row["status"] == "processed" and row["sha256"]:
                    seen[row["uri"]] = row["sha256"]
    return seen


class ParseNoteFile(_FileReader):
    """ReadableFile -> InputRecord per note, DeadLetter (tagged ``dead_letters``) per bad one.

    JSONL and Parquet files are streamed (an archive file can be larger than memory); a plain-text
    note over ``max_note_bytes`` is refused unread; CSV files are read whole up to
    ``max_file_bytes``. A note over ``max_note_bytes`` (``note_too_large``), with invalid UTF-8
    (``invalid_utf8``) or binary content (``binary_content``) is a dead letter; the other notes of
    the same file are still read.
    """

    def __init__(self, task: str, text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", run_id: str = "", max_note_bytes: int = 1 << 20,
                 max_file_bytes: int = 1 << 30, previous: str | None = None, key_source=None) -> None:
        self.previous, self.key_source = previous, key_source
        self.task, self.text_field, self.id_field = task, text_field, id_field
        self.file_format, self.run_id = file_format, run_id
        self.max_note_bytes, self.max_file_bytes = max_note_bytes, max_file_bytes
        self.records_read = Metrics.counter(NAMESPACE, "records_read")

    def _dead(self, uri: str, rid: str | None, error_type: str, message: str, stage: str = "read"):
        self.records_read.inc()
        Metrics.counter(NAMESPACE, f"dead_letters_{error_type}").inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, rid, stage, error_type, message, self.run_id))

    def _too_large(self, uri: str, rid: str, what: str):
        return self._dead(uri, rid, "note_too_large", f"{what} is over the {self.max_note_bytes}-byte note limit "
                                                      "(--max_note_bytes); not read")

    def read_file(self, readable: fileio.ReadableFile) -> Iterator:
        uri = readable.metadata.path
        fmt = note_format(uri, self.file_format)
        if fmt is None:
            yield self._dead(uri, None, "unsupported_format", "file type is not one of .jsonl, .csv, .parquet, .txt")
            return
        size = readable.metadata.size_in_bytes or 0
        if fmt == "txt" and size > self.max_note_bytes:
            yield self._too_large(uri, uri, f"the note ({size} bytes)")
            return
        if fmt == "csv" and self.max_file_bytes and size > self.max_file_bytes:
            yield self._dead(uri, None, "file_too_large", f"CSV file is {size} bytes, over the {self.max_file_bytes}-byte "
                                                          "limit (--max_file_bytes); not read")
            return
        try:
            with readable.open() as fh:
                if fmt == "jsonl":
                    hashing = _HashingReader(fh)
                    yield from self._jsonl(uri, hashing)
                    self._digest = hashing.hexdigest()
                    return
                if fmt == "parquet":
                    yield from self._parquet(uri, fh)
                    self._digest = file_digest(readable)
                    return
                limit = self.max_note_bytes if fmt == "txt" else self.max_file_bytes
                data = read_bounded(fh, limit, readable.metadata.size_in_bytes)
                self._digest = hashlib.sha256(data).hexdigest()
        except Exception as exc:  # noqa: BLE001 - storage errors: the file (or its rest) is one unreadable record
            yield self._dead(uri, None, "read_error", f"could not read file ({type(exc).__name__})")
            return
        if fmt == "txt":
            if len(data) > self.max_note_bytes:
                yield self._too_large(uri, uri, "the note")
                return
            yield from self._note(uri, uri, *(_utf8(data)))
        else:
            yield from self._csv(uri, data)

    def _note(self, uri: str, rid: str, text: str | None, error: str | None, row: dict | None = None) -> Iterator:
        if error is not None:
            yield self._dead(uri, rid, "invalid_utf8", error)
            return
        if text is None or not str(text).strip():
            yield self._dead(uri, rid, "empty_note", "the note has no text")
            return
        text = str(text)
        if len(text) > self.max_note_bytes:
            yield self._too_large(uri, rid, "the note")
            return
        if _binary(text):
            yield self._dead(uri, rid, "binary_content", "the note holds NUL bytes or mostly control characters")
            return
        entities = None
        if self.task == "relation":
            from epee.data import relation_example

            try:
                ex = relation_example(row or {self.text_field: text}, "record", self.text_field, "label", rid)
            except ValueError as exc:
                yield self._dead(uri, rid, "bad_entities", str(exc).replace("record: ", ""))
                return
            text, entities = ex.text, ex.entities
        self.records_read.inc()
        yield InputRecord(record_id=rid, source_uri=uri, text=text, entities=entities)

    def _row_id(self, uri: str, row: dict, n: int) -> str:
        if self.id_field and row.get(self.id_field) not in (None, ""):
            return str(row[self.id_field])
        return f"{uri}#{n}"

    def _jsonl(self, uri: str, fh) -> Iterator:
        # a line holds a note plus its other fields and JSON escapes: allow twice the note limit
        for n, raw in bounded_lines(fh, 2 * self.max_note_bytes + 4096):
            if raw is None:
                yield self._too_large(uri, f"{uri}#{n}", f"line {n}")
                continue
            if not raw.strip():
                continue
            line, error = _utf8(raw)
            if error:
                yield self._dead(uri, f"{uri}#{n}", "invalid_utf8", f"line {n}: {error}")
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                yield self._dead(uri, f"{uri}#{n}", "malformed_json", f"line {n} is not a JSON object")
                continue
            yield from self._field_note(uri, row, n)

    def _field_note(self, uri: str, row: dict, n: int) -> Iterator:
        rid = self._row_id(uri, row, n)
        if self.text_field not in row:
            yield self._dead(uri, rid, "missing_field", f"record {n} has no field {self.text_field!r}")
            return
        value = row[self.text_field]
        if value is not None and not isinstance(value, str):
            yield self._dead(uri, rid, "bad_field_type", f"record {n}: field {self.text_field!r} is a "
                                                         f"{type(value).__name__}, not text")
            return
        yield from self._note(uri, rid, value, None, row)

    def _csv(self, uri: str, data: bytes) -> Iterator:
        if self.max_file_bytes and len(data) > self.max_file_bytes:
            yield self._dead(uri, None, "file_too_large", f"CSV file is over the {self.max_file_bytes}-byte limit "
                                                          "(--max_file_bytes); not read")
            return
        # undecodable bytes become surrogates, so one bad row does not cost the whole file
        text = data.decode("utf-8", errors="surrogateescape")
        del data
        csv.field_size_limit(max(csv.field_size_limit(), self.max_note_bytes + 1))
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header: list[str] | None = None
        n = 0
        while True:
            n += 1 if header is not None else 0
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if header is None:
                    yield self._dead(uri, None, "malformed_csv_row", "the header row cannot be parsed; no row was read")
                    return
                kind = "note_too_large" if "field larger" in str(exc) else "malformed_csv_row"
                yield self._dead(uri, f"{uri}#{n}", kind, f"row {n} (line {reader.line_num}) cannot be parsed"
                                 + (f": a field is over the {self.max_note_bytes}-byte note limit" if kind == "note_too_large" else ""))
                continue
            if header is None:
                header = cells
                if any(_has_surrogates(c) for c in header):
                    yield self._dead(uri, None, "invalid_utf8", "CSV header is not valid UTF-8; no row was read")
                    return
                continue
            if not cells:
                n -= 1
                continue
            if len(cells) != len(header):
                yield self._dead(uri, f"{uri}#{n}", "malformed_csv_row", f"row {n} has {len(cells)} fields, header has {len(header)}")
                continue
            row = dict(zip(header, cells))
            if any(_has_surrogates(c) for c in cells):
                yield self._dead(uri, self._row_id(uri, {k: v for k, v in row.items() if not _has_surrogates(v)}, n),
                                 "invalid_utf8", f"row {n} is not valid UTF-8")
                continue
            yield from self._field_note(uri, row, n)

    def _parquet(self, uri: str, fh) -> Iterator:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(fh)
            batches = table.iter_batches(batch_size=1024)
            n = 0
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield from self._field_note(uri, row, n)
        except Exception as exc:  # noqa: BLE001 - any parse failure: the (rest of the) file is one dead letter
            yield self._dead(uri, None, "malformed_parquet", f"not a readable Parquet file ({type(exc).__name__})")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


class OpenFiles(beam.PTransform):
    """File pattern -> the matching files, opened (``ReadableFile``), spread over the workers.

    Matching yields every file from one element, and nothing in ``fileio`` splits: without the
    shuffle a runner fuses the reading, the model and everything up to the writes into one bundle
    on one worker, whatever the number of workers. Only file names are shuffled."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Spread" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches()
        )


class ReadNotes(beam.PTransform):
    """File pattern -> notes (main output) and dead letters (``dead_letters``)."""

    def __init__(self, pattern: str, task: str = "sequence", text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", run_id: str = "", **limits) -> None:
        super().__init__()
        self.pattern, self.parse = pattern, ParseNoteFile(task, text_field, id_field, file_format, run_id, **limits)

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> OpenFiles(self.pattern)
            | "Parse" >> beam.ParDo(self.parse).with_outputs(DEAD, INPUTS, main="records")
        )


# -- DICOM -----------------------------------------------------------------------------------------
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

    def __init__(self, frame_policy: str = "middle", run_id: str = "", max_file_bytes: int = 1 << 30,
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
        if self.decoder is None:
            yield from super().process(readable)
            return
        digest, skipped = self._skip_check(readable)
        if skipped is not None:
            yield skipped
            return
        data, dead = self._read(readable)
        if dead is not None:
            yield dead
            yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(readable.metadata.path, readable, digest, "processed", 1))
            return
        digest = digest or hashlib.sha256(data).hexdigest()
        outcome = self.decoder.submit(data, self.frame_policy, self.max_pixel_bytes)
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
        uri = job.readable.metadata.path
        outputs = list(self._outputs(uri, job.outcome.result()))  # decode() turns every failure into an outcome
        row = self._input_row(uri, job.readable, job.digest, "processed", len(outputs))  # records or a dead letter
        for out in (*outputs, beam.pvalue.TaggedOutput(INPUTS, row)):
            if isinstance(out, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, job.timestamp, (job.window,)))
            else:
                yield WindowedValue(out, job.timestamp, (job.window,))

    def _read(self, readable: fileio.ReadableFile):
        """(the file's bytes, None) or (None, its dead letter): too large or unreadable."""
        uri = readable.metadata.path
        limit = self.max_file_bytes
        if limit and (readable.metadata.size_in_bytes or 0) > limit:
            return None, self._dead(uri, "file_too_large", f"file is {readable.metadata.size_in_bytes} bytes, over the "
                                                           f"{limit}-byte limit (--max_file_bytes); not read", "read")
        try:
            with readable.open() as fh:
                data = read_bounded(fh, limit, readable.metadata.size_in_bytes)
        except Exception as exc:  # noqa: BLE001 - storage errors: the file is one unreadable record
            return None, self._dead(uri, "read_error", f"could not read file ({type(exc).__name__})", "read")
        if limit and len(data) > limit:
            return None, self._dead(uri, "file_too_large", f"file is over the {limit}-byte limit (--max_file_bytes)",
                                    "read")
        return data, None

    def read_file(self, readable: fileio.ReadableFile) -> Iterator:
        """Read and decode one file in this process (``decode_timeout_s == 0``)."""
        data, dead = self._read(readable)
        if dead is not None:
            yield dead
            return
        self._digest = hashlib.sha256(data).hexdigest()
        outcome = decode_bytes(data, self.frame_policy, self.max_pixel_bytes)
        del data
        yield from self._outputs(readable.metadata.path, outcome)

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
    def __init__(self, pattern: str, frame_policy: str = "middle", run_id: str = "", **limits) -> None:
        super().__init__()
        self.pattern, self.decode = pattern, DecodeDicomFile(frame_policy, run_id, **limits)

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> OpenFiles(self.pattern)
            | "Decode" >> beam.ParDo(self.decode).with_outputs(DEAD, INPUTS, main="records")
        )
