"""Reading notes and DICOM files from storage, with a dead letter for everything unreadable.

Files are found with Beam's file matching (local paths, ``s3://``, ``gs://``) and read whole.
Every record that the reader attempts ends up either as an :class:`InputRecord` or as a
:class:`DeadLetter`; nothing is dropped. Messages are written here and never quote the input.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import warnings
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

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


class ParseNoteFile(beam.DoFn):
    """ReadableFile -> InputRecord per note, DeadLetter (tagged ``dead_letters``) per bad one."""

    def __init__(self, task: str, text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", run_id: str = "") -> None:
        self.task, self.text_field, self.id_field = task, text_field, id_field
        self.file_format, self.run_id = file_format, run_id
        self.records_read = Metrics.counter(NAMESPACE, "records_read")

    def _dead(self, uri: str, rid: str | None, error_type: str, message: str, stage: str = "read"):
        Metrics.counter(NAMESPACE, f"dead_letters_{error_type}").inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, rid, stage, error_type, message, self.run_id))

    def process(self, readable: fileio.ReadableFile) -> Iterator:
        uri = readable.metadata.path
        fmt = note_format(uri, self.file_format)
        if fmt is None:
            self.records_read.inc()
            yield self._dead(uri, None, "unsupported_format", "file type is not one of .jsonl, .csv, .parquet, .txt")
            return
        try:
            data = readable.read()
        except Exception as exc:  # storage errors: the file is one unreadable record
            self.records_read.inc()
            yield self._dead(uri, None, "read_error", f"could not read file ({type(exc).__name__})")
            return
        if fmt == "txt":
            yield from self._note(uri, uri, *(_utf8(data)))
        elif fmt == "jsonl":
            yield from self._jsonl(uri, data)
        elif fmt == "csv":
            yield from self._csv(uri, data)
        else:
            yield from self._parquet(uri, data)

    def _note(self, uri: str, rid: str, text: str | None, error: str | None, row: dict | None = None) -> Iterator:
        self.records_read.inc()
        if error is not None:
            yield self._dead(uri, rid, "invalid_utf8", error)
            return
        if text is None or not str(text).strip():
            yield self._dead(uri, rid, "empty_note", "the note has no text")
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
        yield InputRecord(record_id=rid, source_uri=uri, text=str(text), entities=entities)

    def _row_id(self, uri: str, row: dict, n: int) -> str:
        if self.id_field and row.get(self.id_field) not in (None, ""):
            return str(row[self.id_field])
        return f"{uri}#{n}"

    def _jsonl(self, uri: str, data: bytes) -> Iterator:
        for n, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            line, error = _utf8(raw)
            if error:
                self.records_read.inc()
                yield self._dead(uri, f"{uri}#{n}", "invalid_utf8", f"line {n}: {error}")
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.records_read.inc()
                yield self._dead(uri, f"{uri}#{n}", "malformed_json", f"line {n} is not a JSON object")
                continue
            yield from self._field_note(uri, row, n)

    def _field_note(self, uri: str, row: dict, n: int) -> Iterator:
        rid = self._row_id(uri, row, n)
        if self.text_field not in row:
            self.records_read.inc()
            yield self._dead(uri, rid, "missing_field", f"record {n} has no field {self.text_field!r}")
            return
        value = row[self.text_field]
        yield from self._note(uri, rid, None if value is None else str(value), None, row)

    def _csv(self, uri: str, data: bytes) -> Iterator:
        text, error = _utf8(data)
        if error:
            self.records_read.inc()
            yield self._dead(uri, None, "invalid_utf8", f"CSV file: {error}; no row was read")
            return
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
            header = reader.fieldnames or []
            n = 0
            for n, row in enumerate(reader, start=1):
                if None in row or any(v is None for v in row.values()):
                    self.records_read.inc()
                    yield self._dead(uri, f"{uri}#{n}", "malformed_csv_row",
                                     f"row {n} has {len(row) - (None in row) + len(row.get(None) or [])} fields, header has {len(header)}")
                    continue
                yield from self._field_note(uri, row, n)
        except csv.Error:
            self.records_read.inc()
            yield self._dead(uri, f"{uri}#{n + 1}", "malformed_csv_row", f"row {n + 1} cannot be parsed; the rest of the file is skipped")

    def _parquet(self, uri: str, data: bytes) -> Iterator:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any parse failure makes the file one dead letter
            self.records_read.inc()
            yield self._dead(uri, None, "malformed_parquet", f"not a readable Parquet file ({type(exc).__name__})")
            return
        for n, row in enumerate(rows, start=1):
            yield from self._field_note(uri, row, n)


class ReadNotes(beam.PTransform):
    """File pattern -> notes (main output) and dead letters (``dead_letters``)."""

    def __init__(self, pattern: str, task: str = "sequence", text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", run_id: str = "") -> None:
        super().__init__()
        self.pattern, self.parse = pattern, ParseNoteFile(task, text_field, id_field, file_format, run_id)

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Open" >> fileio.ReadMatches()
            | "Parse" >> beam.ParDo(self.parse).with_outputs(DEAD, main="records")
        )


# -- DICOM -----------------------------------------------------------------------------------------
def dicom_error_type(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, NotImplementedError):
        return "unsupported_encoding"
    if "not a DICOM" in text:
        return "not_dicom"
    if "PixelData" in text and ("no " in text or "missing" in text):
        return "no_pixel_data"
    return "decode_error"


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


@contextlib.contextmanager
def quiet_pydicom():
    """Decode with pydicom's warnings captured (yielded, to be counted) and its logs routed."""
    route_pydicom_logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


