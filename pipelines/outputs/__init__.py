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

The package: :mod:`.manifest` (where a run's files are, reading a manifest back),
:mod:`.run_commit` (the steps that make a finished run current, and :func:`discard`),
:mod:`.run_info` (what a manifest records about the run: code version, options, inputs).
"""

from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from transforms.report import REPORT_NAME

from .manifest import (
    MANIFEST_NAME,
    OUTPUT_KINDS,
    RUNS_DIR,
    Manifest,
    current_run_dir,
    is_kind,
    is_local,
    load_manifest,
    manifest_inputs_pattern,
    new_run_dir,
    output_files,
    read_manifest,
    run_files,
)
from .run_commit import (
    COMMIT_POINTS,
    LOCAL_STEPS,
    OBJECT_STORE_STEPS,
    Commit,
    Step,
    commit,
    commit_steps,
    discard,
    put_current_manifest,
    remove_superseded,
    replace_current_manifest,
    stage_current_manifest,
    superseded,
    sync_run_dir,
    tidy_run_dir,
    write_run_manifest,
    write_run_report,
)
from .run_info import (
    PATH_OPTIONS,
    SECRET_OPTION_WORDS,
    code_version,
    inputs_summary,
    now_iso,
    path_option_values,
    public_options,
)

__all__ = [
    "COMMIT_POINTS", "LOCAL_STEPS", "MANIFEST_NAME", "OBJECT_STORE_STEPS", "OUTPUT_KINDS", "PATH_OPTIONS",
    "REPORT_NAME", "RUNS_DIR", "SECRET_OPTION_WORDS", "Commit", "FileSystems", "Manifest", "Step", "code_version",
    "commit", "commit_steps", "current_run_dir", "discard", "inputs_summary", "is_kind", "is_local",
    "load_manifest", "manifest_inputs_pattern", "new_run_dir", "now_iso", "output_files", "path_option_values",
    "public_options", "put_current_manifest", "read_manifest", "remove_superseded", "replace_current_manifest",
    "run_files", "stage_current_manifest", "superseded", "sync_run_dir", "tidy_run_dir", "write_run_manifest",
    "write_run_report",
]
