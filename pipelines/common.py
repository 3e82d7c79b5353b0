"""Building and running one early-exit pipeline; the four entry points differ only in the task."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.audit import AuditTally
from transforms.context import AuditConfig
from transforms.handler import EarlyExitModelHandler, s3_client_kwargs
from transforms.inference import EarlyExitInference
from transforms.job import EarlyExitJob
from transforms.privacy import KeySource, PathWriter, PseudonymKeyError
from transforms.readers import ReadDicom, ReadNotes
from transforms.runners import pipeline_runner
from transforms.writers import ExitStatsFn, WriteOutputs

from . import outputs
from .options import PIPELINE_TASKS, EpeeOptions, default_run_id, help_parser, run_configs

log = logging.getLogger(__name__)


class StartupError(SystemExit):
    """A configuration problem found before the pipeline starts; the message says what to do."""


EXIT_STARTUP_ERROR = 2  # nothing ran (StartupError)
EXIT_AUDIT_FAILED = 3  # the run wrote everything, but its audit's lower bound fell below --min_agreement


def read_model_config(uri: str) -> dict:
    """The model directory's epee_config.json, validated by the loader's own rules
    (:func:`epee.modeldir.validate_config`), with ``_num_layers`` from its backbone's config.json."""
    from epee.modeldir import EPEE_CONFIG_NAME, backbone_num_layers, validate_config

    path = f"{uri.rstrip('/')}/{EPEE_CONFIG_NAME}"
    try:
        with FileSystems.open(path) as fh:
            doc = json.loads(fh.read())
        with FileSystems.open(f"{uri.rstrip('/')}/config.json") as fh:
            backbone = json.loads(fh.read())
    except Exception as exc:  # noqa: BLE001 - any failure means: not a usable model directory
        raise StartupError(
            f"--model {uri}: not an epee model directory ({type(exc).__name__}: cannot read {EPEE_CONFIG_NAME}); "
            "train one with `epee train` or run ./run_pipeline.sh with no arguments for a sample model"
        ) from None
    try:
        validate_config(doc)
        doc["_num_layers"] = backbone_num_layers(backbone)
    except ValueError as exc:  # our words, naming the field (never its value)
        raise StartupError(f"--model {uri}: {exc}") from None
    return doc


def written_paths(text: str, options: PipelineOptions, paths: PathWriter) -> str:
    """``text`` (a start-up message) with every path option's value in it written as ``paths``
    writes paths (pseudonymised with ``--pseudonymize_ids``), longest value first, and any other
    absolute path or URI in it pseudonymised too."""
    if paths.pz is None:
        return text
    from transforms.privacy import scrub_text

    values = {v for v in outputs.path_option_values(options) if v}
    marks: dict[str, str] = {}
    for i, value in enumerate(sorted(values, key=len, reverse=True)):
        mark = f"\x00{i}\x00"  # not a path character: the scrub below leaves it alone
        text, marks[mark] = text.replace(value, mark), paths(value)
    text = scrub_text(text, paths.pz)
    for mark, written in marks.items():
        text = text.replace(mark, written)
    return text


