"""Reading notes: JSON Lines, JSON, CSV/TSV, Parquet and plain-text files, each possibly
compressed -> one InputRecord per note, a DeadLetter (tagged ``dead_letters``) per bad one.

The input rules (the README's "Note inputs" says the same for users):

* format by the name without its compression suffix (``.jsonl``/``.ndjson``, ``.json``, ``.csv``,
  ``.tsv``/``.tab``, ``.parquet``, ``.txt``), or ``--input_format``; a compressed file (``.gz``,
  ``.bz2``, ``.xz``, ``.zst``, ``.deflate``) is inflated in bounded steps and its inflated size is
  counted first against ``--max_file_bytes``: over it, or corrupt, it is one dead letter, unread;
* a UTF-8 byte order mark at the start of a text file is dropped; lines end in LF or CRLF;
* ``.json``: a JSON array is one record per element; another document that parses whole (up to
  twice ``--max_note_bytes``) is one record; anything else is read as JSON Lines;
* CSV: blank lines before the header are skipped; the delimiter is the one of ``,`` ``;`` tab
  ``|`` that the header line holds most of outside quotes (comma when none; tab for ``.tsv``);
  quoted fields may span lines; every row is checked for UTF-8 on its own;
* a field: the text must be a string (``null`` is no text: ``empty_note``; a number, list or
  object: ``bad_field_type``; a string with a lone surrogate escape such as ``"\\ud83d"``:
  ``invalid_utf8``); the id a string or whole number (else ``bad_field_type``), empty or null: the
  ``file#row`` id;
* Parquet is read row group by row group: a row group that cannot be read is one
  ``malformed_parquet`` (id ``file#rowgroup<i>``), the others are read;
* a file of no bytes, or of only whitespace, is one ``empty_file``.
"""

from __future__ import annotations

import csv
import json
import re
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from epee.errors import InputError, describe

from .files import (DEAD, INPUTS, NAMESPACE, FileDigest, FileTooLarge, OpenFiles, _FileReader, bounded_lines,
                    compression_of, content_size, file_digest, open_limited, read_bounded, record_uri,
                    strip_compression)
from .records import DeadLetter, InputRecord

NOTE_FORMATS = ("jsonl", "json", "csv", "parquet", "txt")
_EXTENSIONS = ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "csv"),
               (".tab", "csv"), (".parquet", "parquet"), (".txt", "txt"))
_TAB_NAMES = (".tsv", ".tab")
__all__ = ["NOTE_FORMATS", "ParseNoteFile", "ReadNotes", "note_format", "read_bounded"]


def note_format(path: str, forced: str | None = None) -> str | None:
    """The reader for a file: ``forced`` (``--input_format``) unless "auto", else by the name
    without its compression suffix (``notes.csv.gz`` -> csv); None: not a note file."""
    if forced and forced != "auto":
        return forced
    name = strip_compression(path).lower()
    for ext, fmt in _EXTENSIONS:
        if name.endswith(ext):
            return fmt
    return None


def _utf8(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte offset {exc.start}"


_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f]")  # below 32, except \t \n \v \f \r (9-13)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _binary(text: str) -> bool:
    """NUL bytes, or more than 10% control characters other than whitespace: not a note."""
    if "\x00" in text:
        return True
    sample = text[:65536]
    controls = len(_CONTROLS.findall(sample))  # C speed; a Python loop over characters was 1% of a run
    return controls > 0.1 * max(1, len(sample))


def _has_surrogates(text: str) -> bool:
    """A lone surrogate: a JSON ``"\\ud83d"`` escape cut from its pair, or a CSV byte that is not UTF-8."""
    return _SURROGATE.search(text) is not None


class _LineTooLong(Exception):
    """A physical line over the reader's line limit (its bytes were never held)."""


class _CsvLines:
    """The lines of a CSV file as text for :func:`csv.reader` (newlines put back, bytes that are
    not UTF-8 kept as surrogate escapes so each row is judged on its own); a line over the limit
    raises :class:`_LineTooLong` in the reader, which starts afresh at the next line."""

    def __init__(self, lines: Iterator[tuple[int, bytes | None]]) -> None:
        self.lines, self.pushed = lines, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pushed is not None:
            line, self.pushed = self.pushed, None
            return line
        _, raw = next(self.lines)
        if raw is None:
            raise _LineTooLong()
        return raw.decode("utf-8", "surrogateescape") + "\n"


