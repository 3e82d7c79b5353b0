"""Reading files from storage, bounded: matching and spreading the files over the workers, reading
with byte limits (decompression included), hashing, the ``inputs`` table row of each file and
``--skip_processed``.

Both readers (:mod:`transforms.note_reader`, :mod:`transforms.dicom_reader`) build on this.
Every record that a reader attempts ends up either as an :class:`InputRecord` or as a
:class:`DeadLetter`; nothing is dropped. Messages are written by us and never quote the input.

Compressed files: a name ending in one of Beam's compression suffixes (``.gz``, ``.bz2``,
``.deflate``, ``.zst``/``.zstd``, ``.xz``/``.lzma``, what ``CompressionTypes.AUTO`` detects) is
decompressed, and its format is that of the name without the suffix (``notes.jsonl.gz`` is JSONL).
We inflate ourselves, never through Beam's ``CompressedFile``: it inflates each 16 MiB it reads
from storage in one call, so a 1.5 MB gzip of 1 GiB is 1 GiB in memory before anyone can count.
:class:`LimitedReader` asks the decompressor for at most the bytes it was asked for, counts what
comes out and stops with :class:`FileTooLarge` past the limit, before anything larger is held.
"""

from __future__ import annotations

import bz2
import contextlib
import fnmatch
import hashlib
import logging
import lzma
import os
import re
import zlib
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata, FileSystem
from apache_beam.metrics import Metrics

from epee.errors import InputError

log = logging.getLogger(__name__)

DEAD = "dead_letters"
INPUTS = "inputs"
NAMESPACE = "epee"
BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 20  # bytes of content per read of the readers (and the most one inflate step yields)
_RAW_CHUNK = 1 << 16  # compressed bytes fed to a decompressor at a time


def record_uri(readable: fileio.ReadableFile) -> str:
    """The file's path as every output and log carries it (:func:`transforms.privacy.printable`:
    valid UTF-8 whatever bytes the name has); open the file with ``readable`` itself, never by
    this text."""
    from .privacy import printable

    return printable(readable.metadata.path)


# -- compression -----------------------------------------------------------------------------------
class FileTooLarge(InputError):
    """More content than the limit (after decompression): the reader stopped before holding it."""

    def __init__(self, limit: int, what: str = "the file's content") -> None:
        super().__init__("file_too_large", f"{what} is over the {limit}-byte limit (--max_file_bytes); not read")
        self.limit = limit


class BadCompression(InputError):
    """The compressed stream is corrupt, cut short or of another kind than its name says."""

    def __init__(self, exc: BaseException | None = None) -> None:
        why = f" ({type(exc).__name__})" if exc is not None else ""
        super().__init__("bad_compression", f"the compressed stream is corrupt or cut short{why}")


def compression_of(path: str) -> str:
    """Beam's compression type for the name (``CompressionTypes.UNCOMPRESSED`` when none), the
    rule ``ReadableFile.open()`` applies by default."""
    return CompressionTypes.detect_compression_type(path)


def strip_compression(path: str) -> str:
    """The name without its compression suffix: ``a/notes.jsonl.gz`` -> ``a/notes.jsonl``."""
    if compression_of(path) == CompressionTypes.UNCOMPRESSED:
        return path
    return path[: path.rfind(".")]


class _Inflate:
    """Decompressed bytes of a raw binary stream, at most ``n`` per ``read(n)``: the decompressor
    is never asked for more (zlib's, bz2's and lzma's ``max_length``; zstd's stream reader).
    Concatenated streams (multi-member gzip, bzip2) are read on, as Beam does."""

    def __init__(self, raw, kind: str) -> None:
        self.raw, self.kind = raw, kind
        self._in, self._done = b"", False
        self._zstd = None
        if kind == CompressionTypes.ZSTD:
            import zstandard

            self._zstd = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
                raw, read_size=_RAW_CHUNK, read_across_frames=True)
        else:
            self._new()

    def _new(self) -> None:
        if self.kind == CompressionTypes.GZIP:
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.kind == CompressionTypes.DEFLATE:
            self._d = zlib.decompressobj()
        elif self.kind == CompressionTypes.BZIP2:
            self._d = bz2.BZ2Decompressor()
        elif self.kind == CompressionTypes.LZMA:
            self._d = lzma.LZMADecompressor()
        else:
            raise ValueError(f"unknown compression type {self.kind!r}")
        self._fresh = True  # nothing fed to this decompressor yet

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except InputError:
            raise
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
            raise BadCompression(exc) from None
        except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError and the like
            if type(exc).__module__.startswith("zstandard"):
                raise BadCompression(exc) from None
            raise

    def _read(self, n: int) -> bytes:
        if self._zstd is not None:
            return self._zstd.read(n)
        out: list[bytes] = []
        want = n
        zlib_kind = self.kind in (CompressionTypes.GZIP, CompressionTypes.DEFLATE)
        while want > 0 and not self._done:
            at_end = False
            if not self._in and (zlib_kind or self._d.needs_input):
                self._in = self.raw.read(_RAW_CHUNK)
                if not self._in:
                    if self._fresh:  # the end of the file between two streams (or an empty file)
                        self._done = True
                        break
                    at_end = True
            block = self._d.decompress(self._in, want)
            self._fresh = False
            self._in = self._d.unconsumed_tail if zlib_kind else b""
            if block:
                out.append(block)
                want -= len(block)
            if self._d.eof:
                rest = self._d.unused_data  # (zlib keeps it in unconsumed_tail too)
                self._new()
                self._in = rest
            elif at_end and not block:
                raise BadCompression()  # the file ends inside a stream
        return b"".join(out)


