"""Matching a file pattern and spreading the files over the workers, with an entry for every
matched path that is not a readable file (:class:`NotAFile`) instead of dropping it silently."""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import FileMetadata, FileSystem


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
