"""Streaming mode (``--streaming``): watch the input pattern and write windowed Parquet as files arrive.

The batch pipeline reads what ``--input`` matches once. In streaming mode the pattern is matched
again every ``--poll_interval`` seconds with Beam's continuous file matching; every file is read
once, at the first match that finds it, through the same parsing DoFns, the same
:class:`transforms.job.EarlyExitJob` and the same handler as in batch mode, so every record still ends as
exactly one prediction or one dead letter. Records are grouped into fixed windows of
``--window_seconds`` by the time of that match, and each window is written to its own Parquet
files (:class:`transforms.writers.WriteWindowedOutputs`). ``--stop_after`` ends the watch; the
open windows are then written and the job exits.

Why the matches are deduplicated here and not by ``MatchContinuously(has_deduplication=True)``:
that path is Beam's ``Watch`` splittable DoFn, which cannot run locally in Beam 2.77. The
DirectRunner hands a streaming pipeline without TestStream or Pub/Sub to the FnApiRunner, which
ignores a splittable DoFn's resume delay, so ``Watch`` polls back to back and spends its whole poll
budget (``ceil((stop - start) / interval)`` polls) in the first second: files that arrive later are
never seen. The BundleBasedDirectRunner, the Python runner with streaming watermarks, refuses to
build it ("ProcessKeyedElements/GroupByKey ... was not replaced as expected", the same for every
splittable DoFn in streaming mode), and Prism would have to download its binary. The other path,
``has_deduplication=False``, is ``PeriodicImpulse`` + ``MatchAll``, which waits on the real clock
on every runner; it lists every file at every poll, and :class:`FirstMatchOnly` keeps the first
sighting of each path in per-key state, which every Beam runner checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import FixedWindows
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Duration, Timestamp

from epee.histogram import ExitHistogram
from transforms.context import AuditConfig
from transforms.inference import EarlyExitInference
from transforms.job import EarlyExitJob
from transforms.readers import DEAD, INPUTS, NAMESPACE, ReadDicom
from transforms.runners import pipeline_runner
from transforms.writers import OUTPUT_SCHEMAS, ExitStatsFn, WriteWindowedOutputs

from .common import StartupError, summarize
from .options import EpeeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamingConfig:
    poll_interval: float = 10.0  # seconds between two listings of the pattern: latency vs. listing cost (one LIST per poll on s3/gs)
    window_seconds: int = 60  # fixed window length: how soon a file's results are written vs. how many small files
    stop_after: float | None = None  # seconds after the start at which the watch stops; None: until the job is cancelled

    def __post_init__(self) -> None:
        if not (math.isfinite(self.poll_interval) and self.poll_interval > 0):
            raise ValueError(f"--poll_interval must be a positive number of seconds, got {self.poll_interval}")
        if isinstance(self.window_seconds, bool) or not isinstance(self.window_seconds, int) or self.window_seconds < 1:
            raise ValueError(f"--window_seconds must be a whole number of seconds >= 1, got {self.window_seconds}")
        if self.stop_after is not None and not (math.isfinite(self.stop_after) and self.stop_after > 0):
            raise ValueError(f"--stop_after must be a positive number of seconds, got {self.stop_after}")

    @classmethod
    def from_options(cls, opts: EpeeOptions) -> "StreamingConfig":
        try:
            return cls(poll_interval=opts.poll_interval, window_seconds=opts.window_seconds, stop_after=opts.stop_after)
        except ValueError as exc:
            raise StartupError(str(exc)) from None


class FirstMatchOnly(beam.DoFn):
    """``(path, FileMetadata)`` -> the FileMetadata of the first match of each path, once per run.

    Every poll lists every file; a per-path flag in Beam state (kept in the global window, so it
    outlives the output windows) lets only the first sighting through. A file that is rewritten
    under the same name is not read again (as ``match_updated_files=False``).
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())

    def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
        _, metadata = element
        if seen.read():
            return
        seen.write(True)
        Metrics.counter(NAMESPACE, "files_matched").inc()
        yield metadata


