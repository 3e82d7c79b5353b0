"""Writing predictions, dead letters and exit statistics to Parquet: per run (batch) or per window (streaming)."""

from __future__ import annotations

import time
import zlib
from collections import Counter
from typing import IO, Any, Iterable, Iterator, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.value_provider import StaticValueProvider
from apache_beam.transforms.window import IntervalWindow

from epee.flops import savings
from epee.histogram import ExitHistogram

from .audit import AuditTally
from .context import AuditConfig
from .privacy import KeySource
from .records import (
    DEAD_LETTER_SCHEMA, EXIT_STATS_SCHEMA, INPUTS_SCHEMA, PREDICTION_SCHEMA, AuditedPrediction, DeadLetter, ExitStats,
    InputFile, PredictionRecord, stats_label,
)


class ExitStatsFn(beam.CombineFn):
    """Counts per exit layer, per label and per reason; one ExitStats row per run (or window).

    The accumulator holds one :class:`~epee.histogram.ExitHistogram` for the run and one per
    label (:func:`~transforms.records.stats_label`), the reasons, the three MAC sums and the
    audit's tally (:class:`~transforms.audit.AuditTally`, from the audited predictions).
    ``audit``: the run's audit settings, for the audit columns and the row's ``audit_status``.
    """

    def __init__(self, run_id: str, model_id: str, task: str, num_layers: int, started_at: float,
                 audit: AuditConfig | None = None) -> None:
        self.run_id, self.model_id, self.task = run_id, model_id, task
        self.num_layers, self.started_at = num_layers, started_at
        self.audit = audit or AuditConfig()

    def create_accumulator(self) -> dict:
        return {"exits": ExitHistogram.of_depth(self.num_layers), "labels": {}, "reasons": Counter(), "macs": [0, 0, 0],
                "audit": AuditTally()}

    def add_input(self, acc: dict, p: PredictionRecord) -> dict:
        acc["exits"].add(p.exit_layer)
        acc["labels"].setdefault(stats_label(p.label, p.event_spans), ExitHistogram()).add(p.exit_layer)
        acc["reasons"][p.exit_reason] += 1
        m = acc["macs"]
        m[0] += p.macs
        m[1] += p.dense_exit_macs
        m[2] += p.dense_full_macs
        if isinstance(p, AuditedPrediction) and p.audit is not None:
            acc["audit"].add(p.exit_layer, p.audit.label, p.audit.agrees, p.audit.macs)
        return acc

    def merge_accumulators(self, accs: Iterable[dict]) -> dict:
        out = self.create_accumulator()
        for a in accs:
            out["exits"].merge(a["exits"])
            for label, h in a["labels"].items():
                out["labels"].setdefault(label, ExitHistogram()).merge(h)
            out["reasons"].update(a["reasons"])
            out["macs"] = [x + y for x, y in zip(out["macs"], a["macs"])]
            out["audit"].merge(a["audit"])
        return out

    def extract_output(self, acc: dict) -> dict:
        exits: ExitHistogram = acc["exits"]
        return ExitStats(
            run_id=self.run_id, model_id=self.model_id, task=self.task, records=exits.samples, num_layers=self.num_layers,
            exits_per_layer=exits.exits_per_layer, mean_exit_layer=exits.mean_exit_layer,
            layer_speedup=exits.speedup(self.num_layers),
            label_counts=[{"label": k, "count": h.samples, "mean_exit_layer": h.mean_exit_layer}
                          for k, h in sorted(acc["labels"].items())],
            exit_reason_counts=[{"reason": k, "count": v} for k, v in sorted(acc["reasons"].items())],
            wall_seconds=time.time() - self.started_at,
            macs=acc["macs"][0], dense_exit_macs=acc["macs"][1], dense_full_macs=acc["macs"][2],
            **{f"macs_{k}": v for k, v in savings(*acc["macs"]).items() if k != "relative_cost"},
            **acc["audit"].columns(self.audit.fraction, self.audit.min_agreement, acc["macs"][0], self.audit.confidence),
        ).to_row()


def prediction_row(p: PredictionRecord) -> dict[str, Any]:
    """A prediction's row, audited or not (an AuditedPrediction's row leaves its audit out)."""
    return p.to_row()


def shard_of(row: dict, num_shards: int) -> int:
    """A stable shard for a row (zlib.crc32, not Python's per-process salted hash)."""
    key = row.get("record_id") or row.get("source_uri") or row.get("uri") or ""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_shards


def row_sort_key(row: dict) -> tuple:
    return tuple("" if row.get(k) is None else str(row[k])
                 for k in ("record_id", "source_uri", "uri", "stage", "error_type", "message"))


