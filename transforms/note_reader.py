"""Reading notes: JSONL, CSV, Parquet and plain-text files -> one InputRecord per note, a
DeadLetter (tagged ``dead_letters``) per bad one."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from .files import DEAD, INPUTS, NAMESPACE, OpenFiles, _FileReader, _HashingReader, bounded_lines, file_digest, read_bounded
from .records import DeadLetter, InputRecord

NOTE_FORMATS = ("jsonl", "csv", "parquet", "txt")

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