def _path_key(metadata) -> tuple[str, object]:
    return metadata.path, metadata


class WatchFiles(beam.PTransform):
    """Pattern -> ReadableFile, each file once, stamped with the time of the poll that first found
    it and placed in fixed windows of ``config.window_seconds``."""

    def __init__(self, pattern: str, config: StreamingConfig, start: Timestamp) -> None:
        super().__init__()
        self.pattern, self.config, self.start = pattern, config, start

    def expand(self, pbegin):
        cfg = self.config
        stop = MAX_TIMESTAMP if cfg.stop_after is None else self.start + Duration(cfg.stop_after)
        return (
            pbegin
            # start_timestamp is passed explicitly: Beam's default is evaluated once, at import time
            | "MatchContinuously" >> fileio.MatchContinuously(
                self.pattern, interval=cfg.poll_interval, start_timestamp=self.start, stop_timestamp=stop,
                has_deduplication=False, match_updated_files=False)
            # a str key: a deterministic coder, as per-key state needs
            | "KeyByPath" >> beam.Map(_path_key).with_output_types(beam.typehints.KV[str, beam.typehints.Any])
            | "FirstMatchOnly" >> beam.ParDo(FirstMatchOnly())
            | "Window" >> beam.WindowInto(FixedWindows(cfg.window_seconds))
            | "Open" >> fileio.ReadMatches()
        )


class ReadWatched(beam.PTransform):
    """PBegin -> the readers' outputs (``records``, ``DEAD``, ``INPUTS``) of every file
    :class:`WatchFiles` finds, read by the batch reader's per-file DoFn."""

    def __init__(self, pattern: str, config: StreamingConfig, start: Timestamp, read_file: beam.DoFn) -> None:
        super().__init__()
        self.pattern, self.config, self.start, self.read_file = pattern, config, start, read_file

    def expand(self, pbegin):
        files = pbegin | "Watch" >> WatchFiles(self.pattern, self.config, self.start)
        return files | "Read" >> beam.ParDo(self.read_file).with_outputs(DEAD, INPUTS, main="records")


