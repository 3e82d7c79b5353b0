"""GPT-2: right padding, position ids 0..T-1, exit head on the last real token after ln_f."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP
from transformers.pytorch_utils import Conv1D

from ..inputs import Batch
from ..kernels import unhooked
from .base import BackboneAdapter, LayerKeys, attend, bias_rows, heads, with_prompts


def _stock_gpt2_block(block: nn.Module) -> bool:
    """Whether a GPT-2 block is the stock decoder block (self-attention only), in eval mode, with
    SDPA or eager attention (not eager's reordered upcast) and no hook on it or its parts."""
    att = getattr(block, "attn", None)
    impl = getattr(getattr(att, "config", None), "_attn_implementation", None)
    return (
        type(block) is GPT2Block
        and type(att) is GPT2Attention
        and type(att.c_attn) is Conv1D
        and type(block.mlp) is GPT2MLP
        and not att.is_cross_attention
        and not hasattr(block, "crossattention")
        and not block.training
        and impl in ("sdpa", "eager")
        and not (impl == "eager" and att.reorder_and_upcast_attn)
        and all(unhooked(m) for m in block.modules())
    )


def _conv1d_columns(conv: Conv1D, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output columns ``start:stop`` of a transformers Conv1D (``x @ W + b``) alone: (N, T, stop - start)."""
    n, t, _ = x.shape
    return torch.addmm(conv.bias[start:stop], x.reshape(n * t, -1), conv.weight[:, start:stop]).view(n, t, -1)


class GPT2Adapter(BackboneAdapter):
    """GPT-2: right padding, position ids 0..T-1, exit head on the last real token after ln_f."""

    family = "gpt2"

    def embed(self, batch: Batch) -> torch.Tensor:
        return self._embed_words(self.model.wte(batch.input_ids), batch)

    def word_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        return self._embed_words(with_prompts(self.model.wte(batch.input_ids), prompts, position), batch)

    def _embed_words(self, words: torch.Tensor, batch: Batch) -> torch.Tensor:
        n, t = batch.input_ids.shape
        positions = torch.arange(t, device=batch.input_ids.device).unsqueeze(0)  # (1, T)
        hidden = words + self.model.wpe(positions)
        if batch.token_type_ids is not None:
            hidden = hidden + self.model.wte(batch.token_type_ids)
        return self.model.drop(hidden)

    def attention_bias(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=positions,
        )

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.model.h[i](hidden, None, bias, use_cache=False)

    def layer_module(self, i: int) -> nn.Module:
        return self.model.h[i]

    def splits_layer(self, i: int) -> bool:
        return _stock_gpt2_block(self.model.h[i])

    def layer_keys(self, i: int, hidden: torch.Tensor) -> LayerKeys:
        block = self.model.h[i]
        att, h = block.attn, block.attn.embed_dim
        key, value = _conv1d_columns(att.c_attn, block.ln_1(hidden), h, 3 * h).split(h, dim=2)  # Q's columns skipped
        return LayerKeys(heads(key, att.head_dim), heads(value, att.head_dim))

    def _query_bias(self, bias, hidden, positions):
        if bias is not None:
            return bias_rows(bias, positions)
        # no padding, so the mask was left to SDPA's is_causal, which would align these P queries
        # with the first P keys: each position sees the keys up to itself, written out
        allowed = torch.arange(hidden.shape[1], device=hidden.device)[None, None, None, :] <= positions[:, None, :, None]
        if self.config._attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(  # additive (eager)
            ~allowed, torch.finfo(hidden.dtype).min)

    def _layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """GPT2Block's steps (pre-norm) for the queries ``hidden`` (N, P, H) over precomputed keys."""
        block = self.model.h[i]
        att = block.attn
        query = heads(_conv1d_columns(att.c_attn, block.ln_1(hidden), 0, att.embed_dim), att.head_dim)
        hidden = att.c_proj(attend(att, modeling_gpt2.eager_attention_forward, query, keys, bias)) + hidden
        return hidden + block.mlp(block.ln_2(hidden))

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        att = self.model.h[i].attn
        return [att.c_attn.weight[:, att.embed_dim :]]  # (H, 2H) of the fused (H, 3H)

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        n, t, _ = hidden.shape
        if attention_mask is None:
            last = torch.full((n,), t - 1, dtype=torch.long, device=hidden.device)
        else:
            last = attention_mask.sum(dim=1) - 1  # right padding: last real token
        picked = hidden[torch.arange(n, device=hidden.device), last]  # (N, H)
        return self.model.ln_f(picked)  # LayerNorm is per token, so norm-then-pick == pick-then-norm

    def pooled_position(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
        return attention_mask.sum(dim=1) - 1

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.ln_f(hidden)

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        )
        states = out.last_hidden_state  # already through ln_f
        n = states.shape[0]
        last = batch.attention_mask.sum(dim=1) - 1
        return states[torch.arange(n), last], states
