"""BERT: the [CLS] state through the backbone's own pooler (EPEE/PABEE heads)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.bert import modeling_bert
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertLayer,
    BertOutput,
    BertSelfAttention,
    BertSelfOutput,
)
from transformers.pytorch_utils import apply_chunking_to_forward

from .. import kernels
from ..inputs import Batch
from .base import BackboneAdapter, LayerKeys, attend, encoder_stock_forward, heads, with_prompts


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
        and all(kernels.unhooked(m) for m in layer.modules())
    )


def _feed_forward(module: nn.Module, attention: torch.Tensor) -> torch.Tensor:
    """BertLayer's feed-forward block on its attention output; the up-projection and its GELU as
    one call where :func:`epee.kernels.fusable_gelu_ffn` allows (checked per call: hooks and
    training may come and go on a module the adapter runs)."""
    if kernels.fusable_gelu_ffn(module):
        return kernels.gelu_feed_forward(module, attention)
    return module.feed_forward_chunk(attention)


class BertAdapter(BackboneAdapter):
    """BERT: the [CLS] state through the backbone's own pooler (EPEE/PABEE heads)."""

    family = "bert"
    supports_attention_heads = True

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embeddings(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids)

    def word_embeddings(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        words = with_prompts(self.word_embeddings()(batch.input_ids), prompts, position)
        return self.model.embeddings(inputs_embeds=words, token_type_ids=batch.token_type_ids)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        module = self.model.encoder.layer[i]
        if module.training or not kernels.fusable_gelu_ffn(module):  # training: the stock forward (checkpointing, grads)
            return module(hidden, bias)
        attention, _ = module.attention(hidden, bias)  # BertLayer.forward's steps for an encoder
        return kernels.gelu_feed_forward(module, attention)

    def layer_module(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooler(hidden)  # takes hidden[:, 0] itself

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return encoder_stock_forward(self.model, batch)

    # -- two-step layers --------------------------------------------------------------------------
    def splits_layer(self, i: int) -> bool:
        return _stock_bert_layer(self.model.encoder.layer[i])

    def layer_keys(self, i: int, hidden: torch.Tensor) -> LayerKeys:
        sa = self.model.encoder.layer[i].attention.self
        return LayerKeys(heads(sa.key(hidden), sa.attention_head_size), heads(sa.value(hidden), sa.attention_head_size))

    def _layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """BertLayer's steps for the queries ``hidden`` (N, P, H) over precomputed keys and values."""
        module = self.model.encoder.layer[i]
        sa = module.attention.self
        context = attend(sa, modeling_bert.eager_attention_forward, heads(sa.query(hidden), sa.attention_head_size),
                         keys, bias)
        return _feed_forward(module, module.attention.output(context, hidden))

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        sa = self.model.encoder.layer[i].attention.self
        return [sa.key.weight, sa.value.weight]

    # -- the attention sublayer, then the feed-forward ----------------------------------------------
    def layer_attention(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.model.encoder.layer[i].attention(hidden, bias)[0]

    def layer_feed_forward(self, i: int, attention: torch.Tensor) -> torch.Tensor:
        module = self.model.encoder.layer[i]
        if module.training:  # the stock step, as layer() runs it in training
            return apply_chunking_to_forward(module.feed_forward_chunk, module.chunk_size_feed_forward,
                                             module.seq_len_dim, attention)
        return _feed_forward(module, attention)

    def feed_forward_weights(self, i: int) -> list[torch.Tensor]:
        module = self.model.encoder.layer[i]
        return [module.intermediate.dense.weight, module.output.dense.weight]