class LimitedReader:
    """The content of a file as a binary reader: decompressed when the name says so, a UTF-8 BOM
    at its start dropped when ``strip_bom``; ``read(n)`` gives at most ``n`` bytes and raises
    :class:`FileTooLarge` once more than ``limit`` bytes came out (0: no limit). ``digest()``: the
    SHA-256 of the file's stored (compressed) bytes read so far, which is the whole file's once
    the content has been read to its end."""

    def __init__(self, raw, compression: str, limit: int = 0, strip_bom: bool = False) -> None:
        self._raw = _HashingReader(raw)
        self._inflate = None if compression == CompressionTypes.UNCOMPRESSED else _Inflate(self._raw, compression)
        self.limit, self.total, self._bom = limit, 0, strip_bom
        self.eof = False

    def _take(self, n: int) -> bytes:
        return self._inflate.read(n) if self._inflate is not None else self._raw.read(n)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(_READ_CHUNK), b""))
        block = self._take(n)
        if self._bom:
            self._bom = False
            while len(block) < 3 and block == BOM[: len(block)] and block:
                more = self._take(3 - len(block))
                if not more:
                    break
                block += more
            if block.startswith(BOM):
                block = block[3:] or self._take(n)
        if not block:
            self.eof = True
        self.total += len(block)
        if self.limit and self.total > self.limit:
            raise FileTooLarge(self.limit)
        return block

    def digest(self) -> str:
        return self._raw.hexdigest()


