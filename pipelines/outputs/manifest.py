"""Where a run's files are, and a manifest read back.

``{output}/manifest.json`` names the current run's directory and lists its files; a step that
reads a run's outputs goes through :func:`output_files` or :func:`current_run_dir`, never a glob of
the prefix. Paths in a manifest are relative to the prefix and must stay inside it.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from transforms.report import REPORT_NAME

MANIFEST_NAME = "manifest.json"
RUNS_DIR = "runs"
OUTPUT_KINDS = ("predictions", "dead_letters", "exit_stats", "inputs")


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


def _safe_relative(rel: object) -> bool:
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
