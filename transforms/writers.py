"""Writing predictions, dead letters and per-run exit statistics to Parquet."""

from __future__ import annotations

import time
from collections import Counter

import apache_beam as beam
from apache_beam.io.parquetio import WriteToParquet

from .records import (
    DEAD_LETTER_SCHEMA, EXIT_STATS_SCHEMA, PREDICTION_SCHEMA, DeadLetter, ExitStats, PredictionRecord,
)


class ExitStatsFn(beam.CombineFn):
    """Counts per exit layer, per label and per reason; one ExitStats row per run."""

    def __init__(self, run_id: str, model_id: str, task: str, num_layers: int, started_at: float) -> None:
        self.run_id, self.model_id, self.task = run_id, model_id, task
        self.num_layers, self.started_at = num_layers, started_at

    def create_accumulator(self):
        return {"n": 0, "layers": [0] * self.num_layers, "labels": Counter(), "label_layers": Counter(), "reasons": Counter()}

    def add_input(self, acc, p: PredictionRecord):
        acc["n"] += 1
        acc["layers"][p.exit_layer - 1] += 1
        label = p.label if p.label is not None else ("events" if p.event_spans else "no_event")
        acc["labels"][label] += 1
        acc["label_layers"][label] += p.exit_layer
        acc["reasons"][p.exit_reason] += 1
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out["n"] += a["n"]
            out["layers"] = [x + y for x, y in zip(out["layers"], a["layers"])]
            for k in ("labels", "label_layers", "reasons"):
                out[k].update(a[k])
        return out

    def extract_output(self, acc) -> dict:
        n = acc["n"]
        mean = sum((i + 1) * c for i, c in enumerate(acc["layers"])) / n if n else 0.0
        return ExitStats(
            run_id=self.run_id, model_id=self.model_id, task=self.task, records=n, num_layers=self.num_layers,
            exits_per_layer=list(acc["layers"]), mean_exit_layer=mean, layer_speedup=self.num_layers / mean if mean else 0.0,
            label_counts=[{"label": k, "count": v, "mean_exit_layer": acc["label_layers"][k] / v}
                          for k, v in sorted(acc["labels"].items())],
            exit_reason_counts=[{"reason": k, "count": v} for k, v in sorted(acc["reasons"].items())],
            wall_seconds=time.time() - self.started_at,
        ).to_row()


class WriteOutputs(beam.PTransform):
    """predictions -> {prefix}/predictions-*.parquet, dead letters -> {prefix}/dead_letters-*.parquet,
    exit statistics -> {prefix}/exit_stats-*.parquet."""

    def __init__(self, output: str, stats_fn: ExitStatsFn) -> None:
        super().__init__()
        self.output, self.stats_fn = output.rstrip("/"), stats_fn

    def expand(self, pcolls):
        predictions, dead = pcolls
        rows = predictions | "PredictionRows" >> beam.Map(PredictionRecord.to_row)
        rows | "WritePredictions" >> WriteToParquet(f"{self.output}/predictions", PREDICTION_SCHEMA,
                                                    file_name_suffix=".parquet", num_shards=1)
        (dead | "DeadRows" >> beam.Map(DeadLetter.to_row)
              | "WriteDeadLetters" >> WriteToParquet(f"{self.output}/dead_letters", DEAD_LETTER_SCHEMA,
                                                     file_name_suffix=".parquet", num_shards=1))
        (predictions | "ExitStats" >> beam.CombineGlobally(self.stats_fn)
                     | "WriteExitStats" >> WriteToParquet(f"{self.output}/exit_stats", EXIT_STATS_SCHEMA,
                                                          file_name_suffix=".parquet", num_shards=1))
        return pcolls
