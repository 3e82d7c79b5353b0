"""The early-exit model against the stock transformers forward."""

import pytest
import torch
from transformers import BertModel

from epee import EarlyExitConfig, EarlyExitEngine, EarlyExitModel, EngineConfig, ExitPolicyConfig, collate
from tests.conftest import FAMILY_TASKS, make_samples, tiny_backbone_config, tiny_model


def stock_last_head_probs(model, samples):
    """Full transformers forward on one padded batch, then the last exit head."""
    batch = collate(samples, model.adapter.pad_token_id)
    with torch.inference_mode():
        pooled, states = model.adapter.stock_forward(batch)
        head = model.exit_heads[-1]
        task = model.config.task
        if task == "sequence":
            return torch.softmax(head(pooled), -1)
        if task == "token":
            return torch.softmax(head(states), -1)
        rows = torch.arange(states.shape[0]).unsqueeze(1)
        pair = states[rows, batch.entity_positions].reshape(states.shape[0], -1)
        return torch.softmax(head(pair), -1)


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_policy_none_equals_stock_forward(family, task):
    model = tiny_model(family, task)
    samples = make_samples(family, task, n=10)
    expected = stock_last_head_probs(model, samples)
    result = EarlyExitEngine(model, EngineConfig(batch_size=4)).run(samples)
    for i, pred in enumerate(result.predictions):
        assert pred.exit_layer == model.num_layers and pred.exit_reason == "last_layer"
        if task == "token":
            k = samples[i].length
            torch.testing.assert_close(torch.from_numpy(pred.probs), expected[i, :k], atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(torch.from_numpy(pred.probs), expected[i], atol=1e-5, rtol=0)
            assert pred.label == int(expected[i].argmax())


@pytest.mark.parametrize("family, task", FAMILY_TASKS)
def test_all_layer_forward_shapes(family, task):
    model = tiny_model(family, task, layers=3, num_labels=5)
    samples = make_samples(family, task, n=4)
    out = model(collate(samples, model.adapter.pad_token_id))
    assert len(out.logits) == 3
    if task == "token":
        t = max(s.length for s in samples)
        assert all(tuple(lg.shape) == (4, t, 5) for lg in out.logits)
    else:
        assert all(tuple(lg.shape) == (4, 5) for lg in out.logits)


def test_relation_head_reads_both_entity_markers():
    model = tiny_model("bert", "relation")
    assert model.exit_heads[0].in_features == 2 * 32
    s = make_samples("bert", "relation", n=1)[0]
    moved = type(s)(input_ids=s.input_ids, entity_positions=(s.entity_positions[1], s.entity_positions[0]))
    a = EarlyExitEngine(model).run([s]).predictions[0].probs
    b = EarlyExitEngine(model).run([moved]).predictions[0].probs
    assert not torch.allclose(torch.from_numpy(a), torch.from_numpy(b))  # order of the pair matters


def test_vit_rejects_text_tasks():
    with pytest.raises(ValueError, match="supports task 'sequence' only"):
        EarlyExitModel.from_config(
            tiny_backbone_config("vit"), EarlyExitConfig(task="token", label_names=("a", "b"))
        )


def test_unsupported_backbone_named():
    from transformers import T5Config

    with pytest.raises(ValueError, match=r"model_type \('t5'\) is not supported"):
        EarlyExitModel.from_config(T5Config(), EarlyExitConfig(task="sequence", label_names=("a", "b")))


@pytest.mark.parametrize("family, task", [("bert", "relation"), ("albert", "sequence"), ("gpt2", "token"), ("vit", "sequence")])
def test_save_and_load_round_trip(tmp_path, family, task):
    policy = ExitPolicyConfig(kind="epee", entropy_threshold=0.4, patience=1)
    model = tiny_model(family, task, policy=policy)
    samples = make_samples(family, task, n=6)
    before = EarlyExitEngine(model).run(samples).predictions
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    after = EarlyExitEngine(loaded).run(samples).predictions
    for a, b in zip(before, after):
        assert (a.label, a.exit_layer, a.exit_reason) == (b.label, b.exit_layer, b.exit_reason)
        assert (a.probs == b.probs).all()


def test_loads_pretrained_backbone_directory(tmp_path):
    torch.manual_seed(3)
    backbone = BertModel(tiny_backbone_config("bert"))
    backbone.save_pretrained(tmp_path / "bert")
    model = EarlyExitModel.from_backbone(tmp_path / "bert", EarlyExitConfig(task="sequence", label_names=("a", "b")))
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert len(model.exit_heads) == 4


def test_missing_model_directory_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        EarlyExitModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("family", ["bert", "albert", "gpt2"])
def test_eager_attention_masks_match_stock_forward(family):
    """The adapters build masks through transformers' own mask functions, so the additive
    (eager) format works as well as SDPA's boolean one."""
    torch.manual_seed(0)
    cfg = tiny_backbone_config(family)
    cfg._attn_implementation = "eager"
    model = EarlyExitModel.from_config(cfg, EarlyExitConfig(task="sequence", label_names=("a", "b", "c"),
                                                            policy=ExitPolicyConfig(kind="none"))).eval()
    samples = make_samples(family, "sequence", n=8)
    expected = stock_last_head_probs(model, samples)
    preds = EarlyExitEngine(model, EngineConfig(batch_size=3)).run(samples).predictions
    got = torch.stack([torch.from_numpy(p.probs) for p in preds])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "albert", "gpt2", "vit"])
def test_mean_pooling_equals_mean_of_stock_states(family):
    """pooling="mean": the last head reads the masked mean of the stock forward's token states,
    whatever padding and batching the engine applies."""
    model = tiny_model(family, "sequence", pooling="mean", head_std=0.25 if family == "vit" else 1.0)
    samples = make_samples(family, "sequence", n=10)
    batch = collate(samples, model.adapter.pad_token_id)
    with torch.inference_mode():
        _, states = model.adapter.stock_forward(batch)
        # stock states are already through GPT-2's ln_f / ViT's layernorm, as token_states gives
        mask = batch.attention_mask
        if mask is None:
            pooled = states.mean(dim=1)
        else:
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1)
        expected = torch.softmax(model.exit_heads[-1](pooled), -1)
    result = EarlyExitEngine(model, EngineConfig(batch_size=3)).run(samples)
    for i, pred in enumerate(result.predictions):
        torch.testing.assert_close(torch.from_numpy(pred.probs), expected[i], atol=1e-5, rtol=0)
    # padding does not move the pooled vector: each sample alone gives the same probabilities
    for i, s in enumerate(samples[:3]):
        alone = EarlyExitEngine(model, EngineConfig(batch_size=1)).run([s]).predictions[0]
        torch.testing.assert_close(torch.from_numpy(alone.probs), expected[i], atol=1e-5, rtol=0)


def test_mean_pooling_round_trips_and_is_validated(tmp_path):
    model = tiny_model("bert", "sequence", pooling="mean")
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitModel.from_pretrained(tmp_path / "m")
    assert loaded.config.pooling == "mean"
    with pytest.raises(ValueError, match="pooling"):
        EarlyExitConfig(task="sequence", label_names=("a", "b"), pooling="max")
    with pytest.raises(ValueError, match="only"):
        EarlyExitConfig(task="token", label_names=("O", "B-x"), pooling="mean")
