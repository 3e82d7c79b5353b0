"""Parsing notes, as pure functions of bytes and rows: each yields an :class:`InputRecord` per
note and a :class:`DeadLetter` per bad one, in input order; no Beam, no metrics, no storage
(:class:`transforms.note_reader.ParseNoteFile` opens the files, counts and tags the outputs).
The rules are those of :mod:`transforms.note_reader`'s docstring. Messages are written by us and
never quote the input.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from typing import Iterator

from epee.errors import InputError, describe

from .note_splitting import bounded_lines
from .records import DeadLetter, InputRecord

Output = InputRecord | DeadLetter


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


@dataclass(frozen=True)
class NoteParser:
    """The records of one note file's content, from binary streams (JSON Lines, CSV, Parquet),
    one JSON value or one row: each method yields :data:`Output` in input order."""

    task: str  # "relation" reads the entity offsets of each row as well
    text_field: str
    id_field: str | None
    max_note_bytes: int
    run_id: str

    @property
    def max_value(self) -> int:
        # a line or JSON value holds a note plus its other fields and JSON escapes: twice the note limit
        return 2 * self.max_note_bytes + 4096

    def dead(self, uri: str, rid: str | None, error_type: str, message: str, stage: str = "read") -> DeadLetter:
        return DeadLetter(uri, rid, stage, error_type, message, self.run_id)

    def too_large(self, uri: str, rid: str, what: str) -> DeadLetter:
        return self.dead(uri, rid, "note_too_large", f"{what} is over the {self.max_note_bytes}-byte note limit "
                                                    "(--max_note_bytes); not read")

    def parse_jsonl(self, uri: str, fh) -> Iterator:
        content = False
        for n, raw in bounded_lines(fh, self.max_value):
            if raw is None:
                content = True
                yield self.too_large(uri, f"{uri}#{n}", f"line {n}")
                continue
            if not raw.strip():
                continue
            content = True
            yield from self.parse_json_value(uri, raw, n, "line")
        if not content:
            yield self.dead(uri, None, "empty_file", "the file holds only whitespace")


    def parse_json_value(self, uri: str, raw: bytes, n: int, what: str) -> Iterator:
        line, error = _utf8(raw)
        if error:
            yield self.dead(uri, f"{uri}#{n}", "invalid_utf8", f"{what} {n}: {error}")
            return
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            yield self.dead(uri, f"{uri}#{n}", "malformed_json", f"{what} {n} is not a JSON object")
            return
        yield from self.field_note(uri, row, n)


    def parse_csv(self, uri: str, fh, delimiter: str | None) -> Iterator:
        csv.field_size_limit(max(csv.field_size_limit(), self.max_note_bytes + 1))
        lines = _CsvLines(bounded_lines(fh, self.max_value))
        header_line = None
        for _, raw in lines.lines:  # blank lines before the header are skipped
            if raw is None:
                yield self.dead(uri, None, "malformed_csv_row", "the header line is over the line limit; no row was read")
                return
            if raw.strip():
                header_line = raw.decode("utf-8", "surrogateescape") + "\n"
                break
        if header_line is None:
            yield self.dead(uri, None, "empty_file", "the file holds only whitespace")
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
                    yield self.dead(uri, None, "malformed_csv_row", "the header row cannot be parsed; no row was read")
                    return
                kind = ("note_too_large" if isinstance(exc, _LineTooLong) or "field larger" in str(exc)
                        else "malformed_csv_row")
                yield self.dead(uri, f"{uri}#{n}", kind, f"row {n} (line {reader.line_num}) cannot be parsed"
                                + (f": a field is over the {self.max_note_bytes}-byte note limit" if kind == "note_too_large" else ""))
                continue
            if header is None:
                header = [c.strip() for c in cells]
                if any(_has_surrogates(c) for c in header):
                    yield self.dead(uri, None, "invalid_utf8", "CSV header is not valid UTF-8; no row was read")
                    return
                continue
            if not cells:
                n -= 1
                continue
            if len(cells) != len(header):
                yield self.dead(uri, f"{uri}#{n}", "malformed_csv_row", f"row {n} has {len(cells)} fields, header has {len(header)}")
                continue
            row = dict(zip(header, cells))
            if any(_has_surrogates(c) for c in cells):
                yield self.dead(uri, self.row_id(uri, {k: v for k, v in row.items() if not _has_surrogates(v)}, n),
                                "invalid_utf8", f"row {n} is not valid UTF-8")
                continue
            yield from self.field_note(uri, row, n, text_cells=True)


    def parse_parquet(self, uri: str, fh) -> Iterator:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(fh)
            groups = [table.metadata.row_group(i).num_rows for i in range(table.metadata.num_row_groups)]
        except Exception as exc:  # noqa: BLE001 - no footer, a footer that is not Parquet's: the whole file
            yield self.dead(uri, None, "malformed_parquet", describe(exc, "not a readable Parquet file"))
            return
        first = 0
        for i, rows in enumerate(groups):
            n = first
            try:
                for batch in table.iter_batches(batch_size=1024, row_groups=[i]):
                    for row in self.batch_rows(batch):
                        n += 1
                        if isinstance(row, dict):
                            yield from self.field_note(uri, row, n)
                        else:
                            yield self.dead(uri, f"{uri}#{n}", row[0], row[1].format(n=n))
            except Exception as exc:  # noqa: BLE001 - a corrupt row group: its (other) rows, one dead letter
                yield self.dead(uri, f"{uri}#rowgroup{i}", "malformed_parquet",
                                 describe(exc, f"row group {i} (rows {n + 1} to {first + rows}) cannot be read"))
            first += rows

    @staticmethod
    def batch_rows(batch) -> Iterator:
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


    def row_id(self, uri: str, row: dict, n: int) -> str:
        if self.id_field:
            value = row.get(self.id_field)
            if isinstance(value, str) and value and not _has_surrogates(value):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
        return f"{uri}#{n}"

    def field_note(self, uri: str, row: dict, n: int, text_cells: bool = False) -> Iterator:
        rid = self.row_id(uri, row, n)
        if self.id_field:
            value = row.get(self.id_field)
            if isinstance(value, str) and _has_surrogates(value):
                yield self.dead(uri, rid, "invalid_utf8", f"record {n}: field {self.id_field!r} is not valid Unicode "
                                                          "(a lone surrogate escape)")
                return
            if value is not None and not isinstance(value, str) and (isinstance(value, bool) or not isinstance(value, int)):
                yield self.dead(uri, rid, "bad_field_type", f"record {n}: field {self.id_field!r} is a "
                                                            f"{type(value).__name__}, not text or a whole number")
                return
        if self.text_field not in row:
            yield self.dead(uri, rid, "missing_field", f"record {n} has no field {self.text_field!r}")
            return
        value = row[self.text_field]
        if isinstance(value, (bytes, bytearray)):  # a binary column (Spark writes strings so without its option)
            value, error = _utf8(bytes(value))
            if error:
                yield self.dead(uri, rid, "invalid_utf8", f"record {n}: field {self.text_field!r}: {error}")
                return
        if value is not None and not isinstance(value, str):
            yield self.dead(uri, rid, "bad_field_type", f"record {n}: field {self.text_field!r} is a "
                                                        f"{type(value).__name__}, not text")
            return
        if value is not None and _has_surrogates(value):
            yield self.dead(uri, rid, "invalid_utf8", f"record {n}: field {self.text_field!r} is not valid Unicode "
                                                      "(a lone surrogate escape)")
            return
        yield from self.note(uri, rid, value, None, row, text_cells)

    def note(self, uri: str, rid: str, text: str | None, error: str | None, row: dict | None = None,
              text_cells: bool = False) -> Iterator:
        if error is not None:
            yield self.dead(uri, rid, "invalid_utf8", error)
            return
        if text is None or not text.strip():
            yield self.dead(uri, rid, "empty_note", "the note has no text")
            return
        if len(text) > self.max_note_bytes:
            yield self.too_large(uri, rid, "the note")
            return
        if _binary(text):
            yield self.dead(uri, rid, "binary_content", "the note holds NUL bytes or mostly control characters")
            return
        entities = None
        if self.task == "relation":
            from epee.data import relation_example

            try:
                ex = relation_example(row or {self.text_field: text}, "", self.text_field, "label", rid,
                                      text_offsets=text_cells)
            except Exception as exc:  # noqa: BLE001 - InputError has our words; anything else: its type only
                yield self.dead(uri, rid, "bad_entities", describe(exc, "" if isinstance(exc, InputError)
                                                                    else "the entity offsets cannot be read"))
                return
            text, entities = ex.text, ex.entities
        yield InputRecord(record_id=rid, source_uri=uri, text=text, entities=entities)
