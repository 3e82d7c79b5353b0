"""Backbone adapters: the only family-specific code in the exit loop.

Each adapter wraps a stock transformers model (BertModel, AlbertModel, GPT2Model, ViTModel) and
exposes the four steps the shared exit loop needs: embed a batch, build the attention bias, run
layer i, and turn hidden states into exit-head input (pooled vector or per-token states). The
layer modules themselves are the transformers ones, called in the same order with the same masks
as the stock forward, so with policy "none" the engine reproduces that forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)
from transformers.activations import GELUActivation
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.albert import modeling_albert
from transformers.models.albert.modeling_albert import AlbertAttention, AlbertLayer, AlbertLayerGroup
from transformers.models.bert import modeling_bert
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertLayer,
    BertOutput,
    BertSelfAttention,
    BertSelfOutput,
)
from transformers.models.vit import modeling_vit
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTMLP

from transformers.pytorch_utils import Conv1D, apply_chunking_to_forward

from .inputs import Batch
from .kernels import linear_gelu, unhooked


class BackboneAdapter:
    """Family-neutral view of a transformers backbone, used by the one exit loop."""

    family: str = ""
    is_image: bool = False

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.config, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Hidden states entering layer 1: (N, T, H)."""
        raise NotImplementedError

    def attention_bias(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the layers take, in the format of the configured attention implementation."""
        if attention_mask is None:
            return None
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Run transformer layer ``i`` (0-based): (N, T, H) -> (N, T, H)."""
        raise NotImplementedError

    def layer_module(self, i: int) -> nn.Module:
        """The module that :meth:`layer` runs for layer ``i`` (ALBERT: a shared group)."""
        raise NotImplementedError

    # -- a layer as its attention sublayer, then its feed-forward (EarlyExitConfig.head_input
    # "attention"): the exit head reads the first step's output, and only the rows that go on run
    # the second. Families that cannot split a layer there leave supports_attention_heads False.
    supports_attention_heads: bool = False

    def layer_attention(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Layer ``i``'s attention sublayer (with its residual and norm): (N, T, H) -> (N, T, H)."""
        raise NotImplementedError

    def layer_feed_forward(self, i: int, attention: torch.Tensor) -> torch.Tensor:
        """The rest of layer ``i`` on :meth:`layer_attention`'s output: together they are :meth:`layer`."""
        raise NotImplementedError

    def feed_forward_weights(self, i: int) -> list[torch.Tensor]:
        """The weights :meth:`layer_feed_forward` multiplies by, per token (MAC accounting)."""
        raise NotImplementedError

    # -- a layer in two steps: the exit head's positions first, the other positions only for the
    # rows that go on. Every token's keys and values are computed once and serve both steps.
    def splits_layer(self, i: int) -> bool:
        """Whether layer ``i`` can run as :meth:`layer_keys` + :meth:`layer_at` (+ :meth:`layer_rest`)
        with the same result as :meth:`layer`. Families and modified layers that cannot say False."""
        return False

    def layer_keys(self, i: int, hidden: torch.Tensor) -> "LayerKeys":
        """Layer ``i``'s attention keys and values of every token of ``hidden`` (N, T, H)."""
        raise NotImplementedError(f"{self.family} layers do not run in two steps")

    def layer_at(
        self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys", positions: torch.Tensor
    ) -> torch.Tensor:
        """Layer ``i``'s output at ``positions`` (N, P) only: (N, P, H), equal to
        ``layer(i, hidden, bias)`` gathered there. Queries, attention output and feed-forward run
        for those P positions; the keys and values, which every query needs, come from ``keys``."""
        return self.layer_from_keys(i, _gather_tokens(hidden, positions), self.query_bias(bias, hidden, positions), keys)

    def query_bias(self, bias: torch.Tensor | None, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The attention mask for queries at ``positions`` alone: its rows there (None stays None:
        bidirectional attention with no padding needs no mask)."""
        return _bias_rows(bias, positions)

    def layer_rest(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys") -> torch.Tensor:
        """Layer ``i``'s whole output (N, T, H) for rows whose keys and values are already in ``keys``."""
        return self.layer_from_keys(i, hidden, bias, keys)

    def layer_from_keys(
        self, i: int, queries: torch.Tensor, bias: torch.Tensor | None, keys: "LayerKeys"
    ) -> torch.Tensor:
        """The family's layer ``i`` for the token states ``queries`` (N, P, H), attending over the
        precomputed ``keys`` with the mask rows ``bias`` (N, h, P, T): (N, P, H)."""
        raise NotImplementedError(f"{self.family} layers do not run in two steps")

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        """The weights (or parts of a fused weight) that :meth:`layer_keys` multiplies every token by,
        for MAC accounting."""
        return []

    def word_embeddings(self) -> nn.Embedding:
        """The token embedding table (text families); soft prompts live in its space."""
        raise NotImplementedError(f"{self.family} has no token embeddings")

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        """:meth:`embed`, with the word embeddings of positions ``position .. position + K - 1``
        replaced by the K soft prompt vectors ``prompts`` (K, H) before position embeddings and
        normalisation, as prompt tuning does. The preprocessor reserves those positions."""
        raise NotImplementedError(f"soft prompts are not supported for {self.family}")

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Sequence-level exit-head input: (N, T, H) -> (N, H)."""
        raise NotImplementedError

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token-level exit-head input: (N, T, H) -> (N, T, H)."""
        return hidden

    def pooled_position(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The one token :meth:`pooled` reads, per row: (N,) long. BERT, ALBERT, ViT: position 0."""
        return torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)

    def mean_pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the real tokens' states (N, T, H) -> (N, H), as sentence-transformers pool.

        Padding is masked out, so the result does not depend on how much padding a batch carries.
        """
        states = self.token_states(hidden)
        if attention_mask is None:
            return states.mean(dim=1)
        mask = attention_mask.to(states.dtype).unsqueeze(-1)  # (N, T, 1)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The unmodified transformers forward: (pooled (N, H), token states (N, T, H)).

        The reference that the engine must reproduce with policy "none".
        """
        raise NotImplementedError


def _exact_gelu_ffn(layer: nn.Module) -> bool:
    """Whether a BERT layer is the stock encoder layer whose feed-forward block is
    ``output(F.gelu(intermediate.dense(x)), x)`` (``hidden_act="gelu"``), unhooked; other
    activations, decoders with cross-attention and modified layers run their own forward."""
    inter = getattr(layer, "intermediate", None)
    return (
        type(layer) is BertLayer
        and type(inter) is BertIntermediate
        and type(inter.intermediate_act_fn) is GELUActivation
        and getattr(inter.intermediate_act_fn, "act", None) is nn.functional.gelu
        and not getattr(layer, "add_cross_attention", False)
        and unhooked(layer)
        and unhooked(inter)
    )


@dataclass
class LayerKeys:
    """One layer's attention keys and values for a batch of rows: (N, heads, T, head_dim) each."""

    key: torch.Tensor
    value: torch.Tensor

    def take(self, rows: torch.Tensor, length: int) -> "LayerKeys":
        """The rows selected by ``rows`` (bool or index), their first ``length`` tokens."""
        return LayerKeys(self.key[rows][:, :, :length], self.value[rows][:, :, :length])


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(N, T, heads * head_dim) -> (N, heads, T, head_dim), as the transformers attentions do."""
    n, t, _ = x.shape
    return x.view(n, t, -1, head_dim).transpose(1, 2)


def _gather_tokens(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, T, H) states at ``positions`` (N, P) -> (N, P, H)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
    return hidden[rows, positions]


def _bias_rows(bias: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor | None:
    """The attention mask's query rows at ``positions`` (N, P): (N, h, T, T) -> (N, h, P, T). A mask
    that does not vary along the query axis (one row, broadcast) is returned as it is."""
    if bias is None or bias.shape[2] == 1:
        return bias
    n, p = positions.shape
    bias = bias.expand(n, -1, -1, -1)
    index = positions[:, None, :, None].expand(n, bias.shape[1], p, bias.shape[3])
    return torch.gather(bias, 2, index)


def _attend(module: nn.Module, eager, query: torch.Tensor, keys: LayerKeys, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``query`` (N, heads, P, d) over ``keys`` through the implementation the model is
    configured with (``config._attn_implementation``), as its own forward calls it: (N, P, heads * d)."""
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager)
    out, _ = attend(module, query, keys.key, keys.value, bias, dropout=0.0, scaling=module.scaling)
    n, _, p, _ = query.shape
    return out.reshape(n, p, -1).contiguous()


def _stock_bert_layer(layer: nn.Module) -> bool:
    """Whether a BERT layer is the stock encoder layer, in eval mode, with no hook on it or on its
    parts: then :class:`BertAdapter` may run its steps itself (two-step layers)."""
    attention = getattr(layer, "attention", None)
    return (
        type(layer) is BertLayer
        and type(attention) is BertAttention
        and type(attention.self) is BertSelfAttention
        and type(attention.output) is BertSelfOutput
        and type(layer.intermediate) is BertIntermediate
        and type(layer.output) is BertOutput
        and not layer.training
        and not getattr(layer, "add_cross_attention", False)
        and not attention.self.is_causal
        and all(unhooked(m) for m in layer.modules())
    )


class BertAdapter(BackboneAdapter):
    """BERT: the [CLS] state through the backbone's own pooler (EPEE/PABEE heads)."""

    family = "bert"

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embeddings(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids)

    def word_embeddings(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        words = _with_prompts(self.word_embeddings()(batch.input_ids), prompts, position)
        return self._embed_words(words, batch)

    def _embed_words(self, words: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.model.embeddings(inputs_embeds=words, token_type_ids=batch.token_type_ids)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module = self.model.encoder.layer[i]
        if module.training or not _exact_gelu_ffn(module):  # training: the stock forward (checkpointing, grads)
            return module(hidden, bias)
        # BertLayer.forward's steps for an encoder, with the up-projection and its GELU as one
        # call (epee.kernels.linear_gelu: fused by oneDNN where the engine runs it, else the same ops)
        attention, _ = module.attention(hidden, bias)
        return self._feed_forward(module, attention)

    @staticmethod
    def _feed_forward(module: nn.Module, attention: torch.Tensor) -> torch.Tensor:
        if _exact_gelu_ffn(module):
            return module.output(linear_gelu(attention, module.intermediate.dense), attention)
        return module.feed_forward_chunk(attention)

    supports_attention_heads = True

    def layer_attention(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.model.encoder.layer[i].attention(hidden, bias)[0]

    def layer_feed_forward(self, i: int, attention: torch.Tensor) -> torch.Tensor:
        module = self.model.encoder.layer[i]
        if module.training:  # the stock step, as layer() runs it in training
            return apply_chunking_to_forward(module.feed_forward_chunk, module.chunk_size_feed_forward,
                                             module.seq_len_dim, attention)
        return self._feed_forward(module, attention)

    def feed_forward_weights(self, i: int) -> list[torch.Tensor]:
        module = self.model.encoder.layer[i]
        return [module.intermediate.dense.weight, module.output.dense.weight]

    def layer_module(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

    def splits_layer(self, i: int) -> bool:
        return _stock_bert_layer(self.model.encoder.layer[i])

    def layer_keys(self, i: int, hidden: torch.Tensor) -> LayerKeys:
        sa = self.model.encoder.layer[i].attention.self
        return LayerKeys(_heads(sa.key(hidden), sa.attention_head_size), _heads(sa.value(hidden), sa.attention_head_size))

    def layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """BertLayer's steps for the queries ``hidden`` (N, P, H) over precomputed keys and values."""
        module = self.model.encoder.layer[i]
        sa = module.attention.self
        context = _attend(sa, modeling_bert.eager_attention_forward, _heads(sa.query(hidden), sa.attention_head_size),
                          keys, bias)
        return self._feed_forward(module, module.attention.output(context, hidden))

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        sa = self.model.encoder.layer[i].attention.self
        return [sa.key.weight, sa.value.weight]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooler(hidden)  # takes hidden[:, 0] itself

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        )
        return out.pooler_output, out.last_hidden_state


class AlbertAdapter(BertAdapter):
    """ALBERT: layer i runs the shared layer group that ALBERT maps it to; same stock forward as BERT."""

    family = "albert"
    supports_attention_heads = False  # BertAdapter's layer_attention reads encoder.layer, which ALBERT has not

    def embed(self, batch: Batch) -> torch.Tensor:
        embedded = self.model.embeddings(batch.input_ids, token_type_ids=batch.token_type_ids)  # (N, T, E)
        return self.model.encoder.embedding_hidden_mapping_in(embedded)  # (N, T, H)

    def _embed_words(self, words: torch.Tensor, batch: Batch) -> torch.Tensor:
        embedded = self.model.embeddings(inputs_embeds=words, token_type_ids=batch.token_type_ids)  # (N, T, E)
        return self.model.encoder.embedding_hidden_mapping_in(embedded)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.layer_module(i)(hidden, bias)

    def _single_layer(self, i: int) -> AlbertLayer:
        return self.layer_module(i).albert_layers[0]

    def splits_layer(self, i: int) -> bool:
        group = self.layer_module(i)  # a group of one stock layer (inner_group_num=1, ALBERT's default)
        if type(group) is not AlbertLayerGroup or len(group.albert_layers) != 1 or not unhooked(group):
            return False
        layer = group.albert_layers[0]
        return (
            type(layer) is AlbertLayer
            and type(layer.attention) is AlbertAttention
            and not layer.training
            and all(unhooked(m) for m in layer.modules())
        )

    def layer_keys(self, i: int, hidden: torch.Tensor) -> LayerKeys:
        att = self._single_layer(i).attention
        return LayerKeys(_heads(att.key(hidden), att.attention_head_size), _heads(att.value(hidden), att.attention_head_size))

    def layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """AlbertLayer's steps for the queries ``hidden`` (N, P, H) over precomputed keys and values."""
        layer = self._single_layer(i)
        att = layer.attention
        context = _attend(att, modeling_albert.eager_attention_forward,
                          _heads(att.query(hidden), att.attention_head_size), keys, bias)
        attention = att.LayerNorm(hidden + att.dense(context))
        return layer.full_layer_layer_norm(layer.ff_chunk(attention) + attention)

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        if len(self.layer_module(i).albert_layers) != 1:
            return []
        att = self._single_layer(i).attention
        return [att.key.weight, att.value.weight]

    def layer_module(self, i: int) -> nn.Module:
        # Same group arithmetic as AlbertTransformer.forward.
        group = int(i / (self.config.num_hidden_layers / self.config.num_hidden_groups))
        return self.model.encoder.albert_layer_groups[group]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooler_activation(self.model.pooler(hidden[:, 0]))


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
        return self._embed_words(_with_prompts(self.model.wte(batch.input_ids), prompts, position), batch)

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
        return LayerKeys(_heads(key, att.head_dim), _heads(value, att.head_dim))

    def query_bias(self, bias, hidden, positions):
        if bias is not None:
            return _bias_rows(bias, positions)
        # no padding, so the mask was left to SDPA's is_causal, which would align these P queries
        # with the first P keys: each position sees the keys up to itself, written out
        allowed = torch.arange(hidden.shape[1], device=hidden.device)[None, None, None, :] <= positions[:, None, :, None]
        if self.config._attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(  # additive (eager)
            ~allowed, torch.finfo(hidden.dtype).min)

    def layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """GPT2Block's steps (pre-norm) for the queries ``hidden`` (N, P, H) over precomputed keys."""
        block = self.model.h[i]
        att = block.attn
        query = _heads(_conv1d_columns(att.c_attn, block.ln_1(hidden), 0, att.embed_dim), att.head_dim)
        hidden = att.c_proj(_attend(att, modeling_gpt2.eager_attention_forward, query, keys, bias)) + hidden
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


class ViTAdapter(BackboneAdapter):
    """ViT: the CLS token after the backbone's final LayerNorm, as ViTForImageClassification."""

    family = "vit"
    is_image = True

    def embed(self, batch: Batch) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        return self.model.embeddings(batch.pixel_values.to(dtype))

    def attention_bias(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        return None  # every patch is real

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.model.layers[i](hidden, bias)

    def layer_module(self, i: int) -> nn.Module:
        return self.model.layers[i]

    def splits_layer(self, i: int) -> bool:
        layer = self.model.layers[i]
        return (
            type(layer) is ViTLayer
            and type(layer.attention) is ViTAttention
            and type(layer.mlp) is ViTMLP
            and not layer.training
            and all(unhooked(m) for m in layer.modules())
        )

    def layer_keys(self, i: int, hidden: torch.Tensor) -> LayerKeys:
        layer = self.model.layers[i]
        att, normed = layer.attention, layer.layernorm_before(hidden)
        return LayerKeys(_heads(att.k_proj(normed), att.head_dim), _heads(att.v_proj(normed), att.head_dim))

    def layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """ViTLayer's steps (pre-norm) for the queries ``hidden`` (N, P, H) over precomputed keys."""
        layer = self.model.layers[i]
        att = layer.attention
        query = _heads(att.q_proj(layer.layernorm_before(hidden)), att.head_dim)
        hidden = att.o_proj(_attend(att, modeling_vit.eager_attention_forward, query, keys, bias)) + hidden
        return layer.mlp(layer.layernorm_after(hidden)) + hidden

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        att = self.model.layers[i].attention
        return [att.k_proj.weight, att.v_proj.weight]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.layernorm(hidden[:, 0])

    def token_states(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(hidden)

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=batch.pixel_values)
        return out.last_hidden_state[:, 0], out.last_hidden_state


def _with_prompts(words: torch.Tensor, prompts: torch.Tensor, position: int) -> torch.Tensor:
    """(N, T, H) word embeddings with positions ``position .. position + K - 1`` set to the
    prompts (K, H); a new tensor, so gradients reach the prompts and not the table."""
    k = prompts.shape[0]
    if words.shape[1] < position + k:
        raise ValueError(f"inputs of {words.shape[1]} tokens cannot hold {k} prompt positions from {position}: "
                         "encode them with the model directory's preprocessor, which reserves them")
    n = words.shape[0]
    return torch.cat([words[:, :position], prompts.to(words.dtype).unsqueeze(0).expand(n, -1, -1),
                      words[:, position + k :]], dim=1)


# family -> (config class, model class, adapter class, extra model kwargs)
FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel], type[BackboneAdapter], dict]] = {
    "bert": (BertConfig, BertModel, BertAdapter, {"add_pooling_layer": True}),
    "albert": (AlbertConfig, AlbertModel, AlbertAdapter, {"add_pooling_layer": True}),
    "gpt2": (GPT2Config, GPT2Model, GPT2Adapter, {}),
    "vit": (ViTConfig, ViTModel, ViTAdapter, {"add_pooling_layer": False}),
}


def family_of(config: PretrainedConfig) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"backbone model_type ({family!r}) is not supported; use one of {sorted(FAMILIES)}")
    if getattr(config, "is_decoder", False) and family in ("bert", "albert"):
        raise ValueError(f"{family} config has is_decoder=True; early exit here needs the bidirectional encoder")
    return family


def build_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised backbone from a config alone."""
    family = family_of(config)
    _, model_cls, _, kwargs = FAMILIES[family]
    return model_cls(config, **kwargs)


def load_backbone(path: str | os.PathLike, allow_pickle: bool = False) -> PreTrainedModel:
    """Pretrained backbone weights from a local transformers directory; never touches the network.

    Safetensors only unless ``allow_pickle`` (then transformers may read ``pytorch_model.bin``,
    which it does with ``torch.load(weights_only=True)``); see :mod:`epee.weights`."""
    from transformers import AutoConfig

    from .weights import refuse_pickle_backbone

    refuse_pickle_backbone(path, allow_pickle)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    _, model_cls, _, kwargs = FAMILIES[family]
    return model_cls.from_pretrained(path, local_files_only=True, use_safetensors=None if allow_pickle else True, **kwargs)


def make_adapter(model: nn.Module) -> BackboneAdapter:
    family = family_of(model.config)
    return FAMILIES[family][2](model)
