"""The commit: the steps that make a finished run's directory the current run.

:func:`commit` runs :data:`LOCAL_STEPS` or :data:`OBJECT_STORE_STEPS` in order; the one step
that makes the new run current is in :data:`COMMIT_POINTS` (an ``os.replace`` of a written and
fsynced manifest locally, a single-object PUT on an object store). Superseded directories are
removed only after it. :func:`discard` removes a failed run's directory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, replace
from typing import Callable

from apache_beam.io.filesystems import FileSystems

from transforms.report import REPORT_NAME

from .manifest import (
    MANIFEST_NAME, OUTPUT_KINDS, RUNS_DIR, _basename, _match, is_kind, is_local, read_manifest, run_files,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Commit:
    """What the steps of a commit work on; each step returns it updated."""

    output: str  # the --output prefix
    run_dir: str  # {output}/runs/<run id>-<nonce>, where the pipeline wrote
    manifest: dict  # the run's manifest; write_run_manifest adds "run_dir" and "outputs"
    report: bool = False  # report.html was written
    staged: str | None = None  # local file systems: the new current manifest, written beside it

    @property
    def relative_run_dir(self) -> str:
        return self.run_dir[len(self.output.rstrip("/")) + 1:]

    @property
    def manifest_bytes(self) -> bytes:
        return (json.dumps(self.manifest, indent=2, sort_keys=True, default=str) + "\n").encode()


def _os_path(path: str) -> str:
    return os.path.abspath(path)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Makes a directory's entries (a new file, a rename) durable: fsync alone does not on ext4/xfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(directory: str) -> dict[str, list[str]]:
    """{name: paths to delete to remove it} for each entry directly under ``directory``. Locally
    the entry itself (a directory is removed with its tree, an empty one too); on an object store,
    which has no directories, every object whose key continues ``directory/name/``."""
    directory = directory.rstrip("/")
    if is_local(directory):
        try:
            names = os.listdir(_os_path(directory))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {name: [f"{directory}/{name}"] for name in names}
    entries: dict[str, list[str]] = {}
    for path in _match(f"{directory}/**"):
        entries.setdefault(path[len(directory) + 1:].split("/", 1)[0], []).append(path)
    return entries


def _tree(directory: str) -> list[str]:
    """What to delete to remove ``directory`` and everything below it."""
    directory = directory.rstrip("/")
    if is_local(directory):
        return [directory] if os.path.lexists(_os_path(directory)) else []
    return _match(f"{directory}/**")


def _delete(paths: list[str]) -> None:
    for i in range(0, len(paths), 1000):  # an object store deletes up to 1000 keys a request
        FileSystems.delete(paths[i:i + 1000])


def tidy_run_dir(c: Commit) -> Commit:
    """Remove the writers' spill directories (``_runs-<kind>``, empty unless a retried bundle left
    a file), so the run directory holds the run's outputs only."""
    for name, paths in _entries(c.run_dir).items():
        if name.startswith("_runs-"):
            _delete(paths)
    return c


def write_run_report(c: Commit) -> Commit:
    """``report.html`` into the run directory. The report is for people: its failure is logged and
    leaves it out of the manifest, it does not fail the run."""
    from transforms.report import write_report

    try:
        write_report(c.run_dir, c.manifest)
    except Exception as exc:  # noqa: BLE001
        log.warning("run report not written (%s)", type(exc).__name__)
        return c
    return replace(c, report=True)


def write_run_manifest(c: Commit) -> Commit:
    """The run's own ``manifest.json``, in its directory: the run's outputs as paths relative to
    the prefix, and ``run_dir``. Once it is written the run directory is complete."""
    rel = c.relative_run_dir
    names = [_basename(p) for kind in OUTPUT_KINDS for p in run_files(c.run_dir, kind)]
    names += [REPORT_NAME] if c.report else []
    c = replace(c, manifest={**c.manifest, "run_dir": rel, "outputs": sorted(f"{rel}/{n}" for n in names)})
    with FileSystems.create(f"{c.run_dir}/{MANIFEST_NAME}", mime_type="application/json") as fh:
        fh.write(c.manifest_bytes)
    return c


def sync_run_dir(c: Commit) -> Commit:
    """Local file systems: every file of the run directory, and the directories down to it, on disk
    before a manifest names them (without it a power cut could leave the new manifest pointing
    at files the page cache had not written yet)."""
    run_dir = _os_path(c.run_dir)
    for dirpath, _, names in os.walk(run_dir):
        for name in names:
            _fsync_file(os.path.join(dirpath, name))
        _fsync_dir(dirpath)
    _fsync_dir(os.path.dirname(run_dir))
    _fsync_dir(_os_path(c.output))
    return c


