"""ALBERT: layer i runs the shared layer group ALBERT maps it to; pooled and stock forward as BERT's."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.albert import modeling_albert
from transformers.models.albert.modeling_albert import AlbertAttention, AlbertLayer, AlbertLayerGroup

from ..inputs import Batch
from ..kernels import unhooked
from .base import BackboneAdapter, LayerKeys, attend, encoder_stock_forward, heads, with_prompts


class AlbertAdapter(BackboneAdapter):
    """ALBERT: factorised embeddings (E -> H), layer groups shared across depths. Its layers run
    in two steps where a group holds one stock layer (``inner_group_num=1``, ALBERT's default);
    they do not split after attention (``head_input`` "attention" is for BERT)."""

    family = "albert"

    def embed(self, batch: Batch) -> torch.Tensor:
        return self._project(self.model.embeddings(batch.input_ids, token_type_ids=batch.token_type_ids))

    def word_embeddings(self) -> nn.Embedding:
        return self.model.embeddings.word_embeddings

    def embed_with_prompts(self, batch: Batch, prompts: torch.Tensor, position: int) -> torch.Tensor:
        words = with_prompts(self.word_embeddings()(batch.input_ids), prompts, position)
        return self._project(self.model.embeddings(inputs_embeds=words, token_type_ids=batch.token_type_ids))

    def _project(self, embedded: torch.Tensor) -> torch.Tensor:
        """(N, T, E) embeddings -> (N, T, H), as AlbertTransformer.forward starts."""
        return self.model.encoder.embedding_hidden_mapping_in(embedded)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.layer_module(i)(hidden, bias)

    def layer_module(self, i: int) -> nn.Module:
        # Same group arithmetic as AlbertTransformer.forward.
        group = int(i / (self.config.num_hidden_layers / self.config.num_hidden_groups))
        return self.model.encoder.albert_layer_groups[group]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooler_activation(self.model.pooler(hidden[:, 0]))

    def stock_forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return encoder_stock_forward(self.model, batch)

    # -- two-step layers --------------------------------------------------------------------------
    def _single_layer(self, i: int) -> AlbertLayer:
        return self.layer_module(i).albert_layers[0]

    def splits_layer(self, i: int) -> bool:
        group = self.layer_module(i)  # a group of one stock layer
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
        return LayerKeys(heads(att.key(hidden), att.attention_head_size), heads(att.value(hidden), att.attention_head_size))

    def _layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """AlbertLayer's steps for the queries ``hidden`` (N, P, H) over precomputed keys and values."""
        layer = self._single_layer(i)
        att = layer.attention
        context = attend(att, modeling_albert.eager_attention_forward,
                         heads(att.query(hidden), att.attention_head_size), keys, bias)
        attention = att.LayerNorm(hidden + att.dense(context))
        return layer.full_layer_layer_norm(layer.ff_chunk(attention) + attention)

    def key_value_weights(self, i: int) -> list[torch.Tensor]:
        if len(self.layer_module(i).albert_layers) != 1:
            return []
        att = self._single_layer(i).attention
        return [att.key.weight, att.value.weight]
