"""Reading files from storage, bounded: matching and spreading the files over the workers, reading
with byte limits, hashing, the ``inputs`` table row of each file and ``--skip_processed``.

Both readers (:mod:`transforms.note_reader`, :mod:`transforms.dicom_reader`) build on this.
Every record that a reader attempts ends up either as an :class:`InputRecord` or as a
:class:`DeadLetter`; nothing is dropped. Messages are written by us and never quote the input.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

log = logging.getLogger(__name__)

DEAD = "dead_letters"
INPUTS = "inputs"
NAMESPACE = "epee"


def record_uri(readable: fileio.ReadableFile) -> str:
    """The file's path as every output and log carries it (:func:`transforms.privacy.printable`:
    valid UTF-8 whatever bytes the name has); open the file with ``readable`` itself, never by
    this text."""
    from .privacy import printable

    return printable(readable.metadata.path)

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
            self._pz = self.key_source.pseudonymizer()  # also pseudonymises this worker's log records
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