class DecodeDicomFile(beam.DoFn):
    """ReadableFile -> InputRecord with decoded pixels (middle frame, or one per frame)."""

    def __init__(self, frame_policy: str = "middle", run_id: str = "") -> None:
        self.frame_policy, self.run_id = frame_policy, run_id
        self.records_read = Metrics.counter(NAMESPACE, "records_read")

    def process(self, readable: fileio.ReadableFile) -> Iterator:
        from epee.images import read_dicom

        uri = readable.metadata.path
        try:
            with quiet_pydicom() as caught:
                pixels = read_dicom(io.BytesIO(readable.read()), frame_policy=self.frame_policy)
            if caught:
                Metrics.counter(NAMESPACE, "dicom_decoder_warnings").inc(len(caught))
        except (ValueError, NotImplementedError) as exc:
            self.records_read.inc()
            kind = dicom_error_type(exc)
            Metrics.counter(NAMESPACE, f"dead_letters_{kind}").inc()
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, uri, "decode", kind, str(exc), self.run_id))
            return
        except Exception as exc:  # noqa: BLE001 - never let one file stop the job
            self.records_read.inc()
            Metrics.counter(NAMESPACE, "dead_letters_decode_error").inc()
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, uri, "decode", "decode_error",
                                                            f"unexpected {type(exc).__name__} while decoding", self.run_id))
            return
        if self.frame_policy == "all":
            for i, frame in enumerate(pixels):
                self.records_read.inc()  # every frame is a record: one prediction or dead letter each
                yield InputRecord(record_id=f"{uri}#frame={i}", source_uri=uri, pixels=frame)
        else:
            self.records_read.inc()
            yield InputRecord(record_id=uri, source_uri=uri, pixels=pixels)


class ReadDicom(beam.PTransform):
    def __init__(self, pattern: str, frame_policy: str = "middle", run_id: str = "") -> None:
        super().__init__()
        self.pattern, self.decode = pattern, DecodeDicomFile(frame_policy, run_id)

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            | "Open" >> fileio.ReadMatches()
            | "Decode" >> beam.ParDo(self.decode).with_outputs(DEAD, main="records")
        )
