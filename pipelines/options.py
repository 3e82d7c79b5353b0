"""Command-line options shared by the four pipelines (parsed once, at the edge)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from epee.config import LINEAR_KERNELS, PRECISIONS, EngineConfig
from transforms.context import AuditConfig, JobContext, PrepareConfig, WorkerConfig
from transforms.note_reader import NOTE_FORMATS

PIPELINE_TASKS = {"notes": "sequence", "relations": "relation", "events": "token", "dicom": "image"}


class EpeeOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("epee-beam")
        g.add_argument("--input", help="file pattern of the inputs: local path, s3:// or gs:// (glob allowed)")
        g.add_argument("--output", help="output prefix (directory): predictions, dead_letters, exit_stats Parquet go below it")
        g.add_argument("--model", help="early-exit model directory: local path, s3:// or gs://")
        g.add_argument("--input_format", default="auto", choices=["auto", *NOTE_FORMATS],
                       help="note files: format (auto: by extension; .txt = one note per file, its path the id)")
        g.add_argument("--text_field", default="text", help="note tables: field holding the text")
        g.add_argument("--id_field", default=None, help="note tables: field holding the record id (default: file#row)")
        g.add_argument("--min_batch_size", type=int, default=None,
                       help="RunInference: smallest batch (default: --max_batch_size, a fixed batch size). "
                            "Beam's adaptive batching starting at 1 hands the engine calls of a few records, "
                            "which leaves it little to regroup; a batch is still flushed at each bundle's end")
        g.add_argument("--max_batch_size", type=int, default=None,
                       help="RunInference: largest batch; the engine regroups inside each batch (default: one "
                            "engine window, 16 x --engine_batch_size = 512 records)")
        g.add_argument("--engine_batch_size", type=int, default=32, help="rows per layer call inside the engine")
        g.add_argument("--window_overlap", type=float, default=0.25,
                       help="long notes: share of each window that overlaps the previous one")
        g.add_argument("--max_windows", type=int, default=0,
                       help="long notes: use at most the first N windows (0: the whole note). 1 = plain truncation; "
                            "only as much of a note as those windows need is tokenised")
        g.add_argument("--frame_policy", default="middle", choices=["middle", "all"],
                       help="multi-frame DICOM: the middle frame, or every frame as its own record")
        g.add_argument("--max_note_bytes", type=int, default=1 << 20,
                       help="notes: a note over this size is a dead letter (note_too_large) instead of being read")
        g.add_argument("--max_file_bytes", type=int, default=1 << 30,
                       help="DICOM and CSV files over this size, and compressed files whose content inflates past "
                            "it (counted in 1 MiB steps), are dead letters (file_too_large), never read whole "
                            "(uncompressed JSONL, JSON and Parquet note files are streamed and have no file limit)")
        g.add_argument("--max_pixel_bytes", type=int, default=1 << 30,
                       help="DICOM: pixel budget; a header declaring more decoded pixel bytes is refused before "
                            "decoding (pixel_budget_exceeded)")
        g.add_argument("--decode_timeout", type=float, default=120.0,
                       help="DICOM: seconds one file may take to decode; decoding runs in a child process that is "
                            "killed past it (decode_timeout). 0: decode in the worker itself, no timeout")
        g.add_argument("--decode_processes", type=int, default=1,
                       help="DICOM: decoder child processes per worker process, shared by all its reading DoFn "
                            "instances (threads); files go to them in batches while the worker reads on and runs the "
                            "model. More than 1 helps where decoding, not the model, bounds the job and cores are "
                            "free (ignored with --decode_timeout 0)")
        g.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
        g.add_argument("--precision", default="float32", choices=PRECISIONS,
                       help="bfloat16: the model under torch.autocast in bfloat16 (exit decisions stay float32); "
                            "fast on CPUs with native bf16 (avx512_bf16, AMX) and on GPUs, slower on CPUs without "
                            "it. int8 (CPU only): the transformer layers' linear products in int8 with per-token "
                            "scales; embeddings, attention, exit heads and decisions stay float32. Scores and early "
                            "exits can move: calibrate in the precision you run (epee calibrate --precision); a "
                            "worker warns when the stored policy was calibrated in another. Measured speeds: "
                            "docs/analyses.md")
        g.add_argument("--linear_kernel", default="auto", choices=LINEAR_KERNELS,
                       help="float32 CPU kernel of the linear layers: auto (oneDNN on x86-64 CPUs in float32, "
                            "PyTorch's elsewhere; epee/kernels.py, measured in docs/analyses.md), aten (PyTorch's "
                            "default, MKL) or onednn (refused off the CPU or outside float32)")
        g.add_argument("--whole_layers", action="store_true",
                       help="run every transformer layer whole. By default, where exit heads read a few positions "
                            "([CLS], GPT-2's last token, the entity markers), a layer where records may exit runs "
                            "at those positions first and the rest only for the records that go on: the same "
                            "predictions, and a record pays about a sixth of its exit layer (epee/engine.py)")
        g.add_argument("--heap_trim_seconds", type=float, default=2.0,
                       help="workers hand freed heap memory back to the system (glibc malloc_trim) at most this "
                            "often, so their memory stays flat on long runs; 0 disables")
        g.add_argument("--allow_pickle_weights", action="store_true",
                       help="load a model directory whose weights are a pickle file (pytorch_model.bin, model.pt) "
                            "instead of model.safetensors, through PyTorch's restricted unpickler (weights_only=True); "
                            "refused at start-up without this flag. `epee convert --model DIR` converts it once")
        g.add_argument("--torch_threads", type=int, default=0,
                       help="PyTorch's intra-op threads in each worker process. 0 (default): cores / workers on "
                            "the DirectRunner in multi_processing mode, PyTorch's own default (every core) elsewhere. "
                            "Where a machine runs several worker processes (Dataflow starts one per core), "
                            "cores / processes keeps them from contending for the same cores")
        g.add_argument("--regroup", default="bundle", choices=["bundle", "batch"],
                       help="where records that have not exited regroup into full layer batches: bundle "
                            "(default): across every batch of a bundle, new records entering layer 1 while "
                            "earlier ones continue deeper, flushed at the bundle's end (continuous batching); "
                            "batch: inside each RunInference batch, Beam's RunInference transform (the deep "
                            "layers of every batch run part-filled)")
        g.add_argument("--large_model", action="store_true",
                       help="share one model copy across worker processes (Beam's multi-process sharing)")
        g.add_argument("--exit_policy", default="stored", choices=["stored", "none", "entropy", "patience", "epee"],
                       help="stored: the model directory's calibrated policy; none: full depth; or another kind")
        g.add_argument("--entropy_threshold", type=float, default=None, help="with --exit_policy: τ (default: stored)")
        g.add_argument("--patience", type=int, default=None, help="with --exit_policy: P (default: stored)")
        g.add_argument("--num_shards", type=int, default=1,
                       help="Parquet files per output kind; rows are assigned to shards by a stable hash of their "
                            "record id and sorted inside each, so reruns give identical files")
        g.add_argument("--pseudonymize_ids", action="store_true",
                       help="replace record ids and URIs in every output by a keyed HMAC-SHA256; the key comes from "
                            "the environment variable EPEE_PSEUDONYM_KEY or --pseudonym_key_file, never the command line")
        g.add_argument("--pseudonym_key_file", default=None,
                       help="with --pseudonymize_ids: a secret file (local, s3://, gs://) holding the HMAC key")
        g.add_argument("--skip_processed", default=None, metavar="MANIFEST_OR_OUTPUT",
                       help="process only input files that are new or changed (by URI and SHA-256) since the run "
                            "whose manifest.json (or output prefix) is given")
        g.add_argument("--audit_fraction", type=float, default=0.02,
                       help="the nightly audit: this share of records (a keyed hash of the record id, so reruns "
                            "audit the same ones) is carried on to the last layer after its exit, without changing its output; "
                            "exit_stats and report.html show how often the exit prediction agreed with full depth, "
                            "with a 95%% interval, and the compute the audit took. 0 disables")
        g.add_argument("--min_agreement", type=float, default=None,
                       help="with the audit: when the agreement's lower 95%% confidence bound is below this, the run "
                            "still writes everything but its manifest records \"audit\": \"failed\" and the "
                            "launcher exits with status 3 (streaming: when any window's bound is below it)")
        g.add_argument("--run_id", default=None, help="run identifier written to every output row (default: UTC time)")
        # Streaming mode is Beam's own --streaming flag (StandardOptions); these only shape it.
        s = parser.add_argument_group("epee-beam streaming (with Beam's --streaming flag)")
        s.add_argument("--poll_interval", type=float, default=10.0,
                       help="streaming: seconds between two matches of --input; a new file is read once, "
                            "at the first match that finds it")
        s.add_argument("--window_seconds", type=int, default=60,
                       help="streaming: length of the fixed windows; each window's predictions, dead letters and "
                            "exit statistics go to their own Parquet files, named by the window")
        s.add_argument("--stop_after", type=float, default=None,
                       help="streaming: stop watching --input this many seconds after the start, then finish "
                            "the open windows and exit (default: watch until the job is cancelled)")


@dataclass(frozen=True)
class RunConfigs:
    """Every config a run's transforms take, built once from the parsed options."""

    job: JobContext  # run id, model directory, storage options, pseudonym key
    engine: EngineConfig  # how the engine batches and computes (--engine_batch_size, --precision, ...)
    worker: WorkerConfig  # per worker process: --torch_threads, --heap_trim_seconds, --allow_pickle_weights
    prepare: PrepareConfig  # long notes: --window_overlap, --max_windows
    audit: AuditConfig = AuditConfig()  # --audit_fraction, --min_agreement