def is_direct_runner(options: PipelineOptions) -> bool:
    """--runner unset (Beam's default), DirectRunner, or one of the DirectRunner's own runners."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner is not None else "DirectRunner"
    return name.rsplit(".", 1)[-1].lower().removesuffix("runner") in ("direct", "switchingdirect", "bundlebaseddirect")


def is_local_job_service(options: PipelineOptions, timeout_s: float = 10.0) -> bool:
    """PortableRunner whose job service is Beam's own Python one (``--job_endpoint embed``, or an
    address whose service describes no runner options: Flink's and Spark's job servers list
    theirs; Beam's LocalJobServicer runs the FnApiRunner, batch semantics, and lists none).
    An unreachable endpoint is not judged here: the runner reports it."""
    from apache_beam.options.pipeline_options import PortableOptions

    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner is not None else ""
    if name.rsplit(".", 1)[-1].lower().removesuffix("runner") != "portable":
        return False
    endpoint = options.view_as(PortableOptions).job_endpoint
    if not endpoint or endpoint == "embed":
        return endpoint == "embed"
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc

    try:
        with grpc.insecure_channel(endpoint) as channel:
            described = beam_job_api_pb2_grpc.JobServiceStub(channel).DescribePipelineOptions(
                beam_job_api_pb2.DescribePipelineOptionsRequest(), timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError:
        return False
    return not described.options


def file_dofn(reader: beam.PTransform) -> beam.DoFn:
    """The per-file DoFn of a batch reader (ReadNotes.parse or ReadDicom.decode), configured as in batch mode."""
    return reader.decode if isinstance(reader, ReadDicom) else reader.parse


def run_streaming(options: PipelineOptions, reader: beam.PTransform, inference: EarlyExitInference,
                  stats_fn: ExitStatsFn, started: float) -> dict:
    """Build and run the streaming pipeline; returns after the watch stops and every window is written.

    ``reader``, ``inference`` and ``stats_fn`` are the batch pipeline's own (built by
    :func:`pipelines.common.run`); windows are aligned to the epoch (``FixedWindows``).
    """
    opts = options.view_as(EpeeOptions)
    config = StreamingConfig.from_options(opts)
    if config.stop_after is None and (is_direct_runner(options) or is_local_job_service(options)):
        where = "the DirectRunner" if is_direct_runner(options) else "Beam's local job service"
        raise StartupError(f"--streaming on {where} needs --stop_after: it writes the windows only once the "
                           "watch has stopped (its FnApiRunner runs a grouping step after its input is complete). "
                           "To watch until cancelled, use a streaming runner (--runner DataflowRunner, FlinkRunner)")
    run_id = stats_fn.run_id
    output = opts.output.rstrip("/")
    # WriteToFiles writes each bundle's rows here first, then moves them to their final names
    temp_directory = FileSystems.join(output, f".temp-{run_id}")
    start = Timestamp.of(time.time())
    log.info("streaming: watching %s every %ss, %ss windows, %s", opts.input, config.poll_interval,
             config.window_seconds, f"stopping after {config.stop_after}s" if config.stop_after else "until cancelled")
    read_file = file_dofn(reader)
    key_source = getattr(read_file, "key_source", None)  # --pseudonymize_ids, as the reader has it
    with beam.Pipeline(runner=pipeline_runner(options), options=options) as p:
        p | "Job" >> EarlyExitJob(ReadWatched(opts.input, config, start, read_file), inference,
                                  WriteWindowedOutputs(output, stats_fn, temp_directory, key_source))
    remove_temp_directory(temp_directory)
    return summarize_windows(output, run_id, time.time() - started, stats_fn.audit)


def remove_temp_directory(temp_directory: str) -> None:
    """Every temporary file has been moved once the pipeline is done; leftovers come from retried
    bundles (their rows were written by the retry) and are reported, not deleted."""
    leftovers = FileSystems.match([FileSystems.join(temp_directory, "*")])[0].metadata_list
    if leftovers:
        log.warning("streaming: %d temporary files left under %s (retried bundles)", len(leftovers), temp_directory)
    elif FileSystems.exists(temp_directory):
        FileSystems.delete([temp_directory])


def summarize_windows(output: str, run_id: str, wall: float, audit: AuditConfig | None = None) -> dict:
    """The batch summary (records, predictions, dead letters by reason) with the exit statistics
    summed over every window's ``exit_stats`` row instead of the first row alone; the audit is
    judged per window (each window's row has its own ``audit_status``: the run fails if one did)."""
    import pyarrow.parquet as pq

    summary = summarize(output, run_id, wall, audit=audit)
    rows, windows = [], set()
    for kind in OUTPUT_SCHEMAS:
        for m in FileSystems.match([f"{output}/{kind}-*.parquet"])[0].metadata_list:
            windows.add(m.path.rsplit("/", 1)[-1][len(kind) + 1:].rsplit("-", 3)[0])  # "{start}-{end}"
            if kind == "exit_stats":
                with FileSystems.open(m.path) as fh:
                    rows += pq.read_table(fh).to_pylist()
    exits = ExitHistogram()
    for r in rows:
        exits.merge(ExitHistogram(list(r["exits_per_layer"])))
    num_layers = rows[0]["num_layers"] if rows else None
    summary.update(windows=len(windows), exits_per_layer=exits.exits_per_layer or None,
                   mean_exit_layer=exits.mean_exit_layer if exits.samples else None, num_layers=num_layers,
                   layer_speedup=exits.speedup(num_layers) if exits.samples else None)
    return summary
