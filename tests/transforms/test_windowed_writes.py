"""WriteWindowedOutputs (streaming mode's writer) on a batch pipeline with timestamped records:
one set of Parquet files per window, named by the window, with pseudonymised ids."""

import time
import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from transforms.privacy import KEY_ENV, KeySource, Pseudonymizer
from transforms.records import DeadLetter, PredictionRecord
from transforms.writers import ParquetFileSink, PREDICTION_SCHEMA, ExitStatsFn, WriteWindowedOutputs

T0 = 1_800_000_000  # a multiple of 5 s: windows [T0, T0+5), [T0+10, T0+15)
KEY = b"0123456789abcdef0123"


def prediction(i: int) -> PredictionRecord:
    return PredictionRecord(record_id=f"note-{i}", source_uri="/archive/a.jsonl", task="sequence", label="c0",
                            score=0.9, probabilities=[0.9, 0.1], label_names=["c0", "c1"], exit_layer=1 + i % 2,
                            num_layers=2, exit_reason="entropy", entropy=0.1, windows=1, model_id="m", run_id="w")


def windowed(p, label: str, items):
    return (p | f"Create{label}" >> beam.Create([TimestampedValue(x, T0 + t) for x, t in items])
              | f"Window{label}" >> beam.WindowInto(FixedWindows(5)))


def test_one_file_set_per_window_with_pseudonymised_ids(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    out = tmp_path / "out"
    with test_pipeline.TestPipeline(runner="BundleBasedDirectRunner") as p:
        preds = windowed(p, "Predictions", [(prediction(0), 1), (prediction(1), 2), (prediction(2), 11)])
        dead = windowed(p, "Dead", [(DeadLetter("/archive/b.jsonl", "b#1", "read", "malformed_json", "line 1", "w"), 12)])
        inputs = windowed(p, "Inputs", [({"uri": "already-hashed", "size": 3, "sha256": "ab", "status": "processed",
                                         "records": 2, "run_id": "w"}, 1)])
        (preds, dead, inputs) | WriteWindowedOutputs(str(out), ExitStatsFn("w", "m", "sequence", 2, time.time()),
                                                     str(out / ".temp"), KeySource())

    names = sorted(f.name for f in out.glob("*.parquet"))
    first, second = "20270115T080000Z-20270115T080005Z", "20270115T080010Z-20270115T080015Z"
    assert names == [f"dead_letters-{second}-00000-of-00001.parquet", f"exit_stats-{first}-00000-of-00001.parquet",
                     f"exit_stats-{second}-00000-of-00001.parquet", f"inputs-{first}-00000-of-00001.parquet",
                     f"predictions-{first}-00000-of-00001.parquet", f"predictions-{second}-00000-of-00001.parquet"]
    rows = {n: pq.read_table(out / n).to_pylist() for n in names}
    pz = Pseudonymizer(KEY)
    assert sorted(r["record_id"] for r in rows[f"predictions-{first}-00000-of-00001.parquet"]) == sorted(
        [pz("note-0"), pz("note-1")])
    assert {r["source_uri"] for n in names if n.startswith("predictions") for r in rows[n]} == {pz("/archive/a.jsonl")}
    (d,) = rows[f"dead_letters-{second}-00000-of-00001.parquet"]
    assert (d["record_id"], d["source_uri"], d["error_type"]) == (pz("b#1"), pz("/archive/b.jsonl"), "malformed_json")
    (s1,) = rows[f"exit_stats-{first}-00000-of-00001.parquet"]
    (s2,) = rows[f"exit_stats-{second}-00000-of-00001.parquet"]
    assert (s1["records"], s1["exits_per_layer"], s2["records"], s2["exits_per_layer"]) == (2, [1, 1], 1, [1, 0])
    assert rows[f"inputs-{first}-00000-of-00001.parquet"][0]["uri"] == "already-hashed"  # the reader hashed it
    assert not any("note-" in str(r) or "/archive/" in str(r) for rs in rows.values() for r in rs)


def test_parquet_sink_refuses_a_second_flush(tmp_path):
    sink = ParquetFileSink(PREDICTION_SCHEMA)
    with open(tmp_path / "f.parquet", "wb") as fh:
        sink.open(fh)
        sink.write(("predictions", prediction(0).to_row()))
        sink.flush()
        with pytest.raises(RuntimeError, match="cannot be appended"):
            sink.flush()
    assert [r["record_id"] for r in pq.read_table(tmp_path / "f.parquet").to_pylist()] == ["note-0"]