def check_output(output: str) -> None:
    """A local ``--output`` must be a directory, or a path that can become one: an existing file
    there or above it would otherwise fail the job only when it writes, after every record was
    predicted. Object-store prefixes (``s3://``, ``gs://``) are key prefixes, not checked here."""
    if "://" in output and not output.startswith("file://"):
        return
    path = Path(output.removeprefix("file://"))
    if path.is_symlink() and not path.exists():
        raise StartupError(f"--output {output}: is a symbolic link to nothing; give a directory")
    if path.exists() and not path.is_dir():
        raise StartupError(f"--output {output}: is an existing file, not a directory; give a directory (or a new path)")
    for parent in (path, *path.parents):  # the nearest existing one is where the first directory is made
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise StartupError(f"--output {output}: {parent} is a file, so no directory can be made below it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise StartupError(f"--output {output}: {parent} is not writable by this user")
            return


def validate(opts: EpeeOptions, pipeline: str, paths: PathWriter = PathWriter()) -> dict:
    missing = [f"--{n}" for n in ("input", "output", "model") if not getattr(opts, n)]
    if missing:
        raise StartupError(f"missing {', '.join(missing)} (see --help)")
    check_output(opts.output)
    if opts.max_batch_size is not None and opts.max_batch_size < 1:
        raise StartupError(f"--max_batch_size must be >= 1, got {opts.max_batch_size}")
    if opts.min_batch_size is not None and not 1 <= opts.min_batch_size <= (opts.max_batch_size or opts.min_batch_size):
        raise StartupError(f"--min_batch_size ({opts.min_batch_size}) must lie in [1, --max_batch_size "
                           f"({opts.max_batch_size})]")
    if opts.decode_processes < 1:
        raise StartupError(f"--decode_processes must be >= 1, got {opts.decode_processes}")
    # the engine, worker and long-note options are checked once, by their configs (run_configs)
    doc = read_model_config(opts.model)
    task = doc["preprocessing"]["data_task"]
    if task != PIPELINE_TASKS[pipeline]:
        raise StartupError(f"--model {opts.model} is a {task!r} model; the {pipeline} pipeline needs a "
                           f"{PIPELINE_TASKS[pipeline]!r} model")
    check_weights_file(opts, doc)
    matched = FileSystems.match([opts.input])[0].metadata_list
    if not matched and opts.view_as(StandardOptions).streaming:
        log.warning("--input %s matches no file yet; streaming mode watches it for new files", paths(opts.input))
    elif not matched:
        raise StartupError(f"--input {opts.input}: no file matches this pattern")
    return doc


def check_weights_file(opts: EpeeOptions, doc: dict) -> None:
    """Pickle weights (no model.safetensors in the directory) need --allow_pickle_weights: refused
    here, before any worker starts, rather than on every worker. A local directory is listed as the
    loader will see it; a remote one by its epee_config.json "files", which is what gets fetched.
    Then the weights file is read once (the loader's file access, s3:// included): a safetensors
    header that does not describe the file, or bytes that differ from the SHA-256 recorded in
    epee_config.json, is a start-up error. Its digest is kept in ``doc["_weights_sha256"]``."""
    import os

    from epee.modeldir import check_model_weights
    from epee.weights import WEIGHTS_NAME, WeightsFileError, choose_weights_file, is_pickle_weights, pickle_refusal_message

    local = opts.model.removeprefix("file://") if "://" not in opts.model or opts.model.startswith("file://") else None
    names = os.listdir(local) if local and os.path.isdir(local) else doc.get("files", [])
    try:
        name = choose_weights_file(names)
    except ValueError as exc:
        raise StartupError(f"--model {opts.model}: {exc}") from None
    if name and is_pickle_weights(name):
        if not opts.allow_pickle_weights:
            raise StartupError(pickle_refusal_message(f"--model {opts.model}", name))
        log.warning("--allow_pickle_weights: loading pickle weights %s through PyTorch's restricted unpickler", name)
    if not name:
        raise StartupError(f"--model {opts.model}: no weights file ({WEIGHTS_NAME}) in the model directory")
    # the file's structure and its recorded SHA-256, read once; the manifest reuses the digest
    try:
        checked = check_model_weights(opts.model, doc, name, s3_client_kwargs(opts))
    except WeightsFileError as exc:  # our words and byte counts only
        raise StartupError(f"--model {opts.model}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - unreadable (permissions, object store): a start-up error too
        raise StartupError(f"--model {opts.model}: cannot read {name} ({type(exc).__name__})") from None
    doc["_weights_sha256"] = checked.sha256


def policy_override(opts: EpeeOptions, doc: dict):
    """The --exit_policy override, or None for the model directory's stored (calibrated) policy."""
    from epee.config import ExitPolicyConfig

    if opts.exit_policy == "stored":
        return None
    stored = doc["model"].get("policy", {})
    return ExitPolicyConfig(
        kind=opts.exit_policy,
        entropy_threshold=opts.entropy_threshold if opts.entropy_threshold is not None else stored.get("entropy_threshold", 0.2),
        patience=opts.patience if opts.patience is not None else stored.get("patience", 2),
        min_exit_layer=stored.get("min_exit_layer", 1),
    )


def make_reader(pipeline: str, opts: EpeeOptions, task: str, run_id: str, **extra) -> ReadNotes | ReadDicom:
    """The reader of --input (streaming mode reuses its per-file DoFn with continuous matching).
    ``extra``: ``previous`` (--skip_processed inputs table) and ``key_source`` (--pseudonymize_ids)."""
    if pipeline == "dicom":
        return ReadDicom(opts.input, opts.frame_policy, run_id=run_id, max_file_bytes=opts.max_file_bytes,
                         max_pixel_bytes=opts.max_pixel_bytes, decode_timeout_s=opts.decode_timeout,
                         decode_processes=opts.decode_processes, **extra)
    return ReadNotes(opts.input, task, opts.text_field, opts.id_field, opts.input_format, run_id=run_id,
                     max_note_bytes=opts.max_note_bytes, max_file_bytes=opts.max_file_bytes, **extra)


def torch_threads(asked: int, options: PipelineOptions) -> int:
    """PyTorch threads per worker process: ``--torch_threads`` if given; on the DirectRunner in
    multi_processing mode the machine's cores shared by its worker processes (each would otherwise
    take every core: 2 workers on 2 cores ran at 51 records/s against 75 with one thread each,
    docs/analyses.md); else 0, PyTorch's own default."""
    from apache_beam.options.pipeline_options import DirectOptions

    from .streaming import is_direct_runner

    if asked or not is_direct_runner(options):
        return asked
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode != "multi_processing":
        return 0
    cores = os.cpu_count() or 1
    workers = direct.direct_num_workers or cores  # Beam: 0 means one per core
    return max(1, cores // workers) if workers > 1 else 0


def check_runner(options: PipelineOptions) -> None:
    """Resolve ``--runner`` (``DaskRunner``/``dask``, and Beam's own Dask runner class, run ours:
    transforms/runners) and refuse at start-up what the runner cannot do, with one line each."""
    from transforms.runners import is_dask, resolve_runner

    standard = options.view_as(StandardOptions)
    standard.runner = resolve_runner(standard.runner)
    name = str(standard.runner or "")
    if is_dask(name) and standard.streaming:
        raise StartupError("--streaming: the DaskRunner is batch-only (Beam's Dask runner has no unbounded sources, "
                           "windows over time or state). Run streaming on a streaming runner (DataflowRunner, "
                           "FlinkRunner) or run nightly batches on Dask")
    if name.rsplit(".", 1)[-1].lower().removesuffix("runner") == "dataflow":
        try:
            importlib.import_module("apache_beam.runners.dataflow.internal.apiclient")  # needs apache-beam[gcp]
        except ImportError:
            raise StartupError("--runner DataflowRunner needs Beam's Google Cloud extra on the launcher: "
                               "pip install 'apache-beam[gcp]==2.77.0' (the version in requirements.txt)") from None


def run(pipeline: str, argv: Sequence[str] | None = None) -> dict:
    """Run one pipeline to completion; returns a summary (also printed by the launcher)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        help_parser(f"python -m pipelines.{pipeline}").print_help()
        return {}
    options = PipelineOptions(argv)
    opts = options.view_as(EpeeOptions)
    check_runner(options)
    # validate() and summarize() use Beam's file systems outside the pipeline, which only sets
    # them up in its constructor: without this, s3:// has no client (and would see a previous run's options).
    FileSystems.set_options(options)
    # the key first: with --pseudonymize_ids even a start-up error names paths only as pseudonyms
    key_source = KeySource(opts.pseudonym_key_file) if opts.pseudonymize_ids else None
    paths = PathWriter()
    try:
        if key_source is not None:
            try:
                paths = PathWriter(key_source.pseudonymizer())  # fail at start-up, not on every worker
            except PseudonymKeyError as exc:
                raise StartupError(str(exc)) from None
        doc = validate(opts, pipeline, paths)
        previous = None
        if opts.skip_processed:
            try:
                previous = outputs.manifest_inputs_pattern(opts.skip_processed)
            except FileNotFoundError as exc:
                raise StartupError(str(exc)) from None
        run_id = opts.run_id or default_run_id()  # stamped here, once: every transform takes it from the job
        try:
            configs = run_configs(opts, run_id, s3_client_kwargs(options), key_source,
                                  torch_threads(opts.torch_threads, options))
        except ValueError as exc:
            raise StartupError(str(exc)) from None
    except StartupError as exc:
        raise StartupError(written_paths(str(exc), options, paths)) from None
    task = PIPELINE_TASKS[pipeline]
    handler = EarlyExitModelHandler(configs.job, configs.engine, configs.worker, policy=policy_override(opts, doc),
                                    min_batch_size=opts.min_batch_size, max_batch_size=opts.max_batch_size,
                                    large_model=opts.large_model, audit=configs.audit)
    inference = EarlyExitInference(handler, configs.prepare)
    started = time.time()
    stats_fn = ExitStatsFn(run_id, str(doc.get("model_id", "")), task, doc["_num_layers"], started, configs.audit)
    reader = make_reader(pipeline, opts, task, run_id, previous=previous, key_source=key_source)
    if options.view_as(StandardOptions).streaming:  # watch --input, write per window: pipelines/streaming.py
        from .streaming import run_streaming

        return {**run_streaming(options, reader, inference, stats_fn, started), "output": paths(opts.output)}
    # the run's final directory: nothing reads it until a manifest names it (pipelines/outputs.py)
    run_dir = outputs.new_run_dir(opts.output, run_id)
    try:
        with beam.Pipeline(runner=pipeline_runner(options), options=options) as p:
            p | "Job" >> EarlyExitJob(reader, inference, WriteOutputs(run_dir, stats_fn, opts.num_shards, key_source),
                                      read_label=type(reader).__name__)
        pipeline_done = time.time()
        summary = summarize(opts.output, run_id, time.time() - started, run_dir, configs.audit)
        summary["batch_fill_per_layer"] = batch_fill(p.result, configs.engine.batch_size, doc["_num_layers"])
        inputs = outputs.inputs_summary(run_dir)
        manifest = {
            "run_id": run_id, "pipeline": pipeline, "task": task, "status": "succeeded",
            "model": {"uri": paths(opts.model), "model_id": doc.get("model_id"),
                      "weights_sha256": doc["_weights_sha256"]},  # read once, at start-up
            "code_version": outputs.code_version(),
            "options": outputs.public_options(options, paths),
            "inputs": {"pattern": paths(opts.input), **{k: inputs[k] for k in ("matched", "processed", "skipped")},
                       "skip_processed": paths(opts.skip_processed)},
            "records_in": inputs["records_in"],
            "counts": {"records_in": inputs["records_in"], "predictions": summary["predictions"],
                       "dead_letters": summary["dead_letters"], "dead_letters_by_reason": summary["dead_letters_by_reason"]},
            "pseudonymized_ids": bool(opts.pseudonymize_ids),
            "audit": summary["audit"], "audit_agreement": summary["audit_agreement"],
            "batch_fill_per_layer": summary["batch_fill_per_layer"],
            "timings": {"started_at": outputs.now_iso(started), "finished_at": outputs.now_iso(),
                        "pipeline_seconds": round(pipeline_done - started, 3), "wall_seconds": round(time.time() - started, 3)},
        }
        # report, the run's manifest, then the current manifest replaced atomically (written last), then clean-up
        outputs.commit(outputs.Commit(opts.output, run_dir, manifest))
    except BaseException:
        outputs.discard(opts.output, run_dir)  # a failed run leaves the previous one current and untouched
        raise
    # printed by the launcher: paths as every output writes them
    summary.update(records_in=inputs["records_in"], files_skipped=inputs["skipped"], output=paths(opts.output),
                   run_dir=paths(run_dir))
    return summary


AUDIT_COLUMNS = ("macs", "audit_fraction", "audited_records", "audit_agreeing", "audit_macs", "audit_status",
                 "audit_per_layer", "audit_per_label")


def audit_outcome(directory: str, audit: AuditConfig) -> tuple[str, dict | None]:
    """The audit's verdict over the ``exit_stats`` rows in ``directory`` and its figures (None when
    off). Batch mode has one row; in streaming mode each window's row carries its own verdict and
    the run fails when any window failed (``windows_failed`` counts them)."""
    from transforms.report import iter_rows

    if audit.fraction <= 0:
        return "off", None
    tally, run_macs, statuses = AuditTally(), 0, []
    for row in iter_rows(directory, "exit_stats", AUDIT_COLUMNS):
        tally.add_row(row)
        run_macs += int(row.get("macs") or 0)
        statuses.append(row.get("audit_status"))
    status = tally.status(audit.fraction, audit.min_agreement, audit.confidence)
    if len(statuses) > 1 and audit.min_agreement is not None:  # windows: each is checked on its own
        status = "failed" if "failed" in statuses else "passed"
    low, high = tally.interval(audit.confidence)
    figures = {"fraction": audit.fraction, "min_agreement": audit.min_agreement, "confidence": audit.confidence,
               "audited_records": tally.audited, "agreeing": tally.agreeing, "agreement": tally.agreement,
               "agreement_low": low, "agreement_high": high, "audit_macs": tally.macs,
               "compute_share": tally.compute_share(run_macs)}
    if len(statuses) > 1:
        figures.update(windows=len(statuses), windows_failed=statuses.count("failed"))
    return status, figures


def batch_fill(result, batch_size: int, num_layers: int) -> list[float | None] | None:
    """Rows per layer call over the engine's batch size at each layer, from the run's Beam counters
    (``layer_rows_NN``, ``layer_calls_NN``): 1.0 when every call at that depth ran full; None for a
    layer no row reached, and None overall on a runner that collects no metrics (Beam's DaskRunner)."""
    from apache_beam.metrics.metric import MetricsFilter

    from transforms.handler import NAMESPACE

    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: the figures are left out, the run is not
        return None
    values: dict[str, int] = {}
    for c in counters:
        values[c.key.metric.name] = values.get(c.key.metric.name, 0) + int(c.committed or 0)
    if not any(name.startswith("layer_calls_") for name in values):
        return None
    out: list[float | None] = []
    for d in range(1, num_layers + 1):
        rows, calls = values.get(f"layer_rows_{d:02d}", 0), values.get(f"layer_calls_{d:02d}", 0)
        out.append(round(rows / (calls * batch_size), 4) if calls else None)
    return out


def summarize(output: str, run_id: str, wall: float, run_dir: str | None = None, audit: AuditConfig | None = None) -> dict:
    """Counts from a run's files in ``run_dir`` (streaming mode: the window files directly under
    ``output``): row counts from the Parquet footers, dead-letter reasons and exit statistics read
    in batches, so the summary of any run size fits in a little memory. ``audit``: the run's audit
    settings, for its verdict (``audit``) and figures (``audit_agreement``)."""
    import pyarrow.parquet as pq

    from transforms.report import iter_rows

    directory = (run_dir or output).rstrip("/")

    def rows_in(name: str) -> int:
        n = 0
        for m in FileSystems.match([f"{directory}/{name}-*.parquet"])[0].metadata_list:
            with FileSystems.open(m.path) as fh:
                n += pq.ParquetFile(fh).metadata.num_rows
        return n

    preds, dead = rows_in("predictions"), rows_in("dead_letters")
    reasons: dict[str, int] = {}
    for r in iter_rows(directory, "dead_letters", ("error_type",)):
        reasons[r["error_type"]] = reasons.get(r["error_type"], 0) + 1
    s = next(iter_rows(directory, "exit_stats", ("mean_exit_layer", "num_layers", "layer_speedup", "exits_per_layer")), {})
    audit_status, audit_figures = audit_outcome(directory, audit or AuditConfig())
    return {"run_id": run_id, "output": output, "records": preds + dead, "predictions": preds, "dead_letters": dead,
            "dead_letters_by_reason": reasons, "mean_exit_layer": s.get("mean_exit_layer"),
            "num_layers": s.get("num_layers"), "layer_speedup": s.get("layer_speedup"),
            "exits_per_layer": s.get("exits_per_layer"), "wall_seconds": round(wall, 1),
            "audit": audit_status, "audit_agreement": audit_figures}


def main(pipeline: str, argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(pipeline, argv)
    except StartupError as exc:  # one line, whatever the message holds (a path with a newline)
        print("error: " + str(exc).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return EXIT_STARTUP_ERROR
    if summary:
        print(json.dumps(summary, indent=2))
    if summary.get("audit") == "failed":  # everything was written: the status is for a scheduler to alert on
        log.error("audit failed: the agreement with full depth has a lower 95%% bound below --min_agreement (%s)",
                  (summary.get("audit_agreement") or {}).get("agreement_low"))
        return EXIT_AUDIT_FAILED
    return 0