class WriteSortedShards(beam.PTransform):
    """Rows -> ``{directory}/{kind}-SSSSS-of-NNNNN.parquet``, deterministic: rows go to a shard by a
    stable hash of their id and are sorted within it, so the same inputs give byte-identical files
    whatever the runner's bundling. Every shard file is written, empty ones included.
    ``key_source``: pseudonymise id fields on the way out.

    Memory stays flat as the archive grows (an external merge sort): rows are sorted in runs of
    at most ``run_rows`` and each run is spilled to a temporary Parquet file per shard under
    ``{directory}/_runs-{kind}/``; only the runs' paths are grouped by shard, and each shard is
    written by merging its runs, reading ``merge_batch`` rows of each at a time. No step holds
    more than one run of rows, whatever the number of records.
    """

    def __init__(self, directory: str, kind: str, schema: pa.Schema, num_shards: int = 1,
                 key_source: KeySource | None = None, run_rows: int = 20000, merge_batch: int = 256) -> None:
        super().__init__()
        self.directory, self.kind, self.schema = directory.rstrip("/"), kind, schema
        self.num_shards, self.key_source = num_shards, key_source
        self.run_rows, self.merge_batch = run_rows, merge_batch

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        n = self.num_shards
        runs = rows | "SortedRuns" >> beam.ParDo(_SpillSortedRuns(self.directory, self.kind, self.schema, n,
                                                                  self.key_source, self.run_rows))
        every = rows.pipeline | "AllShards" >> beam.Create([(i, None) for i in range(n)])
        return ((runs, every) | "WithEmpty" >> beam.Flatten() | "Group" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteShard(self.directory, self.kind, self.schema, n, self.merge_batch)))


class _SpillSortedRuns(beam.DoFn):
    """Rows -> (shard, path of a temporary Parquet file of that shard's rows, sorted).

    Buffered rows are kept as Arrow tables of CHUNK rows (a few hundred bytes a row) and their
    sort keys, not as Python dicts (several kilobytes a row); a run is sorted by key when spilled.
    """

    CHUNK = 1024

    def __init__(self, directory: str, kind: str, schema: pa.Schema, num_shards: int, key_source: KeySource | None,
                 run_rows: int) -> None:
        self.directory, self.kind, self.schema = directory, kind, schema
        self.num_shards, self.key_source, self.run_rows = num_shards, key_source, run_rows

    def setup(self) -> None:
        self.pz = None
        if self.key_source is not None:
            self.pz = self.key_source.pseudonymizer()

    def start_bundle(self) -> None:
        self.pending: dict[int, list[dict]] = {}  # rows not yet in an Arrow chunk
        self.tables: dict[int, list[pa.Table]] = {}
        self.keys: dict[int, list[tuple]] = {}
        self.count = 0

    def process(self, row: dict) -> Iterator[tuple[int, str]]:
        if self.pz is not None:
            row = self.pz.row(row)
        shard = shard_of(row, self.num_shards)
        self.keys.setdefault(shard, []).append(row_sort_key(row))
        rows = self.pending.setdefault(shard, [])
        rows.append(row)
        if len(rows) >= self.CHUNK:
            self._to_arrow(shard)
        self.count += 1
        if self.count >= self.run_rows:
            yield from self._spill()

    def finish_bundle(self) -> Iterator[Any]:
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for kv in self._spill():
            yield WindowedValue(kv, GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _to_arrow(self, shard: int) -> None:
        rows = self.pending.pop(shard, [])
        if rows:
            self.tables.setdefault(shard, []).append(pa.Table.from_pylist(rows, schema=self.schema))

    def _spill(self) -> Iterator[tuple[int, str]]:
        import uuid

        from apache_beam.io.filesystems import FileSystems

        for shard in sorted(self.keys):
            self._to_arrow(shard)
            keys = self.keys[shard]
            order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: equal keys keep arrival order
            table = pa.concat_tables(self.tables[shard]).take(pa.array(order, type=pa.int64()))
            path = f"{self.directory}/_runs-{self.kind}/{shard:05d}-{uuid.uuid4().hex}.parquet"
            with FileSystems.create(path) as fh:
                pq.write_table(table, fh)
            yield shard, path
        self.pending, self.tables, self.keys, self.count = {}, {}, {}, 0


def _run_rows(path: str, batch: int) -> Iterator[dict]:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as fh:
        for record_batch in pq.ParquetFile(fh).iter_batches(batch_size=batch):
            yield from record_batch.to_pylist()


class _WriteShard(beam.DoFn):
    """(shard, run paths) -> the shard's Parquet file: its sorted runs merged, written in row groups."""

    ROW_GROUP = 8192

    def __init__(self, directory: str, kind: str, schema: pa.Schema, num_shards: int, merge_batch: int) -> None:
        self.directory, self.kind, self.schema, self.num_shards = directory, kind, schema, num_shards
        self.merge_batch = merge_batch

    def process(self, keyed: tuple[int, Iterable[str | None]]) -> Iterator[str]:
        import heapq

        from apache_beam.io.filesystems import FileSystems

        shard, paths = keyed
        paths = sorted(p for p in paths if p is not None)  # a fixed order: ties merge the same way every run
        path = f"{self.directory}/{self.kind}-{shard:05d}-of-{self.num_shards:05d}.parquet"
        left = [p for p in paths if FileSystems.exists(p)]
        if len(left) < len(paths) and FileSystems.exists(path):
            # a rerun of this step after it had finished writing (a runner lost its result with a
            # worker, e.g. Dask): runs are deleted only once the shard is complete
            if left:
                FileSystems.delete(left)
            yield path
            return
        merged = heapq.merge(*(_run_rows(p, self.merge_batch) for p in paths), key=row_sort_key)
        with FileSystems.create(path) as fh:
            with pq.ParquetWriter(fh, self.schema) as writer:
                chunk: list[dict] = []
                for row in merged:
                    chunk.append(row)
                    if len(chunk) == self.ROW_GROUP:
                        writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema))
                        chunk = []
                if chunk or not paths:  # an empty shard is still a file with the schema
                    writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema))
        if paths:
            FileSystems.delete(paths)
        yield path


