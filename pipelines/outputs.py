"""A batch run's outputs: one directory per run, made current by replacing one manifest.

Layout under ``--output``::

    manifest.json                  the current run's manifest: a byte copy of runs/<dir>/manifest.json
    runs/<run id>-<nonce>/         one run, complete: predictions-*.parquet, dead_letters-*.parquet,
                                   exit_stats-*.parquet, inputs-*.parquet, report.html, manifest.json

The pipeline writes straight into its own run directory, which nothing reads until a manifest names
it; no data file is renamed or copied. When the pipeline has finished, :func:`commit` runs the steps
of :data:`LOCAL_STEPS` or :data:`OBJECT_STORE_STEPS` in order. Replacing ``{output}/manifest.json``
is the one step that makes the new run current: on a local file system ``os.replace`` of a fully
written and fsynced file, on an object store (``s3://``, ``gs://``) a single-object PUT, which
readers see whole or not at all. Whatever step a crash (``kill -9``, a lost machine) interrupts,
``{output}`` reads as exactly the previous run before that step and exactly the new one after it.
Only once the new manifest is in place are the superseded directories removed: other runs' (older
runs, and runs killed before their commit), ``_staging-*`` directories, and the top-level outputs
of the layout without run directories. The directory the current manifest names is never removed.

A step that reads a run's outputs reads ``{output}/manifest.json`` and the files it lists
(:func:`output_files`, :func:`current_run_dir`), never a glob of the prefix. Two runs writing to one
``--output`` at the same time are not supported: the second to commit removes the first's directory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from apache_beam.io.filesystems import FileSystems

from transforms.report import REPORT_NAME

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
RUNS_DIR = "runs"
OUTPUT_KINDS = ("predictions", "dead_letters", "exit_stats", "inputs")
SECRET_OPTION_WORDS = ("secret", "password", "token", "credential", "key_id", "access_key")


# -- where a run's files are -----------------------------------------------------------------------
def is_local(path: str) -> bool:
    """A path of the local file system (no URI scheme); everything else is treated as an object
    store, where a write of one object is atomic and a rename is a copy and a delete."""
    return FileSystems.get_scheme(path) is None


def new_run_dir(output: str, run_id: str) -> str:
    """``{output}/runs/<run id>-<nonce>``: the run's final directory, which the pipeline writes
    into. The nonce keeps two runs with one ``--run_id`` apart; characters other than letters,
    digits, ``.``, ``_`` and ``-`` in the run id become ``_`` (one directory level, any file system)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:64] or "run"
    return f"{output.rstrip('/')}/{RUNS_DIR}/{name}-{secrets.token_hex(4)}"


def _match(pattern: str) -> list[str]:
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def run_files(run_dir: str, kind: str) -> list[str]:
    """The ``kind`` Parquet files in one run directory (the run's own, while it has no manifest yet)."""
    return _match(f"{run_dir.rstrip('/')}/{kind}-*.parquet")


def is_kind(name: str, kind: str) -> bool:
    """Whether a file name is one of the ``kind`` outputs (``report``: the run report)."""
    return name == REPORT_NAME if kind == "report" else name.startswith(f"{kind}-") and name.endswith(".parquet")


@dataclass(frozen=True)
class Manifest:
    """A manifest read back, with the prefix its paths are relative to."""

    root: str  # the --output prefix
    doc: dict

    @property
    def run_dir(self) -> str:
        """The run's directory; the prefix itself for a manifest of the layout without run directories."""
        rel = self.doc.get("run_dir")
        return f"{self.root}/{rel}" if rel else self.root

    def files(self, kind: str) -> list[str]:
        return [f"{self.root}/{rel}" for rel in self.doc.get("outputs", []) if is_kind(_basename(rel), kind)]


def _safe_relative(rel) -> bool:
    """A path inside the prefix: what a manifest may name (a hand-edited one must not point outside)."""
    return (isinstance(rel, str) and rel != "" and not rel.startswith("/") and "://" not in rel
            and ".." not in rel.split("/"))


def _manifest_location(path: str) -> str:
    """``{prefix}/manifest.json`` for a prefix, or the path itself when it names a ``.json`` file."""
    path = path.rstrip("/")
    return path if path.endswith(".json") else f"{path}/{MANIFEST_NAME}"


