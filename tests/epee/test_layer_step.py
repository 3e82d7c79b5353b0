"""Layer steps (epee.layer_step): every way a layer runs gives the whole layer's logits and output,
each step's MACs are what it ran, and the plan decides a step once per layer."""

import dataclasses

import pytest
import torch

from epee import ExitPolicy, ExitPolicyConfig, collate
from epee.flops import MacCounter
from epee.layer_step import AttentionFirst, LayerPlan, PositionsFirst, WholeLayer
from tests.conftest import make_samples, tiny_model


def _batch(model, family, task):
    batch = collate(make_samples(family, task, n=5, min_len=3, max_len=11), model.adapter.pad_token_id)
    with torch.inference_mode():
        return batch, model.embed(batch)


def _real(x, mask):
    return x if mask is None else x[mask.bool()]


@pytest.mark.parametrize("family, task", [("bert", "sequence"), ("bert", "relation"), ("albert", "sequence"),
                                          ("gpt2", "sequence"), ("gpt2", "relation"), ("vit", "sequence")])
def test_positions_first_equals_the_whole_layer(family, task):
    model = tiny_model(family, task, layers=2)
    batch, hidden = _batch(model, family, task)
    mask, entities = batch.attention_mask, batch.entity_positions
    whole, split = WholeLayer(model, 0), PositionsFirst(model, 0)
    keep = torch.tensor([True, False, True, True, False])
    with torch.inference_mode():
        logits, state = whole.first(hidden, mask, entities)
        split_logits, split_state = split.first(hidden, mask, entities)
        torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=1e-5)
        assert whole.rest(state, state.carry, mask, None) is state.carry  # nothing left to run
        out = split.rest(split_state, split_state.carry, mask, None)
        torch.testing.assert_close(_real(out, mask), _real(state.carry, mask), atol=1e-5, rtol=1e-5)
        sub_mask = None if mask is None else mask[keep]
        kept = split.rest(split_state, split_state.carry[keep], sub_mask, keep)
        torch.testing.assert_close(_real(kept, sub_mask), _real(state.carry[keep], sub_mask), atol=1e-5, rtol=1e-5)


def test_attention_first_equals_the_whole_layer_and_skips_the_feed_forward_macs():
    model = tiny_model("bert", "sequence", layers=2, pooling="mean")
    model.config = dataclasses.replace(model.config, head_input="attention")
    batch, hidden = _batch(model, "bert", "sequence")
    counter = MacCounter(model)
    step = LayerPlan(model, counter=counter).steps()[0]
    assert type(step) is AttentionFirst and step.two_step
    with torch.inference_mode():
        _, state = step.first(hidden, batch.attention_mask, None)
        out = step.rest(state, state.carry, batch.attention_mask, None)
        expected = model.adapter.layer(0, hidden, model.adapter.attention_bias(hidden, batch.attention_mask))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    whole = WholeLayer(model, 0, counter).macs(torch.tensor([10]))[0]
    ffn = sum(w.numel() for w in model.adapter.feed_forward_weights(0))
    assert step.macs(torch.tensor([10]))[0].actual == whole.actual - 10 * ffn


def test_plan_decides_once_per_layer_and_per_policy():
    model = tiny_model("bert", "sequence", layers=4)
    plan = LayerPlan(model, split_layers=True, counter=MacCounter(model))
    late = ExitPolicy(ExitPolicyConfig(kind="patience", patience=1, min_exit_layer=3), 4)
    assert [type(s) for s in plan.steps(late)] == [WholeLayer, WholeLayer, PositionsFirst, PositionsFirst]
    assert [type(s) for s in plan.steps(None)] == [WholeLayer] * 4
    assert plan.steps(late)[2] is plan.steps(late)[2]  # built once, picked per policy
    model.backbone.encoder.layer[3].register_forward_hook(lambda *a: None)
    assert type(plan.steps(late)[3]) is PositionsFirst  # the plan does not look again...
    fresh = LayerPlan(model, split_layers=True).steps(late)
    assert type(fresh[3]) is WholeLayer  # ...a new one does: a hooked layer runs whole
    assert all(type(s) is WholeLayer for s in LayerPlan(model, split_layers=False).steps(late))
    mean = tiny_model("bert", "sequence", layers=2, pooling="mean")  # the head reads every token
    assert all(type(s) is WholeLayer for s in LayerPlan(mean, split_layers=True).steps(late))
