"""Reading a file's bytes, bounded: decompression in bounded steps, byte limits, hashing.

Compressed files: a name ending in one of Beam's compression suffixes (``.gz``, ``.bz2``,
``.deflate``, ``.zst``/``.zstd``, ``.xz``/``.lzma``, what ``CompressionTypes.AUTO`` detects) is
decompressed, and its format is that of the name without the suffix (``notes.jsonl.gz`` is JSONL).
We inflate ourselves, never through Beam's ``CompressedFile``: it inflates each 16 MiB it reads
from storage in one call, so a 1.5 MB gzip of 1 GiB is 1 GiB in memory before anyone can count.
:class:`LimitedReader` asks the decompressor for at most the bytes it was asked for, counts what
comes out and stops with :class:`FileTooLarge` past the limit, before anything larger is held.
Messages are written by us and never quote the input.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import zlib
from typing import Iterator

from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes

from epee.errors import InputError

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
    """More content than the limit (after decompression): the reader stopped before holding it.
    ``size``: the content's size where it was known before reading (then nothing was read)."""

    def __init__(self, limit: int, what: str = "the file's content", size: int | None = None) -> None:
        over = "is over" if size is None else f"is {size} bytes, over"
        super().__init__("file_too_large", f"{what} {over} the {limit}-byte limit (--max_file_bytes); not read")
        self.limit, self.size = limit, size


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
def open_limited(readable: fileio.ReadableFile, limit: int = 0, strip_bom: bool = False, size: int | None = None,
                 what: str = "file") -> Iterator[LimitedReader]:
    """``with open_limited(readable, limit) as fh:`` the file's content (decompressed by the
    name's suffix), at most ``limit`` bytes of it (0: no limit), as a :class:`LimitedReader`.

    The one place a reader's byte limit is applied: ``size``, the content's size where the caller
    knows it (an uncompressed file's stored size, a compressed one's :func:`content_size`), over
    ``limit`` is :class:`FileTooLarge` (``what is N bytes, over ...``) before the file is opened;
    otherwise the reader counts what comes out and stops past ``limit`` (a file that grew, a
    stream whose size is not known)."""
    if limit and size is not None and size > limit:
        raise FileTooLarge(limit, what, size)
    with readable.open(mime_type="application/octet-stream", compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        yield LimitedReader(raw, compression_of(readable.metadata.path), limit, strip_bom)


def read_limited(readable: fileio.ReadableFile, limit: int, strip_bom: bool = False) -> tuple[bytearray, str]:
    """(the whole content, decompressed by the name's suffix, the SHA-256 of the stored file):
    for a reader that needs a file in memory (the DICOM reader, ``.dcm.gz`` included). Raises
    :class:`FileTooLarge` as soon as the content passes ``limit`` bytes (never more than
    ``limit`` plus one 1 MiB step held), :class:`BadCompression` for a corrupt stream, and the
    storage's own errors. A ``bytearray``, grown in place: no second copy of the content.

    A file whose stored size is over ``limit`` is refused unread (``file is N bytes, over ...``).
    A compressed file is counted first (:func:`content_size`, keeping nothing): a bomb that
    inflates past ``limit`` is refused having held one step, not ``limit`` bytes."""
    stored = readable.metadata.size_in_bytes or 0
    if limit and stored <= limit and compression_of(readable.metadata.path) != CompressionTypes.UNCOMPRESSED:
        content_size(readable, limit)  # raises FileTooLarge / BadCompression
    data = bytearray()
    with open_limited(readable, limit, strip_bom, size=stored) as fh:
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
