"""What a run's manifest records about the run: code version, options (credentials left out,
paths pseudonymised on request), the inputs table's counts, timestamps."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apache_beam.io.filesystems import FileSystems

from .manifest import run_files

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions

    from transforms.privacy import PathWriter

SECRET_OPTION_WORDS = ("secret", "password", "token", "credential", "key_id", "access_key")


def code_version() -> dict:
    """The package version and, when run from a git checkout, its commit (and whether it is dirty)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("epee-beam")
    except PackageNotFoundError:
        v = None
    root = Path(__file__).resolve().parents[2]  # the checkout: pipelines/outputs/run_info.py
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


def path_option_values(options: PipelineOptions) -> list[str]:
    """The values of the run's :data:`PATH_OPTIONS` (lists flattened)."""
    found: list[str] = []
    for name, value in options.get_all_options(drop_default=True).items():
        if name in PATH_OPTIONS:
            found += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return found


def public_options(options: PipelineOptions, paths: PathWriter | None = None) -> dict:
    """Every option of the run except credentials (S3 keys, tokens). With ``paths`` (the run's
    :class:`transforms.privacy.PathWriter`) set to pseudonymise, the values of :data:`PATH_OPTIONS`
    are written by it and every other text value has its absolute paths and URIs pseudonymised."""
    from transforms.privacy import scrub_text

    pz = getattr(paths, "pz", None)

    def written(name: str, value: Any) -> Any:
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


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))