def run_configs(opts: "EpeeOptions", run_id: str, storage_options: dict[str, Any], key_source: Any,
                torch_threads: int) -> RunConfigs:
    """The run's configs from its options; each value is checked once, by its config, and a bad
    one raises ``ValueError`` naming the option. ``torch_threads``: as resolved for the runner
    (:func:`pipelines.common.torch_threads`)."""
    try:
        engine = EngineConfig.from_options(opts)
    except ValueError as exc:  # the engine's own words; the option that set the value first
        raise ValueError(f"--{'engine_batch_size' if 'batch_size' in str(exc) else 'linear_kernel'}: {exc}") from None
    return RunConfigs(
        job=JobContext(run_id=run_id, model_uri=opts.model, storage_options=storage_options, key_source=key_source),
        engine=engine,
        worker=WorkerConfig(torch_threads=torch_threads, heap_trim_seconds=opts.heap_trim_seconds,
                            allow_pickle_weights=bool(opts.allow_pickle_weights), regroup=opts.regroup),
        prepare=PrepareConfig(window_overlap=opts.window_overlap, max_windows=opts.max_windows),
        audit=AuditConfig(fraction=opts.audit_fraction, min_agreement=opts.min_agreement),
    )


def default_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def help_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Early-exit inference pipeline. Besides the options below it takes every Beam option, "
                    "e.g. --runner DirectRunner|DaskRunner|DataflowRunner|FlinkRunner|PortableRunner, "
                    "--direct_num_workers N, --direct_running_mode in_memory|multi_threading|multi_processing, "
                    "--setup_file ./setup.py.",
    )
    EpeeOptions._add_argparse_args(parser)
    from apache_beam.runners.dask.dask_runner import DaskOptions

    DaskOptions._add_argparse_args(parser.add_argument_group(
        "Dask runner (--runner DaskRunner: batch only; our fixed subclass of Beam's, transforms/runners)",
        "a scheduler started by scripts/dask_cluster.sh, dask-jobqueue (Slurm/PBS) or dask-kubernetes; "
        "without --dask_client_address a LocalCluster in this process"))
    return parser
