"""A batch run's outputs appear all at once, with a manifest written last.

The pipeline writes into ``{output}/_staging-{run_id}-{nonce}/``. Only when it has finished
without error does :func:`commit` remove the previous run's outputs from ``{output}`` (its
manifest first), move the new files into place, and the launcher then writes the report and, last,
``manifest.json``. A step that reads the outputs should wait for ``manifest.json``: while it is
absent the prefix is being replaced. A failed run deletes its staging directory and leaves the
previous outputs untouched.
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import subprocess
import time
from pathlib import Path

from apache_beam.io.filesystems import FileSystems

MANIFEST_NAME = "manifest.json"
OUTPUT_KINDS = ("predictions", "dead_letters", "exit_stats", "inputs")
SECRET_OPTION_WORDS = ("secret", "password", "token", "credential", "key_id", "access_key")


def staging_dir(output: str, run_id: str) -> str:
    return f"{output.rstrip('/')}/_staging-{run_id}-{secrets.token_hex(4)}"


def _match(pattern: str) -> list[str]:
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def discard(staging: str) -> None:
    """Remove a staging directory (a failed run's partial files)."""
    try:
        FileSystems.delete([staging])
    except Exception:  # noqa: BLE001 - nothing staged yet, or already gone
        pass


def previous_outputs(output: str) -> list[str]:
    out = output.rstrip("/")
    found = []
    for pattern in [f"{out}/{kind}-*.parquet" for kind in OUTPUT_KINDS] + [f"{out}/report.html"]:
        found += _match(pattern)
    return found


def commit(output: str, staging: str) -> list[str]:
    """Replace the previous outputs under ``output`` with the staged files; returns their names."""
    out = output.rstrip("/")
    staged = _match(f"{staging}/*.parquet")
    manifest = _match(f"{out}/{MANIFEST_NAME}")
    if manifest:
        FileSystems.delete(manifest)  # first: without a manifest the prefix reads as incomplete
    old = previous_outputs(out)
    if old:
        FileSystems.delete(old)
    names = sorted(_basename(p) for p in staged)
    FileSystems.rename(staged, [f"{out}/{_basename(p)}" for p in staged])
    discard(staging)
    return names


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


def model_weights_sha256(model_uri: str, doc: dict) -> str | None:
    """SHA-256 of the model directory's weights file (safetensors, or the allowed pickle)."""
    from epee.weights import choose_weights_file

    try:
        name = choose_weights_file(doc.get("files", []))
    except ValueError:
        name = None
    if not name:
        return None
    h = hashlib.sha256()
    with FileSystems.open(f"{model_uri.rstrip('/')}/{name}") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def public_options(options) -> dict:
    """Every option of the run except credentials (S3 keys, tokens)."""
    return {k: v for k, v in sorted(options.get_all_options(drop_default=True).items())
            if not any(w in k.lower() for w in SECRET_OPTION_WORDS)}


def inputs_summary(output: str) -> dict:
    import pyarrow.parquet as pq

    rows = []
    for path in _match(f"{output.rstrip('/')}/inputs-*.parquet"):
        with FileSystems.open(path) as fh:
            rows += pq.read_table(fh, columns=["status", "records"]).to_pylist()
    processed = [r for r in rows if r["status"] == "processed"]
    return {"matched": len(rows), "processed": len(processed), "skipped": len(rows) - len(processed),
            "records_in": sum(r["records"] for r in processed)}


def write_manifest(output: str, manifest: dict) -> str:
    path = f"{output.rstrip('/')}/{MANIFEST_NAME}"
    with FileSystems.create(path) as fh:
        fh.write((json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode())
    return path


def manifest_inputs_pattern(path: str) -> str:
    """``--skip_processed`` takes a manifest or an output prefix; returns the inputs table glob."""
    path = path.rstrip("/")
    base = path.rsplit("/", 1)[0] if path.endswith(".json") else path
    manifest = f"{base}/{MANIFEST_NAME}"
    try:
        with FileSystems.open(manifest) as fh:
            doc = json.loads(fh.read())
    except Exception as exc:  # noqa: BLE001
        raise FileNotFoundError(f"--skip_processed {path}: no readable {MANIFEST_NAME} there ({type(exc).__name__}); "
                                "only a finished run (one that wrote its manifest) can be skipped against") from None
    tables = [n for n in doc.get("outputs", []) if n.startswith("inputs-")]
    if not tables:
        raise FileNotFoundError(f"--skip_processed {path}: the manifest lists no inputs table")
    return f"{base}/inputs-*.parquet"


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))