def _sniff_delimiter(header: str) -> str:
    """The one of , ; tab | that the header line holds most of outside quotes; comma when none."""
    bare = re.sub(r'"[^"]*"', "", header)
    counts = [(bare.count(d), -i, d) for i, d in enumerate((",", ";", "\t", "|"))]
    best = max(counts)
    return best[2] if best[0] else ","


_JSON_TOKEN = re.compile(rb'["\[\]{},]')
_JSON_IN_STRING = re.compile(rb'["\\]')


def json_array_elements(fh, max_value: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes | None]]:
    """(element number, its bytes) for each element of the JSON array a binary file holds,
    streamed ``chunk`` bytes at a time: only the element being read is held; an element longer
    than ``max_value`` is skipped and given as ``None``. Splits at the array's own commas (strings
    and nesting followed); each element is then parsed on its own, so a broken one costs itself
    (a broken nesting can cost the rest of the array). The bytes after the closing ``]``, if any
    besides whitespace, come last as one more element, which will not parse."""
    buf, pos, start, depth = b"", 0, 0, 0
    in_str = esc = skipping = opened = closed = False
    n = 0
    while True:
        block = fh.read(chunk)
        if not block:
            break
        buf += block
        while pos < len(buf):
            if closed:
                pos = len(buf)
                break
            if esc:
                pos, esc = pos + 1, False
                continue
            m = (_JSON_IN_STRING if in_str else _JSON_TOKEN).search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c, pos = buf[m.start()], m.end()
            if in_str:
                if c == 0x22:
                    in_str = False
                else:
                    esc = True
            elif c == 0x22:
                in_str = True
            elif c in b"[{":
                if not opened:
                    opened, depth, start = True, 1, pos
                else:
                    depth += 1
            elif c in b"]}":
                depth -= 1
                if depth == 0:
                    element = buf[start:m.start()]
                    if skipping or element.strip() or n:
                        n += 1
                        yield n, (None if skipping or len(element) > max_value else element)
                    skipping, closed, start = False, True, pos
            elif c == 0x2C and depth == 1:
                n += 1
                element = buf[start:m.start()]
                yield n, (None if skipping or len(element) > max_value else element)
                skipping, start = False, pos
        if closed:  # what follows the array: kept only if it is more than whitespace
            rest = buf[start:].strip()
            buf, pos, start = rest[:max_value + 1], len(rest[:max_value + 1]), 0
            continue
        buf, pos, start = buf[start:], pos - start, 0
        if len(buf) > max_value:
            buf, pos, skipping = b"", 0, True
    if closed:
        if buf.strip():
            yield n + 1, (None if len(buf) > max_value else buf)
    elif opened:  # the file ends inside the array: what is left is one element that cannot parse
        yield n + 1, (None if skipping else buf[start:] + b"\x00")


