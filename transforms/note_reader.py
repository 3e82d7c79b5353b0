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

import json
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from epee.errors import InputError, describe

from .files import (DEAD, INPUTS, NAMESPACE, FileDigest, FileTooLarge, OpenFiles, _FileReader, compression_of,
                    content_size, file_digest, open_limited, read_bounded, record_uri, strip_compression)
from .note_parsing import NoteParser, Output, _binary, _CsvLines, _has_surrogates, _LineTooLong, _sniff_delimiter, _utf8
from .note_splitting import json_array_elements
from .records import DeadLetter

NOTE_FORMATS = ("jsonl", "json", "csv", "parquet", "txt")
_EXTENSIONS = ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv"), (".tsv", "csv"),
               (".tab", "csv"), (".parquet", "parquet"), (".txt", "txt"))
_TAB_NAMES = (".tsv", ".tab")
__all__ = ["NOTE_FORMATS", "NoteParser", "ParseNoteFile", "ReadNotes", "json_array_elements", "note_format",
           "read_bounded", "_CsvLines", "_LineTooLong", "_binary", "_has_surrogates", "_sniff_delimiter", "_utf8"]


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



class ParseNoteFile(_FileReader):
    """ReadableFile -> InputRecord per note, DeadLetter (tagged ``dead_letters``) per bad one.

    Every format is streamed (an archive file can be larger than memory; a compressed file's
    inflated size is counted first against ``max_file_bytes``); a plain-text note over
    ``max_note_bytes`` is refused unread; CSV files over ``max_file_bytes`` are refused unread. A
    bad record is a dead letter of its own (module docstring), and the other records of the same
    file are still read. This DoFn opens the file and picks the format; the parsing is
    :class:`~transforms.note_parsing.NoteParser`'s.
    """

    def __init__(self, task: str, text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", *, run_id: str, max_note_bytes: int = 1 << 20,
                 max_file_bytes: int = 1 << 30, previous: str | None = None, key_source=None) -> None:
        self.previous, self.key_source = previous, key_source
        self.task, self.text_field, self.id_field = task, text_field, id_field
        self.file_format, self.run_id = file_format, run_id
        self.max_note_bytes, self.max_file_bytes = max_note_bytes, max_file_bytes
        self.records_read = Metrics.counter(NAMESPACE, "records_read")

    def parser(self) -> NoteParser:
        return NoteParser(self.task, self.text_field, self.id_field, self.max_note_bytes, self.run_id)

    def read_file(self, readable: fileio.ReadableFile, digest: FileDigest) -> Iterator:
        """The file's records, and its dead letters tagged ``dead_letters``; each one counted."""
        for out in self._parse(self.parser(), readable, digest):
            self.records_read.inc()
            if isinstance(out, DeadLetter):
                Metrics.counter(NAMESPACE, f"dead_letters_{out.error_type}").inc()
                yield beam.pvalue.TaggedOutput(DEAD, out)
            else:
                yield out

    def _parse(self, p: NoteParser, readable: fileio.ReadableFile, digest: FileDigest) -> Iterator[Output]:
        uri, path = record_uri(readable), readable.metadata.path
        fmt = note_format(path, self.file_format)
        if fmt is None:
            yield p.dead(uri, None, "unsupported_format", "file type is not one of .jsonl, .ndjson, .json, .csv, "
                                                          ".tsv, .parquet, .txt (each also compressed: .gz, .bz2, "
                                                          ".xz, .zst, .deflate)")
            return
        compressed = compression_of(path) != CompressionTypes.UNCOMPRESSED
        size = readable.metadata.size_in_bytes or 0
        try:
            if compressed:  # one pass that keeps nothing: the inflated size, before any of it is parsed
                size, digest.value = content_size(readable, self.max_file_bytes)
            if size == 0:
                yield p.dead(uri, None, "empty_file", "the file is empty")
                return
            streamed_limit = self.max_file_bytes if compressed else 0  # JSONL, JSON, Parquet: no limit unless inflated
            if fmt == "jsonl":
                with open_limited(readable, streamed_limit, strip_bom=True) as fh:
                    yield from p.parse_jsonl(uri, fh)
                    digest.value = fh.digest()
            elif fmt == "json":
                yield from self._json(p, uri, readable, streamed_limit, digest)
            elif fmt == "csv":
                with open_limited(readable, self.max_file_bytes, strip_bom=True, size=size, what="CSV file") as fh:
                    yield from p.parse_csv(uri, fh, "\t" if strip_compression(path).lower().endswith(_TAB_NAMES) else None)
                    digest.value = fh.digest()
            elif fmt == "parquet":
                yield from self._parquet_file(p, uri, readable, compressed, digest)
            else:
                yield from self._txt(p, uri, readable, size, digest)
        except InputError as exc:  # too large once inflated, a corrupt compressed stream: the (rest of the) file
            inflated = compressed and exc.error_type == "file_too_large"
            yield p.dead(uri, None, exc.error_type, describe(exc, "") + (" (once decompressed)" if inflated else ""))
        except Exception as exc:  # noqa: BLE001 - storage errors: the file (or its rest) is one unreadable record
            yield p.dead(uri, None, "read_error", describe(exc, "could not read file"))

    # -- opening the file, per format -----------------------------------------------------------
    def _txt(self, p: NoteParser, uri: str, readable, size: int, digest: FileDigest) -> Iterator:
        try:
            with open_limited(readable, self.max_note_bytes, strip_bom=True, size=size) as fh:
                data = fh.read()
                digest.value = fh.digest()
        except FileTooLarge as exc:  # refused unread when its size was over already
            yield p.too_large(uri, uri, "the note" if exc.size is None else f"the note ({exc.size} bytes)")
            return
        text, error = _utf8(data)
        if error is None and not text.strip():
            yield p.dead(uri, None, "empty_file", "the file holds only whitespace")
            return
        yield from p.note(uri, uri, text, error)

    def _json(self, p: NoteParser, uri: str, readable, limit: int, digest: FileDigest) -> Iterator:
        """A JSON array: one record per element; another document that parses whole: one record;
        anything else: JSON Lines."""
        with open_limited(readable, limit, strip_bom=True) as fh:
            first = b""
            for block in iter(lambda: fh.read(1 << 16), b""):
                first = block.lstrip()[:1]
                if first:
                    break
        if not first:
            yield p.dead(uri, None, "empty_file", "the file holds only whitespace")
            return
        if first == b"[":
            with open_limited(readable, limit, strip_bom=True) as fh:
                for n, raw in json_array_elements(fh, p.max_value):
                    if raw is None:
                        yield p.too_large(uri, f"{uri}#{n}", f"array element {n}")
                    else:
                        yield from p.parse_json_value(uri, raw, n, "array element")
                digest.value = fh.digest()
            return
        try:
            with open_limited(readable, limit and min(limit, p.max_value) or p.max_value, strip_bom=True) as fh:
                whole = fh.read()
                digest.value = fh.digest()
            row = json.loads(whole.decode("utf-8"))
        except (FileTooLarge, ValueError, RecursionError):  # too long for one note, or not one document
            with open_limited(readable, limit, strip_bom=True) as fh:
                yield from p.parse_jsonl(uri, fh)
                digest.value = fh.digest()
            return
        if not isinstance(row, dict):
            yield p.dead(uri, f"{uri}#1", "malformed_json", "the document is not a JSON object or array")
            return
        yield from p.field_note(uri, row, 1)


    def _parquet_file(self, p: NoteParser, uri: str, readable, compressed: bool, digest: FileDigest) -> Iterator:
        if compressed:  # Parquet needs random access: inflated to a spool file (memory up to 64 MiB, then disk)
            import shutil
            import tempfile

            with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
                with open_limited(readable, self.max_file_bytes) as fh:
                    shutil.copyfileobj(fh, spool, 1 << 20)
                spool.seek(0)
                yield from p.parse_parquet(uri, spool)
            return
        with readable.open(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            yield from p.parse_parquet(uri, fh)
        digest.value = file_digest(readable)



class ReadNotes(beam.PTransform):
    """File pattern -> notes (main output) and dead letters (``dead_letters``)."""

    def __init__(self, pattern: str, task: str = "sequence", text_field: str = "text", id_field: str | None = None,
                 file_format: str = "auto", *, run_id: str, **limits) -> None:
        super().__init__()
        self.pattern = pattern
        self.parse = ParseNoteFile(task, text_field, id_field, file_format, run_id=run_id, **limits)

    def expand(self, pbegin):
        return (
            pbegin
            | "Files" >> OpenFiles(self.pattern)
            | "Parse" >> beam.ParDo(self.parse).with_outputs(DEAD, INPUTS, main="records")
        )
