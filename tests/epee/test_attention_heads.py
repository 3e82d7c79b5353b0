"""Exit heads that read a layer's attention sublayer (EarlyExitConfig.head_input "attention"): a
record that exits skips its exit layer's feed-forward; everything else is the same model."""

import dataclasses

import pytest
import torch

from epee import EarlyExitConfig, EarlyExitEngine, EarlyExitModel, EngineConfig, ExitPolicyConfig, collate, run_reference
from epee.policies import ExitPolicy
from tests.conftest import make_samples, safe_threshold, tiny_backbone_config, tiny_model
from tests.epee.test_engine import assert_same_predictions

CASES = [("sequence", "mean"), ("token", "default"), ("sequence", "default"), ("relation", "default")]


def attention_model(task, pooling, samples, seed=0):
    model = tiny_model("bert", task, pooling=pooling, seed=seed)
    model.config = dataclasses.replace(model.config, head_input="attention")
    tau = safe_threshold(model, samples, 0.5)
    model.config = dataclasses.replace(model.config, policy=ExitPolicyConfig(kind="epee", entropy_threshold=tau,
                                                                             patience=2))
    return model


def test_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="head_input"):
        EarlyExitConfig(task="sequence", label_names=("a", "b"), head_input="ffn")
    cfg = EarlyExitConfig(task="sequence", label_names=("a", "b"), pooling="mean", head_input="attention")
    assert EarlyExitConfig.from_dict(cfg.to_dict()) == cfg
    assert EarlyExitConfig.from_dict({"task": "sequence", "label_names": ["a", "b"]}).head_input == "layer"


@pytest.mark.parametrize("family", ["albert", "gpt2", "vit"])
def test_families_that_cannot_split_after_attention_are_refused(family):
    with pytest.raises(ValueError, match="head_input 'attention'"):
        EarlyExitModel.from_config(tiny_backbone_config(family),
                                   EarlyExitConfig(task="sequence", label_names=("a", "b"), head_input="attention"))