class ParseNoteFile(_FileReader):
    """ReadableFile -> InputRecord per note, DeadLetter (tagged ``dead_letters``) per bad one.

    Every format is streamed (an archive file can be larger than memory; a compressed file's
    inflated size is counted first against ``max_file_bytes``); a plain-text note over
    ``max_note_bytes`` is refused unread; CSV files over ``max_file_bytes`` are refused unread. A
    bad record is a dead letter of its own (module docstring), and the other records of the same
    file are still read.
    """

    def __init__(self, task: str, text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", run_id: str = "", max_note_bytes: int = 1 << 20,
                 max_file_bytes: int = 1 << 30, previous: str | None = None, key_source=None) -> None:
        self.previous, self.key_source = previous, key_source
        self.task, self.text_field, self.id_field = task, text_field, id_field
        self.file_format, self.run_id = file_format, run_id
        self.max_note_bytes, self.max_file_bytes = max_note_bytes, max_file_bytes
        self.records_read = Metrics.counter(NAMESPACE, "records_read")

    @property
    def _max_value(self) -> int:
        # a line or JSON value holds a note plus its other fields and JSON escapes: twice the note limit
        return 2 * self.max_note_bytes + 4096

    def _dead(self, uri: str, rid: str | None, error_type: str, message: str, stage: str = "read"):
        self.records_read.inc()
        Metrics.counter(NAMESPACE, f"dead_letters_{error_type}").inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, rid, stage, error_type, message, self.run_id))

    def _too_large(self, uri: str, rid: str, what: str):
        return self._dead(uri, rid, "note_too_large", f"{what} is over the {self.max_note_bytes}-byte note limit "
                                                      "(--max_note_bytes); not read")

    def read_file(self, readable: fileio.ReadableFile, digest: FileDigest) -> Iterator:
        uri, path = record_uri(readable), readable.metadata.path
        fmt = note_format(path, self.file_format)
        if fmt is None:
            yield self._dead(uri, None, "unsupported_format", "file type is not one of .jsonl, .ndjson, .json, .csv, "
                                                              ".tsv, .parquet, .txt (each also compressed: .gz, .bz2, "
                                                              ".xz, .zst, .deflate)")
            return
        compressed = compression_of(path) != CompressionTypes.UNCOMPRESSED
        size = readable.metadata.size_in_bytes or 0
        try:
            if compressed:  # one pass that keeps nothing: the inflated size, before any of it is parsed
                size, digest.value = content_size(readable, self.max_file_bytes)
            if size == 0:
                yield self._dead(uri, None, "empty_file", "the file is empty")
                return
            if fmt == "txt" and size > self.max_note_bytes:
                yield self._too_large(uri, uri, f"the note ({size} bytes)")
                return
            if fmt == "csv" and self.max_file_bytes and size > self.max_file_bytes:
                yield self._dead(uri, None, "file_too_large", f"CSV file is {size} bytes, over the {self.max_file_bytes}"
                                                              "-byte limit (--max_file_bytes); not read")
                return
            streamed_limit = self.max_file_bytes if compressed else 0  # JSONL, JSON, Parquet: no limit unless inflated
            if fmt == "jsonl":
                with open_limited(readable, streamed_limit, strip_bom=True) as fh:
                    yield from self._jsonl(uri, fh)
                    digest.value = fh.digest()
            elif fmt == "json":
                yield from self._json(uri, readable, streamed_limit, digest)
            elif fmt == "csv":
                with open_limited(readable, self.max_file_bytes, strip_bom=True) as fh:
                    yield from self._csv(uri, fh, "\t" if strip_compression(path).lower().endswith(_TAB_NAMES) else None)
                    digest.value = fh.digest()
            elif fmt == "parquet":
                yield from self._parquet_file(uri, readable, compressed, digest)
            else:
                yield from self._txt(uri, readable, digest)
        except InputError as exc:  # too large once inflated, a corrupt compressed stream: the (rest of the) file
            inflated = compressed and exc.error_type == "file_too_large"
            yield self._dead(uri, None, exc.error_type, describe(exc, "") + (" (once decompressed)" if inflated else ""))
        except Exception as exc:  # noqa: BLE001 - storage errors: the file (or its rest) is one unreadable record
            yield self._dead(uri, None, "read_error", describe(exc, "could not read file"))

    # -- formats -------------------------------------------------------------------------------
    def _txt(self, uri: str, readable, digest: FileDigest) -> Iterator:
        try:
            with open_limited(readable, self.max_note_bytes, strip_bom=True) as fh:
                data = fh.read()
                digest.value = fh.digest()
        except FileTooLarge:
            yield self._too_large(uri, uri, "the note")
            return
        text, error = _utf8(data)
        if error is None and not text.strip():
            yield self._dead(uri, None, "empty_file", "the file holds only whitespace")
            return
        yield from self._note(uri, uri, text, error)

    def _jsonl(self, uri: str, fh) -> Iterator:
        content = False
        for n, raw in bounded_lines(fh, self._max_value):
            if raw is None:
                content = True
                yield self._too_large(uri, f"{uri}#{n}", f"line {n}")
                continue
            if not raw.strip():
                continue
            content = True
            yield from self._json_record(uri, raw, n, "line")
        if not content:
            yield self._dead(uri, None, "empty_file", "the file holds only whitespace")

    def _json(self, uri: str, readable, limit: int, digest: FileDigest) -> Iterator:
        """A JSON array: one record per element; another document that parses whole: one record;
        anything else: JSON Lines."""
        with open_limited(readable, limit, strip_bom=True) as fh:
            first = b""
            for block in iter(lambda: fh.read(1 << 16), b""):
                first = block.lstrip()[:1]
                if first:
                    break
        if not first:
            yield self._dead(uri, None, "empty_file", "the file holds only whitespace")
            return
        if first == b"[":
            with open_limited(readable, limit, strip_bom=True) as fh:
                for n, raw in json_array_elements(fh, self._max_value):
                    if raw is None:
                        yield self._too_large(uri, f"{uri}#{n}", f"array element {n}")
                    else:
                        yield from self._json_record(uri, raw, n, "array element")
                digest.value = fh.digest()
            return
        try:
            with open_limited(readable, limit and min(limit, self._max_value) or self._max_value, strip_bom=True) as fh:
                whole = fh.read()
                digest.value = fh.digest()
            row = json.loads(whole.decode("utf-8"))
        except (FileTooLarge, ValueError, RecursionError):  # too long for one note, or not one document
            with open_limited(readable, limit, strip_bom=True) as fh:
                yield from self._jsonl(uri, fh)
                digest.value = fh.digest()
            return
        if not isinstance(row, dict):
            yield self._dead(uri, f"{uri}#1", "malformed_json", "the document is not a JSON object or array")
            return
        yield from self._field_note(uri, row, 1)

    def _json_record(self, uri: str, raw: bytes, n: int, what: str) -> Iterator:
        line, error = _utf8(raw)
        if error:
            yield self._dead(uri, f"{uri}#{n}", "invalid_utf8", f"{what} {n}: {error}")
            return
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            yield self._dead(uri, f"{uri}#{n}", "malformed_json", f"{what} {n} is not a JSON object")
            return
        yield from self._field_note(uri, row, n)

    def _csv(self, uri: str, fh, delimiter: str | None) -> Iterator:
        csv.field_size_limit(max(csv.field_size_limit(), self.max_note_bytes + 1))
        lines = _CsvLines(bounded_lines(fh, self._max_value))
        header_line = None
        for _, raw in lines.lines:  # blank lines before the header are skipped
            if raw is None:
                yield self._dead(uri, None, "malformed_csv_row", "the header line is over the line limit; no row was read")
                return
            if raw.strip():
                header_line = raw.decode("utf-8", "surrogateescape") + "\n"
                break
        if header_line is None:
            yield self._dead(uri, None, "empty_file", "the file holds only whitespace")
            return
        lines.pushed = header_line
        reader = csv.reader(lines, delimiter=delimiter or _sniff_delimiter(header_line), strict=True)
        header: list[str] | None = None
        n = 0
        while True:
            n += 1 if header is not None else 0
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, _LineTooLong) as exc:
                if header is None:
                    yield self._dead(uri, None, "malformed_csv_row", "the header row cannot be parsed; no row was read")
                    return
                kind = ("note_too_large" if isinstance(exc, _LineTooLong) or "field larger" in str(exc)
                        else "malformed_csv_row")
                yield self._dead(uri, f"{uri}#{n}", kind, f"row {n} (line {reader.line_num}) cannot be parsed"
                                 + (f": a field is over the {self.max_note_bytes}-byte note limit" if kind == "note_too_large" else ""))
                continue
            if header is None:
                header = [c.strip() for c in cells]
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
            yield from self._field_note(uri, row, n, text_cells=True)

    def _parquet_file(self, uri: str, readable, compressed: bool, digest: FileDigest) -> Iterator:
        if compressed:  # Parquet needs random access: inflated to a spool file (memory up to 64 MiB, then disk)
            import shutil
            import tempfile

            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
                with open_limited(readable, self.max_file_bytes) as fh:
                    shutil.copyfileobj(fh, spool, 1 << 20)
                spool.seek(0)
                yield from self._parquet(uri, spool)
            return
        with readable.open(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            yield from self._parquet(uri, fh)
        digest.value = file_digest(readable)

    def _parquet(self, uri: str, fh) -> Iterator:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(fh)
            groups = [table.metadata.row_group(i).num_rows for i in range(table.metadata.num_row_groups)]
        except Exception as exc:  # noqa: BLE001 - no footer, a footer that is not Parquet's: the whole file
            yield self._dead(uri, None, "malformed_parquet", describe(exc, "not a readable Parquet file"))
            return
        first = 0
        for i, rows in enumerate(groups):
            n = first
            try:
                for batch in table.iter_batches(batch_size=1024, row_groups=[i]):
                    for row in self._batch_rows(batch):
                        n += 1
                        if isinstance(row, dict):
                            yield from self._field_note(uri, row, n)
                        else:
                            yield self._dead(uri, f"{uri}#{n}", row[0], row[1].format(n=n))
            except Exception as exc:  # noqa: BLE001 - a corrupt row group: its (other) rows, one dead letter
                yield self._dead(uri, f"{uri}#rowgroup{i}", "malformed_parquet",
                                 describe(exc, f"row group {i} (rows {n + 1} to {first + rows}) cannot be read"))
            first += rows

    @staticmethod
    def _batch_rows(batch) -> Iterator:
        """The rows of a record batch as dicts; where the batch cannot be converted, row by row, a
        row that cannot be is (error_type, message) instead."""
        try:
            yield from batch.to_pylist()
            return
        except Exception:  # noqa: BLE001 - one bad value (a string column holding bytes that are not UTF-8)
            pass
        for j in range(batch.num_rows):
            try:
                yield batch.slice(j, 1).to_pylist()[0]
            except UnicodeDecodeError:
                yield ("invalid_utf8", "row {n}: a string column holds bytes that are not valid UTF-8")
            except Exception as exc:  # noqa: BLE001
                yield ("malformed_parquet", describe(exc, "row {n} cannot be converted"))

    # -- records -------------------------------------------------------------------------------
    def _row_id(self, uri: str, row: dict, n: int) -> str:
        if self.id_field:
            value = row.get(self.id_field)
            if isinstance(value, str) and value and not _has_surrogates(value):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
        return f"{uri}#{n}"

    def _field_note(self, uri: str, row: dict, n: int, text_cells: bool = False) -> Iterator:
        rid = self._row_id(uri, row, n)
        if self.id_field:
            value = row.get(self.id_field)
            if isinstance(value, str) and _has_surrogates(value):
                yield self._dead(uri, rid, "invalid_utf8", f"record {n}: field {self.id_field!r} is not valid Unicode "
                                                           "(a lone surrogate escape)")
                return
            if value is not None and not isinstance(value, str) and (isinstance(value, bool) or not isinstance(value, int)):
                yield self._dead(uri, rid, "bad_field_type", f"record {n}: field {self.id_field!r} is a "
                                                             f"{type(value).__name__}, not text or a whole number")
                return
        if self.text_field not in row:
            yield self._dead(uri, rid, "missing_field", f"record {n} has no field {self.text_field!r}")
            return
        value = row[self.text_field]
        if isinstance(value, (bytes, bytearray)):  # a binary column (Spark writes strings so without its option)
            value, error = _utf8(bytes(value))
            if error:
                yield self._dead(uri, rid, "invalid_utf8", f"record {n}: field {self.text_field!r}: {error}")
                return
        if value is not None and not isinstance(value, str):
            yield self._dead(uri, rid, "bad_field_type", f"record {n}: field {self.text_field!r} is a "
                                                         f"{type(value).__name__}, not text")
            return
        if value is not None and _has_surrogates(value):
            yield self._dead(uri, rid, "invalid_utf8", f"record {n}: field {self.text_field!r} is not valid Unicode "
                                                       "(a lone surrogate escape)")
            return
        yield from self._note(uri, rid, value, None, row, text_cells)

    def _note(self, uri: str, rid: str, text: str | None, error: str | None, row: dict | None = None,
              text_cells: bool = False) -> Iterator:
        if error is not None:
            yield self._dead(uri, rid, "invalid_utf8", error)
            return
        if text is None or not text.strip():
            yield self._dead(uri, rid, "empty_note", "the note has no text")
            return
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
                ex = relation_example(row or {self.text_field: text}, "", self.text_field, "label", rid,
                                      text_offsets=text_cells)
            except Exception as exc:  # noqa: BLE001 - InputError has our words; anything else: its type only
                yield self._dead(uri, rid, "bad_entities", describe(exc, "" if isinstance(exc, InputError)
                                                                    else "the entity offsets cannot be read"))
                return
            text, entities = ex.text, ex.entities
        self.records_read.inc()
        yield InputRecord(record_id=rid, source_uri=uri, text=text, entities=entities)


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