def read_manifest(path: str) -> Manifest | None:
    """The manifest of an output prefix (or a manifest file: the current one, or a run's own
    ``runs/<dir>/manifest.json``); None when there is none. Raises ``ValueError`` when one is there
    but is not a manifest this code wrote."""
    location = _manifest_location(path)
    if not FileSystems.exists(location):
        return None
    try:
        with FileSystems.open(location) as fh:
            doc = json.loads(fh.read())
    except Exception as exc:  # noqa: BLE001 - unreadable or not JSON: our words, not the parser's
        raise ValueError(f"{MANIFEST_NAME} there cannot be read as JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs", []), list):
        raise ValueError(f"{MANIFEST_NAME} there is not a run manifest")
    rel = doc.get("run_dir")
    if (rel is not None and not _safe_relative(rel)) or not all(_safe_relative(o) for o in doc.get("outputs", [])):
        raise ValueError(f"{MANIFEST_NAME} there names a path outside its prefix")
    base = location.rsplit("/", 1)[0]
    # a run's own manifest lies in runs/<dir>/: its paths, like the current one's, are relative to the prefix
    root = base[: -len(rel) - 1] if rel and base.endswith(f"/{rel}") else base
    return Manifest(root, doc)


def load_manifest(path: str) -> Manifest:
    """:func:`read_manifest`, for a reader that needs one: ``FileNotFoundError`` when there is none
    or it cannot be read."""
    try:
        manifest = read_manifest(path)
    except ValueError as exc:
        raise FileNotFoundError(str(exc)) from None
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST_NAME} there: no run has finished under this prefix")
    return manifest


def current_run_dir(output: str) -> str:
    """The directory of the run ``{output}/manifest.json`` names (the current run)."""
    return load_manifest(output).run_dir


def output_files(output: str, kind: str) -> list[str]:
    """Full paths of the current run's ``kind`` files (``predictions``, ``dead_letters``,
    ``exit_stats``, ``inputs`` or ``report``), as ``{output}/manifest.json`` lists them."""
    return load_manifest(output).files(kind)


# -- the commit ------------------------------------------------------------------------------------
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


def code_version() -> dict:
    """The package version and, when run from a git checkout, its commit (and whether it is dirty)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("epee-beam")
    except PackageNotFoundError:
        v = None
    root = Path(__file__).resolve().parent.parent
    commit_id, dirty = None, None
    try:
        commit_id = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                   timeout=10, check=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": v, "git_commit": commit_id, "git_dirty": dirty, "python": platform.python_version()}


# options whose values are paths or URIs (ours and Beam's); with --pseudonymize_ids the manifest
# and start-up messages carry them with every component pseudonymised
PATH_OPTIONS = ("input", "output", "model", "skip_processed", "pseudonym_key_file", "temp_location",
                "staging_location", "gcp_temp_location", "setup_file", "requirements_file", "requirements_cache",
                "sdk_location", "extra_packages", "files_to_stage", "dataflow_worker_jar", "template_location")


def path_option_values(options) -> list[str]:
    """The values of the run's :data:`PATH_OPTIONS` (lists flattened)."""
    found: list[str] = []
    for name, value in options.get_all_options(drop_default=True).items():
        if name in PATH_OPTIONS:
            found += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return found


def public_options(options, paths=None) -> dict:
    """Every option of the run except credentials (S3 keys, tokens). With ``paths`` (the run's
    :class:`transforms.privacy.PathWriter`) set to pseudonymise, the values of :data:`PATH_OPTIONS`
    are written by it and every other text value has its absolute paths and URIs pseudonymised."""
    from transforms.privacy import scrub_text

    pz = getattr(paths, "pz", None)

    def written(name: str, value):
        if pz is None:
            return value
        if isinstance(value, (list, tuple)):
            return [written(name, v) for v in value]
        if not isinstance(value, str):
            return value
        return paths(value) if name in PATH_OPTIONS else scrub_text(value, pz)

    return {k: written(k, v) for k, v in sorted(options.get_all_options(drop_default=True).items())
            if not any(w in k.lower() for w in SECRET_OPTION_WORDS)}


def inputs_summary(run_dir: str) -> dict:
    """Files matched, processed and skipped, and records read, from one run directory's inputs table."""
    import pyarrow.parquet as pq

    rows = []
    for path in run_files(run_dir, "inputs"):
        with FileSystems.open(path) as fh:
            rows += pq.read_table(fh, columns=["status", "records"]).to_pylist()
    processed = [r for r in rows if r["status"] == "processed"]
    return {"matched": len(rows), "processed": len(processed), "skipped": len(rows) - len(processed),
            "records_in": sum(r["records"] for r in processed)}


def manifest_inputs_pattern(path: str) -> str:
    """``--skip_processed`` takes an output prefix or a manifest (the current one, or a run's own
    in ``runs/<dir>/``, or one of the layout without run directories); returns the glob of the
    inputs table of the run it names."""
    try:
        manifest = load_manifest(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--skip_processed {path}: {exc}; only a finished run (one that wrote its "
                                f"{MANIFEST_NAME}) can be skipped against") from None
    if not manifest.files("inputs"):
        raise FileNotFoundError(f"--skip_processed {path}: the manifest lists no inputs table")
    return f"{manifest.run_dir}/inputs-*.parquet"


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))