@pytest.mark.parametrize("task, pooling", CASES)
def test_heads_read_the_attention_sublayer_and_the_backbone_is_unchanged(task, pooling):
    """Each head but the last reads what BertAttention returns (hooked on the stock modules); the
    last reads the last layer's output, the same as with head_input 'layer'."""
    samples = make_samples("bert", task, n=10)
    model = tiny_model("bert", task, pooling=pooling)
    batch = collate(samples, model.adapter.pad_token_id)
    before = [f.clone() for f in model.layer_features(batch)]
    seen = []
    hooks = [model.backbone.encoder.layer[i].attention.register_forward_hook(lambda m, a, out: seen.append(out[0]))
             for i in range(model.num_layers)]
    model.config = dataclasses.replace(model.config, head_input="attention")
    try:
        with torch.no_grad():
            after = model.layer_features(batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == model.num_layers
    for i in range(model.num_layers - 1):
        expected = model.head_features(seen[i], batch.attention_mask, batch.entity_positions)
        torch.testing.assert_close(after[i], expected, atol=1e-6, rtol=0)
        assert not torch.allclose(after[i], before[i])
    torch.testing.assert_close(after[-1], before[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("task, pooling", CASES)
def test_engine_matches_reference_and_forward_whatever_the_batch(task, pooling):
    samples = make_samples("bert", task, n=24)
    model = attention_model(task, pooling, samples)
    reference = run_reference(model, samples)
    assert len({p.exit_layer for p in reference}) > 1, "test needs samples exiting at different layers"
    for bsz in (1, 3, 8, 32):
        assert_same_predictions(EarlyExitEngine(model, EngineConfig(batch_size=bsz)).run(samples).predictions, reference)
    if task == "sequence":  # the exit layer's head, from the full-depth forward, gives the same probabilities
        with torch.no_grad():
            logits = [model(collate([s], model.adapter.pad_token_id)).logits for s in samples]
        for p, lg in zip(reference, logits):
            torch.testing.assert_close(torch.from_numpy(p.probs), torch.softmax(lg[p.exit_layer - 1][0], -1),
                                       atol=1e-5, rtol=0)


def test_exiting_rows_never_run_their_exit_layers_feed_forward(monkeypatch):
    samples = make_samples("bert", "sequence", n=30)
    model = attention_model("sequence", "mean", samples)
    adapter = model.adapter
    attention, feed_forward = [0] * model.num_layers, [0] * model.num_layers
    real_attention, real_ffn, real_layer = adapter.layer_attention, adapter.layer_feed_forward, adapter.layer

    def counted_attention(i, hidden, bias):
        attention[i] += hidden.shape[0]
        return real_attention(i, hidden, bias)

    def counted_ffn(i, hidden):
        feed_forward[i] += hidden.shape[0]
        return real_ffn(i, hidden)

    def whole(i, hidden, bias):  # only the last layer runs whole
        attention[i] += hidden.shape[0]
        feed_forward[i] += hidden.shape[0]
        return real_layer(i, hidden, bias)

    monkeypatch.setattr(adapter, "layer_attention", counted_attention)
    monkeypatch.setattr(adapter, "layer_feed_forward", counted_ffn)
    monkeypatch.setattr(adapter, "layer", whole)
    result = EarlyExitEngine(model, EngineConfig(batch_size=4, split_layers=False)).run(samples)
    exits = [p.exit_layer for p in result.predictions]
    assert len(set(exits)) > 1
    last = model.num_layers
    assert attention == [sum(1 for e in exits if e > i) for i in range(last)]
    # layers before the last: only the rows that go on; the last layer: whoever reaches it
    assert feed_forward == [sum(1 for e in exits if e > i + 1) for i in range(last - 1)] + [exits.count(last)]


def test_macs_leave_out_the_skipped_feed_forward():
    samples = make_samples("bert", "sequence", n=30)
    model = attention_model("sequence", "mean", samples)
    result = EarlyExitEngine(model, EngineConfig(batch_size=8)).run(samples)
    layer_model = tiny_model("bert", "sequence", pooling="mean")  # same weights (seed 0), heads on layer outputs
    layer_engine = EarlyExitEngine(layer_model, EngineConfig(batch_size=8))
    ffn = sum(w.numel() for w in model.adapter.feed_forward_weights(0))
    assert ffn == 2 * model.adapter.hidden_size * model.backbone.config.intermediate_size
    exits = set()
    for s, p in zip(samples, result.predictions):
        whole = layer_engine.macs.count(torch.tensor([s.length]), torch.tensor([p.exit_layer]))[0]
        skipped = ffn * s.length if p.exit_layer < model.num_layers else 0
        assert (p.macs, p.dense_exit_macs) == (whole.actual - skipped, whole.dense_at_exit - skipped)
        exits.add(p.exit_layer)
    assert len(exits) > 1 and min(exits) < model.num_layers
    assert result.stats.two_step_calls > 0


def test_full_depth_is_the_unchanged_model():
    samples = make_samples("bert", "sequence", n=12)
    model = tiny_model("bert", "sequence", pooling="mean")
    none = ExitPolicy(ExitPolicyConfig(kind="none"), model.num_layers)
    before = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples, none).predictions
    model.config = dataclasses.replace(model.config, head_input="attention")
    after = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples, none).predictions
    assert_same_predictions(after, before)
    assert all(p.macs == q.macs for p, q in zip(after, before))


def test_trains_saves_and_loads(tmp_path):
    from epee.training import TrainConfig, train

    samples = make_samples("bert", "sequence", n=16)
    model = tiny_model("bert", "sequence", pooling="mean")
    model.config = dataclasses.replace(model.config, head_input="attention")
    before = [p.detach().clone() for p in model.backbone.encoder.layer[0].intermediate.parameters()]
    labels = [i % 3 for i in range(16)]
    train(model, samples, labels, samples[:4], labels[:4], lambda gold, pred: 0.0,
          TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3), progress=False)
    after = list(model.backbone.encoder.layer[0].intermediate.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the feed-forward is still trained
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.config.head_input == "attention"
    batch = collate(samples, model.adapter.pad_token_id)
    with torch.no_grad():
        for a, b in zip(model.eval()(batch).logits, loaded(batch).logits):
            torch.testing.assert_close(a, b)