@contextlib.contextmanager
def open_limited(readable: fileio.ReadableFile, limit: int = 0, strip_bom: bool = False) -> Iterator[LimitedReader]:
    """``with open_limited(readable, limit) as fh:`` the file's content (decompressed by the
    name's suffix), at most ``limit`` bytes of it (0: no limit), as a :class:`LimitedReader`."""
    with readable.open(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        yield LimitedReader(raw, compression_of(readable.metadata.path), limit, strip_bom)


def read_limited(readable: fileio.ReadableFile, limit: int, strip_bom: bool = False) -> tuple[bytearray, str]:
    """(the whole content, decompressed by the name's suffix, the SHA-256 of the stored file):
    for a reader that needs a file in memory (the DICOM reader, ``.dcm.gz`` included). Raises
    :class:`FileTooLarge` as soon as the content passes ``limit`` bytes (never more than
    ``limit`` plus one 1 MiB step held), :class:`BadCompression` for a corrupt stream, and the
    storage's own errors. A ``bytearray``, grown in place: no second copy of the content.

    A compressed file is counted first (:func:`content_size`, keeping nothing): a bomb that
    inflates past ``limit`` is refused having held one step, not ``limit`` bytes."""
    if limit and compression_of(readable.metadata.path) != CompressionTypes.UNCOMPRESSED:
        content_size(readable, limit)  # raises FileTooLarge / BadCompression
    data = bytearray()
    with open_limited(readable, limit, strip_bom) as fh:
        for block in iter(lambda: fh.read(_READ_CHUNK), b""):
            data += block
        return data, fh.digest()


def content_size(readable: fileio.ReadableFile, limit: int) -> tuple[int, str]:
    """(content bytes, SHA-256 of the stored file), counted in one pass that keeps nothing:
    a compressed file's inflated size before any of it is parsed. Raises as :func:`read_limited`."""
    with open_limited(readable, limit) as fh:
        total = 0
        for block in iter(lambda: fh.read(_READ_CHUNK), b""):
            total += len(block)
        return total, fh.digest()


# -- bounded reading -------------------------------------------------------------------------------
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
        start = 0
        while True:
            cut = buf.find(b"\n", start)
            if cut < 0:
                break
            line = buf[start:cut]
            start = cut + 1
            n += 1
            yield n, (None if skipping or len(line) > max_line else line)
            skipping = False
        buf = buf[start:]
        if len(buf) > max_line:  # inside an over-long line: drop what we have, remember it
            buf, skipping = b"", True
    if buf or skipping:
        n += 1
        yield n, (None if skipping or len(buf) > max_line else buf)


def read_bounded(fh, limit: int, size_hint: int | None = None) -> bytes:
    """The file's bytes, or its first ``limit + 1`` when it is longer than ``limit`` (0: no limit).

    ``fh.read(limit + 1)`` would allocate ``limit + 1`` bytes (1 GiB by default) for every file
    before shrinking the result, about 25 us per small file; this reads the size the file is said
    to have, plus one byte, then on in chunks while the file turns out longer. For a file that may
    be compressed use :func:`read_limited`: ``fh`` here is read as it is."""
    if not limit:
        return fh.read()
    chunks = [fh.read(min(limit, size_hint) + 1 if size_hint else min(limit + 1, 1 << 20))]
    total = len(chunks[0])
    while total <= limit and chunks[-1]:  # until end of file (a stream may return short reads before it)
        chunks.append(fh.read(min(limit + 1 - total, 1 << 24)))
        total += len(chunks[-1])
    return b"".join(chunks)


def file_digest(readable: fileio.ReadableFile, chunk: int = 1 << 20) -> str:
    """SHA-256 of the file's stored bytes (a compressed file is hashed as stored, not inflated)."""
    h = hashlib.sha256()
    with readable.open(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED) as fh:
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


# -- per file: inputs rows, --skip_processed, entries that are not files ---------------------------
class FileDigest:
    """The SHA-256 of one file's stored bytes, handed to a reader's ``read_file`` for the one call:
    the pass that reads the whole file (:meth:`LimitedReader.digest`) records it, so the file is
    not read a second time to hash it. ``None`` until then (a file not read to its end)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: str | None = None


class _FileReader(beam.DoFn):
    """What both readers do per file besides parsing: the ``inputs`` table row (URI, size,
    SHA-256, records it gave, processed or skipped) and ``--skip_processed``: a file whose URI and
    content hash equal a previous run's is skipped (no records, an ``inputs`` row saying so).
    A matched entry that is not a readable file (:class:`NotAFile`) is one ``read_error``.

    ``previous``: the previous run's inputs table (Parquet glob) or None. ``key_source``: with
    ``--pseudonymize_ids``, URIs in the inputs table are HMACs (see transforms.privacy).
    """

    previous: str | None = None
    key_source = None

    def setup(self) -> None:
        self._seen: dict[str, str] = {}
        self._pz = None
        if self.key_source is not None:
            self._pz = self.key_source.pseudonymizer()  # also pseudonymises this worker's log records
        if self.previous:
            self._seen = load_processed(self.previous)

    def _uri_key(self, uri: str) -> str:
        return self._pz(uri) if self._pz else uri

    def process(self, readable: fileio.ReadableFile) -> Iterator:
        uri = record_uri(readable)
        if isinstance(readable.metadata, NotAFile):
            yield self.not_a_file(uri, readable.metadata.why)
            yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, None, "processed", 1))
            return
        digest, skipped = self._skip_check(readable)
        if skipped is not None:
            yield skipped
            return
        records = 0
        read_digest = FileDigest()
        for out in self.read_file(readable, read_digest):
            if not (isinstance(out, beam.pvalue.TaggedOutput) and out.tag != DEAD):
                records += 1
            yield out
        yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, digest or read_digest.value, "processed",
                                                               records))

    def not_a_file(self, uri: str, why: str):
        """The ``read_error`` dead letter of a matched entry that is not a readable file."""
        from .records import DeadLetter

        Metrics.counter(NAMESPACE, "records_read").inc()
        Metrics.counter(NAMESPACE, "dead_letters_read_error").inc()
        return beam.pvalue.TaggedOutput(DEAD, DeadLetter(uri, None, "read", "read_error", why, self.run_id))

    def _skip_check(self, readable: fileio.ReadableFile):
        """(digest or None, the ``inputs`` row of a file skipped as unchanged or None)."""
        if not self._seen:
            return None, None
        uri = record_uri(readable)
        try:
            digest = file_digest(readable)
        except Exception:  # noqa: BLE001 - unreadable: let the parser report it
            return None, None
        if self._seen.get(self._uri_key(uri)) == digest:
            Metrics.counter(NAMESPACE, "files_skipped_unchanged").inc()
            return digest, beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, digest, "skipped", 0))
        return digest, None

    def _input_row(self, uri: str, readable: fileio.ReadableFile, digest: str | None, status: str,
                   records: int) -> dict:
        """The ``inputs`` row (:class:`~transforms.records.InputFile`) of one file, as written."""
        from .records import InputFile

        return InputFile(self._uri_key(uri), int(readable.metadata.size_in_bytes or 0), digest, status, records,
                         self.run_id).to_row()

    def read_file(self, readable: fileio.ReadableFile, digest: FileDigest) -> Iterator:
        """The file's records and dead letters; sets ``digest.value`` where it reads the whole file."""
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


# -- matching --------------------------------------------------------------------------------------
class NotAFile(FileMetadata):
    """A matched entry that cannot be read as a file: a directory, a dangling symbolic link, a
    directory that cannot be listed. ``why``: our words, no path."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(path, 0)
        self.why = why

    def __reduce__(self):
        return NotAFile, (self.path, self.why)


def _pattern_parts(pattern: str) -> tuple[str, str]:
    """(the directory Beam's local match lists, the pattern) as Beam's ``LocalFileSystem`` sees them."""
    if pattern.endswith("/"):
        pattern += "*"
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    return os.path.dirname(prefix), pattern


def _may_hold_matches(directory: str, root: str, pattern: str) -> bool:
    """Could a file below ``directory`` (under ``root``) match ``pattern``? Component by
    component: Beam's ``*`` stays within a component, ``**`` crosses them."""
    rel = os.path.relpath(directory, root).split(os.sep) if directory != root else []
    parts = os.path.relpath(pattern, root).split(os.sep) if pattern.startswith(root + os.sep) else pattern.split(os.sep)
    for i, part in enumerate(rel):
        if i >= len(parts) - 1:
            return "**" in "".join(parts)
        if "**" in parts[i]:
            return True
        if not fnmatch.fnmatchcase(part, parts[i]):
            return False
    return True


def local_problems(pattern: str, matched: set[str]) -> list[NotAFile]:
    """The entries a local file pattern reaches that Beam's match drops without a word: matching
    directories (with no ``**`` in the pattern), dangling symbolic links and entries that cannot be
    stat'ed, links to directories under ``**`` (not followed), and directories that cannot be
    listed but could hold matching files. Local paths only (object stores have no such entries)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", pattern):
        return []
    root, pattern = _pattern_parts(pattern)
    problems: list[NotAFile] = []
    if not re.search(r"[\[*?]", pattern):  # a plain path: Beam matches it if it exists
        if os.path.lexists(pattern) and not os.path.exists(pattern):
            problems.append(NotAFile(pattern, "a symbolic link whose target does not exist"))
        return problems
    match = re.compile(FileSystem.translate_pattern(pattern)).match
    recursive = "**" in pattern
    unlisted: list[str] = []

    def onerror(exc: OSError) -> None:
        if exc.filename is not None:
            unlisted.append(os.fsdecode(exc.filename))

    if not root or not os.path.isdir(root):  # Beam lists nothing there either
        return problems
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) and recursive and _may_hold_matches(full, root, pattern):
                problems.append(NotAFile(full, "a symbolic link to a directory, not followed"))
            elif not recursive and match(full):
                problems.append(NotAFile(full, "a directory, not a file"))
        for name in filenames:
            full = os.path.join(dirpath, name)
            if full in matched or not match(full):
                continue
            try:
                os.stat(full)
            except OSError:
                problems.append(NotAFile(full, "a symbolic link whose target does not exist, or an entry that "
                                               "cannot be examined"))
    for d in unlisted:
        if d == root or _may_hold_matches(d, root, pattern):
            problems.append(NotAFile(d, "a directory that cannot be listed (permission denied or gone)"))
    return problems


class _MatchFn(beam.DoFn):
    """Beam's ``FileSystems.match`` for the pattern (what ``fileio.MatchFiles`` does), plus a
    :class:`NotAFile` for each entry it would drop silently (:func:`local_problems`)."""

    def process(self, pattern: str) -> Iterator[FileMetadata]:
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.io.fileio import EmptyMatchTreatment
        from apache_beam.io.filesystem import BeamIOError

        files = FileSystems.match([pattern])[0].metadata_list
        problems = local_problems(pattern, {m.path for m in files})
        if not files and not problems and not EmptyMatchTreatment.allow_empty_match(
                pattern, EmptyMatchTreatment.ALLOW_IF_WILDCARD):
            raise BeamIOError("Empty match for a pattern without wildcards. Disallowed.")
        yield from files
        yield from problems


class OpenFiles(beam.PTransform):
    """File pattern -> the matching files, opened (``ReadableFile``), spread over the workers.

    Matching yields every file from one element, and nothing in ``fileio`` splits: without the
    shuffle a runner fuses the reading, the model and everything up to the writes into one bundle
    on one worker, whatever the number of workers. Only file names are shuffled. Matched entries
    that are not readable files come along as :class:`NotAFile` (one ``read_error`` each)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin):
        return (
            pbegin
            | "Match" >> beam.Create([self.pattern])
            | "MatchAll" >> beam.ParDo(_MatchFn())
            | "Spread" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches()
        )
