"""WriteWindowedOutputs (streaming mode's writer) on a batch pipeline with timestamped records:
one set of Parquet files per window, named by the window, with pseudonymised ids."""

import time
import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from transforms.privacy import KEY_ENV, KeySource, Pseudonymizer
from transforms.records import DeadLetter, InputFile, PredictionRecord
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
        inputs = windowed(p, "Inputs", [(InputFile(uri="already-hashed", size=3, sha256="ab", status="processed",
                                                   records=2, run_id="w"), 1)])
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


def test_sorted_shards_merge_spilled_runs(tmp_path):
    """Batch writer: runs of at most run_rows rows are spilled and merged; the files hold every row,
    sorted, empty shards included, the same bytes whatever the run size, no run file left over."""
    from transforms.writers import WriteSortedShards

    rows = [prediction(i).to_row() for i in (7, 3, 11, 0, 5, 9, 1, 8, 2, 10, 4, 6)]
    written = {}
    for run_rows in (3, 1000):  # 4 spilled runs per bundle, or one
        out = tmp_path / f"out{run_rows}"
        with test_pipeline.TestPipeline(runner="BundleBasedDirectRunner") as p:
            (p | beam.Create(rows) | WriteSortedShards(str(out), "predictions", PREDICTION_SCHEMA, num_shards=3,
                                                       run_rows=run_rows, merge_batch=2))
        files = sorted(out.glob("predictions-*.parquet"))
        assert [f.name for f in files] == [f"predictions-0000{i}-of-00003.parquet" for i in range(3)]
        got = [pq.read_table(f).column("record_id").to_pylist() for f in files]
        assert sorted(i for ids in got for i in ids) == sorted(r["record_id"] for r in rows)
        assert all(ids == sorted(ids) for ids in got) and sum(1 for ids in got if ids) >= 2
        assert not list(out.glob("_runs-predictions/*"))  # spilled runs are deleted once merged
        written[run_rows] = [f.read_bytes() for f in files]
    assert written[3] == written[1000]


def test_sorted_shards_empty_input_writes_every_shard(tmp_path):
    from transforms.writers import WriteSortedShards

    with test_pipeline.TestPipeline(runner="BundleBasedDirectRunner") as p:
        (p | beam.Create([]) | WriteSortedShards(str(tmp_path), "dead_letters", PREDICTION_SCHEMA, num_shards=2))
    files = sorted(tmp_path.glob("dead_letters-*.parquet"))
    assert len(files) == 2 and all(pq.read_table(f).num_rows == 0 for f in files)
    assert pq.read_table(files[0]).schema.names == PREDICTION_SCHEMA.names


def test_a_shard_write_rerun_after_it_finished_keeps_the_shard(tmp_path):
    """A runner that lost the step's result with a worker (Dask) runs it again: the runs it
    merged are gone or going, the shard it wrote stays and is its output; an unfinished shard
    (its runs all there) is written again."""
    from transforms.writers import WriteSortedShards, _WriteShard

    rows = [prediction(i).to_row() for i in (3, 1, 2)]
    with test_pipeline.TestPipeline(runner="BundleBasedDirectRunner") as p:
        p | beam.Create(rows) | WriteSortedShards(str(tmp_path), "predictions", PREDICTION_SCHEMA, run_rows=1)
    (shard,) = tmp_path.glob("predictions-*.parquet")
    want = shard.read_bytes()
    gone = [str(tmp_path / "_runs-predictions" / f"00000-{i}.parquet") for i in range(3)]
    write = _WriteShard(str(tmp_path), "predictions", PREDICTION_SCHEMA, 1, 2)
    assert list(write.process((0, gone))) == [str(shard)] and shard.read_bytes() == want
    # killed between deleting runs: the one left is removed, the shard kept
    (tmp_path / "_runs-predictions").mkdir(exist_ok=True)
    pq.write_table(pq.read_table(shard).slice(0, 1), gone[1])
    assert list(write.process((0, gone))) == [str(shard)] and shard.read_bytes() == want
    assert not (tmp_path / "_runs-predictions" / "00000-1.parquet").exists()
    # killed while writing: every run still there, the shard is written again from them
    runs = [str(tmp_path / "_runs-predictions" / f"00000-r{i}.parquet") for i in range(3)]
    table = pq.read_table(shard)
    for i, path in enumerate(runs):
        pq.write_table(table.slice(i, 1), path)
    shard.write_bytes(b"partial")
    assert list(write.process((0, runs))) == [str(shard)] and shard.read_bytes() == want