class WriteOutputs(beam.PTransform):
    """predictions -> {directory}/predictions-*.parquet, dead letters -> dead_letters-*.parquet,
    exit statistics -> exit_stats-*.parquet, and, when given, the inputs table -> inputs-*.parquet.

    The batch pipeline points ``directory`` at a staging directory and moves the files into
    place only after the whole run succeeded (pipelines.outputs.commit), so a failed run never
    leaves partial files where the next step reads.
    """

    def __init__(self, output: str, stats_fn: ExitStatsFn, num_shards: int = 1,
                 key_source: KeySource | None = None) -> None:
        super().__init__()
        self.output, self.stats_fn = output.rstrip("/"), stats_fn
        self.num_shards, self.key_source = num_shards, key_source

    def expand(self, pcolls: Sequence[beam.PCollection]) -> Sequence[beam.PCollection]:
        predictions, dead, *inputs = pcolls
        d, n, k = self.output, self.num_shards, self.key_source
        (predictions | "PredictionRows" >> beam.Map(prediction_row)
                     | "WritePredictions" >> WriteSortedShards(d, "predictions", PREDICTION_SCHEMA, n, k))
        (dead | "DeadRows" >> beam.Map(DeadLetter.to_row)
              | "WriteDeadLetters" >> WriteSortedShards(d, "dead_letters", DEAD_LETTER_SCHEMA, n, k))
        (predictions | "ExitStats" >> beam.CombineGlobally(self.stats_fn)
                     | "WriteExitStats" >> WriteSortedShards(d, "exit_stats", EXIT_STATS_SCHEMA, 1))
        if inputs:  # URIs are pseudonymised by the reader already (it compares them with --skip_processed)
            (inputs[0] | "InputRows" >> beam.Map(InputFile.to_row)
                       | "WriteInputs" >> WriteSortedShards(d, "inputs", INPUTS_SCHEMA, 1))
        return pcolls


# -- streaming: Parquet files per fixed window -----------------------------------------------------
OUTPUT_SCHEMAS = {"predictions": PREDICTION_SCHEMA, "dead_letters": DEAD_LETTER_SCHEMA, "exit_stats": EXIT_STATS_SCHEMA,
                  "inputs": INPUTS_SCHEMA}


class ParquetFileSink(fileio.FileSink):
    """A ``fileio.FileSink`` that writes ``(kind, row)`` elements as one Parquet file of ``schema``.

    ``WriteToFiles`` calls ``flush`` once, right before it closes the file, and a Parquet file is
    only valid once its footer is written; so rows are buffered and written as one table there.
    A file holds one window's rows of one kind from one bundle.
    """

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._fh = None
        self._rows: list[dict] = []

    def create_metadata(self, destination: str, full_file_name: str) -> fileio.FileMetadata:
        return fileio.FileMetadata(mime_type="application/vnd.apache.parquet",
                                   compression_type=CompressionTypes.UNCOMPRESSED)

    def open(self, fh: IO[bytes]) -> None:
        self._fh, self._rows = fh, []

    def write(self, element: tuple[str, dict]) -> None:
        self._rows.append(element[1])

    def flush(self) -> None:
        if self._fh is None:
            raise RuntimeError("ParquetFileSink.flush() called twice: a Parquet file cannot be appended to")
        pq.write_table(pa.Table.from_pylist(self._rows, schema=self.schema), self._fh)
        self._fh, self._rows = None, []


