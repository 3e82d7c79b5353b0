"""What both readers (:mod:`transforms.note_reader`, :mod:`transforms.dicom_reader`) do per file
besides parsing: the ``inputs`` table row of each file, ``--skip_processed``, and the dead letter
of a matched entry that is not a file. Every record that a reader attempts ends up either as an
:class:`InputRecord` or as a :class:`DeadLetter`; nothing is dropped.

The bounded reading lives in :mod:`transforms.bounded_io`, the matching in
:mod:`transforms.matching`; their names are importable from here too.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from .bounded_io import (BOM, BadCompression, FileTooLarge, LimitedReader, compression_of, content_size, file_digest,
                         open_limited, read_bounded, read_limited, record_uri, strip_compression)
from .matching import NotAFile, OpenFiles, _MatchFn, local_problems
from .note_splitting import bounded_lines
from .records import DeadLetter, InputFile

log = logging.getLogger(__name__)

DEAD = "dead_letters"
INPUTS = "inputs"
NAMESPACE = "epee"

__all__ = ["BOM", "DEAD", "INPUTS", "NAMESPACE", "BadCompression", "FileDigest", "FileTooLarge", "LimitedReader",
           "NotAFile", "OpenFiles", "bounded_lines", "compression_of", "content_size", "file_digest",
           "load_processed", "local_problems", "open_limited", "read_bounded", "read_limited", "record_uri",
           "strip_compression", "_FileReader", "_MatchFn"]


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
        yield from self.per_file(readable, self.read_and_record)

    def per_file(self, readable: fileio.ReadableFile, handle: Callable[[fileio.ReadableFile, str, str | None], Iterator]
                 ) -> Iterator:
        """The steps every reader takes for one matched entry: an entry that is not a file is one
        ``read_error`` and its ``inputs`` row; a file unchanged since ``--skip_processed``'s run is
        its ``skipped`` row; any other file is ``handle(readable, uri, digest)`` (digest: the hash
        the skip check computed, or None), which yields its outputs and its ``inputs`` row."""
        uri = record_uri(readable)
        if isinstance(readable.metadata, NotAFile):
            yield self.not_a_file(uri, readable.metadata.why)
            yield beam.pvalue.TaggedOutput(INPUTS, self._input_row(uri, readable, None, "processed", 1))
            return
        digest, skipped = self._skip_check(readable)
        if skipped is not None:
            yield skipped
            return
        yield from handle(readable, uri, digest)

    def read_and_record(self, readable: fileio.ReadableFile, uri: str, digest: str | None) -> Iterator:
        """:meth:`read_file`'s outputs, then the file's ``inputs`` row counting them."""
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
                   records: int) -> InputFile:
        """The ``inputs`` record of one file (written as a row of ``INPUTS_SCHEMA``)."""
        return InputFile(self._uri_key(uri), int(readable.metadata.size_in_bytes or 0), digest, status, records,
                         self.run_id)

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