def stage_current_manifest(c: Commit) -> Commit:
    """Local file systems: the new current manifest, written and fsynced beside the current one
    (same directory, so the replace below is one atomic rename within a file system)."""
    staged = f"{c.output.rstrip('/')}/{MANIFEST_NAME}.tmp-{secrets.token_hex(4)}"
    with open(_os_path(staged), "xb") as fh:
        fh.write(c.manifest_bytes)
        fh.flush()
        os.fsync(fh.fileno())
    return replace(c, staged=staged)


def replace_current_manifest(c: Commit) -> Commit:
    """Local file systems, the commit point: ``os.replace`` swaps the manifest atomically (a reader
    opens the old file or the new one, never a mix or none); the directory's fsync makes it durable."""
    os.replace(_os_path(c.staged), _os_path(f"{c.output.rstrip('/')}/{MANIFEST_NAME}"))
    _fsync_dir(_os_path(c.output))
    return replace(c, staged=None)


def put_current_manifest(c: Commit) -> Commit:
    """Object stores, the commit point: one PUT of ``{output}/manifest.json``. An object store
    makes a written object visible whole, replacing the old one, or not at all; a rename there is
    a copy and a delete, so none is used."""
    with FileSystems.create(f"{c.output.rstrip('/')}/{MANIFEST_NAME}", mime_type="application/json") as fh:
        fh.write(c.manifest_bytes)
    return c


def superseded(output: str, keep: set[str]) -> dict[str, list[str]]:
    """{entry: paths} under ``output`` that no current manifest can name: run directories other
    than ``keep`` (relative names ``runs/<dir>``), ``_staging-*`` directories, staged manifests
    never swapped in, and the top-level outputs and report of the layout without run directories.
    Anything else under the prefix (a user's files, streaming outputs' ``.temp-*``) is left."""
    out = output.rstrip("/")
    found: dict[str, list[str]] = {}
    for name, paths in _entries(out).items():
        if name == RUNS_DIR:
            found.update({f"{RUNS_DIR}/{run}": p for run, p in _entries(f"{out}/{RUNS_DIR}").items()
                          if f"{RUNS_DIR}/{run}" not in keep})
        elif (name.startswith(("_staging-", f"{MANIFEST_NAME}.tmp-"))
              or any(is_kind(name, kind) for kind in OUTPUT_KINDS + ("report",))):
            found[name] = paths
    return found


def remove_superseded(c: Commit) -> Commit:
    """After the commit point: remove what :func:`superseded` finds. The directory the manifest now
    in place names is kept even if it is not this run's (a concurrent run, which is unsupported,
    must not lose its outputs to this one). A failure here is logged, not raised: the run is
    committed, and the next commit removes what is left."""
    keep = {c.relative_run_dir}
    try:
        now = read_manifest(c.output)
        if now is not None and now.doc.get("run_dir"):
            keep.add(now.doc["run_dir"])
        for name, paths in sorted(superseded(c.output, keep).items()):
            _delete(paths)
    except Exception as exc:  # noqa: BLE001
        log.warning("superseded outputs not all removed (%s); the next run's commit removes them", type(exc).__name__)
    return c


Step = Callable[[Commit], Commit]
LOCAL_STEPS: tuple[Step, ...] = (tidy_run_dir, write_run_report, write_run_manifest, sync_run_dir,
                                 stage_current_manifest, replace_current_manifest, remove_superseded)
OBJECT_STORE_STEPS: tuple[Step, ...] = (tidy_run_dir, write_run_report, write_run_manifest, put_current_manifest,
                                        remove_superseded)
COMMIT_POINTS = (replace_current_manifest, put_current_manifest)  # before: the previous run is current; after: this one


def commit_steps(output: str) -> tuple[Step, ...]:
    return LOCAL_STEPS if is_local(output) else OBJECT_STORE_STEPS


def commit(c: Commit, on_step: Callable[[str], None] | None = None) -> Commit:
    """Make the finished run in ``c.run_dir`` the current one: :func:`commit_steps` in order.
    ``on_step(name)`` is called after each step (tests stop the process there)."""
    for step in commit_steps(c.output):
        c = step(c)
        if on_step is not None:
            on_step(step.__name__)
    return c


def discard(output: str, run_dir: str) -> None:
    """Remove a failed run's directory (its partial files), unless a manifest names it: a failure
    after the commit point leaves the committed run alone, and an unreadable manifest leaves the
    directory to the next commit's clean-up."""
    try:
        current = read_manifest(output)
        if current is not None and current.run_dir == run_dir.rstrip("/"):
            return
        _delete(_tree(run_dir))
    except Exception as exc:  # noqa: BLE001 - nothing written yet, or already gone
        log.debug("run directory not removed (%s); the next commit removes it", type(exc).__name__)