def parquet_sink_for(kind: str) -> ParquetFileSink:
    return ParquetFileSink(OUTPUT_SCHEMAS[kind])


def output_kind(element: tuple[str, dict]) -> str:
    return element[0]


def _utc(ts: Any) -> str:
    return ts.to_utc_datetime().strftime("%Y%m%dT%H%M%SZ")


def window_file_name(window: Any, pane: Any, shard_index: int, total_shards: int, compression: Any,
                     destination: str) -> str:
    """``{kind}-{window start}-{window end}-{shard}-of-{shards}.parquet``, times in UTC
    (``predictions-20261122T101500Z-20261122T101600Z-00000-of-00002.parquet``): the files of one
    window sort together, and ``{kind}-*.parquet`` matches every window."""
    span = f"{_utc(window.start)}-{_utc(window.end)}" if isinstance(window, IntervalWindow) else "global"
    return f"{destination}-{span}-{int(shard_index):05d}-of-{int(total_shards):05d}.parquet"


def _prediction_row(p: PredictionRecord) -> tuple[str, dict]:
    return "predictions", p.to_row()


def _dead_letter_row(d: DeadLetter) -> tuple[str, dict]:
    return "dead_letters", d.to_row()


def _exit_stats_row(row: dict) -> tuple[str, dict]:
    return "exit_stats", row


def _inputs_row(f: InputFile) -> tuple[str, dict]:
    return "inputs", f.to_row()


class _PseudonymizeRows(beam.DoFn):
    """``(kind, row)`` -> the same with record ids and URIs replaced by their keyed HMAC
    (``--pseudonymize_ids``); the key is read on the worker, never carried in the graph."""

    def __init__(self, key_source: KeySource) -> None:
        self.key_source = key_source

    def setup(self) -> None:
        self.pz = self.key_source.pseudonymizer()

    def process(self, element: tuple[str, dict]) -> Iterator[tuple[str, dict]]:
        kind, row = element
        yield kind, self.pz.row(row)


class WriteWindowedOutputs(beam.PTransform):
    """Windowed predictions, dead letters and (optionally) the readers' inputs table -> Parquet
    files per window under ``output``: ``predictions-*``, ``dead_letters-*``, ``exit_stats-*``
    (one statistics row per window that has predictions) and ``inputs-*``, named by
    :func:`window_file_name`. ``key_source``: pseudonymise record ids and URIs on the way out
    (the inputs table's URIs are pseudonymised by the reader already).

    Beam's ``WriteToFiles`` writes each bundle's rows to a temporary file under ``temp_directory``
    and, once the window's watermark has passed, moves them to their final names, so a reader
    never sees a half-written file. Same schemas as the batch :class:`WriteOutputs`.
    """

    def __init__(self, output: str, stats_fn: ExitStatsFn, temp_directory: str,
                 key_source: KeySource | None = None) -> None:
        super().__init__()
        self.output, self.stats_fn, self.temp_directory = output.rstrip("/"), stats_fn, temp_directory
        self.key_source = key_source

    def expand(self, pcolls: Sequence[beam.PCollection]) -> beam.PCollection:
        predictions, dead, *inputs = pcolls
        # without_defaults: a window with no prediction gets no statistics row (there is no
        # global "empty" default in non-global windows).
        stats = predictions | "ExitStats" >> beam.CombineGlobally(self.stats_fn).without_defaults()
        record_rows = (
            predictions | "PredictionRows" >> beam.Map(_prediction_row),
            dead | "DeadRows" >> beam.Map(_dead_letter_row),
        ) | "RecordRows" >> beam.Flatten()
        if self.key_source is not None:
            record_rows = record_rows | "Pseudonymize" >> beam.ParDo(_PseudonymizeRows(self.key_source))
        parts = [record_rows, stats | "ExitStatsRows" >> beam.Map(_exit_stats_row)]
        if inputs:
            parts.append(inputs[0] | "InputsRows" >> beam.Map(_inputs_row))
        rows = tuple(parts) | "AllRows" >> beam.Flatten()
        return rows | "WriteWindows" >> fileio.WriteToFiles(
            path=self.output, file_naming=window_file_name, destination=output_kind, sink=parquet_sink_for,
            temp_directory=StaticValueProvider(str, self.temp_directory))
