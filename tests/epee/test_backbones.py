"""The adapter contract (epee.backbones.base.BackboneAdapter), checked the same way for every family:
a layer equals its two-step and attention/feed-forward decompositions where the family has them,
and the exit-head inputs equal the stock forward's."""

import inspect

import pytest
import torch

from epee import collate
from epee.backbones import FAMILIES, BackboneAdapter
from epee.backbones.base import gather_tokens
from tests.conftest import make_samples, tiny_model

FAMILY_NAMES = sorted(FAMILIES)


def _rows(family, n=5):
    """A tiny model in eval mode, a padded batch of mixed lengths, its hidden states after layer 1."""
    model = tiny_model(family, "sequence", layers=2)
    batch = collate(make_samples(family, "sequence", n=n, min_len=3, max_len=11), model.adapter.pad_token_id)
    with torch.inference_mode():
        hidden = model.adapter.layer(0, model.embed(batch), model.adapter.attention_bias(model.embed(batch),
                                                                                        batch.attention_mask))
    return model, batch, hidden


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _real(x, mask):
    """States at the real tokens only (padded positions are not part of the contract)."""
    return x if mask is None else x[mask.bool()]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_base_and_only_the_contracts_methods(family):
    adapter_cls = FAMILIES[family][2]
    assert adapter_cls.__bases__ == (BackboneAdapter,)  # composition, not one family disabling another's steps
    public = {n for n, _ in inspect.getmembers(adapter_cls) if not n.startswith("_")}
    assert public <= {n for n, _ in inspect.getmembers(BackboneAdapter) if not n.startswith("_")}
    assert adapter_cls.family == family


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_equals_its_two_steps(family):
    model, batch, hidden = _rows(family)
    adapter, mask = model.adapter, batch.attention_mask
    if not adapter.splits_layer(1):
        pytest.skip(f"{family} layers do not run in two steps")
    with torch.inference_mode():
        bias = adapter.attention_bias(hidden, mask)
        whole = adapter.layer(1, hidden, bias)
        keys = adapter.layer_keys(1, hidden)
        positions = model.head_positions(hidden, mask, None)  # (N, 1): the pooled token
        _close(adapter.layer_at(1, hidden, bias, keys, positions), gather_tokens(whole, positions))
        _close(_real(adapter.layer_rest(1, hidden, bias, keys), mask), _real(whole, mask))
        kept = torch.tensor([True, False, True, True, False])[: hidden.shape[0]]
        sub_mask = None if mask is None else mask[kept]
        t = hidden.shape[1] if sub_mask is None else int(sub_mask.sum(dim=1).max())
        sub = hidden[kept][:, :t]
        sub_mask = None if sub_mask is None else sub_mask[:, :t]
        rest = adapter.layer_rest(1, sub, adapter.attention_bias(sub, sub_mask), keys.take(kept, t))
        _close(_real(rest, sub_mask), _real(whole[kept][:, :t], sub_mask))
    assert adapter.key_value_weights(1), "a two-step layer names the weights its keys and values cost"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_layer_equals_attention_then_feed_forward(family):
    model, batch, hidden = _rows(family)
    adapter, mask = model.adapter, batch.attention_mask
    if not adapter.supports_attention_heads:
        with pytest.raises(NotImplementedError):
            adapter.layer_attention(1, hidden, None)
        return
    with torch.inference_mode():
        bias = adapter.attention_bias(hidden, mask)
        split = adapter.layer_feed_forward(1, adapter.layer_attention(1, hidden, bias))
        _close(_real(split, mask), _real(adapter.layer(1, hidden, bias), mask))
    assert adapter.feed_forward_weights(1)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_inputs_equal_the_stock_forward(family):
    model, batch, _ = _rows(family)
    adapter, mask = model.adapter, batch.attention_mask
    with torch.inference_mode():
        hidden = model.embed(batch)
        bias = adapter.attention_bias(hidden, mask)
        for i in range(adapter.num_layers):
            assert adapter.layer_module(i) is not None
            hidden = adapter.layer(i, hidden, bias)
        pooled, states = adapter.stock_forward(batch)
        _close(adapter.pooled(hidden, mask), pooled)
        _close(_real(adapter.token_states(hidden), mask), _real(states, mask))
        # the one token pooled reads: pooling it alone gives the same vector (two-step heads rely on it)
        at = adapter.pooled_position(hidden, mask).unsqueeze(1)  # (N, 1)
        _close(adapter.pooled(gather_tokens(hidden, at), None), pooled)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompts_only_for_text_families(family):
    model, batch, _ = _rows(family)
    adapter = model.adapter
    if adapter.is_image:
        with pytest.raises(NotImplementedError):
            adapter.word_embeddings()
        return
    table = adapter.word_embeddings()
    with torch.inference_mode():
        prompts = table.weight[batch.input_ids[0, 1:3]]  # the very tokens at positions 1-2 of row 0
        same = adapter.embed_with_prompts(batch, prompts, 1)
        _close(same[0], adapter.embed(batch)[0])
