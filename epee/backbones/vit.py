"""ViT: the CLS token after the backbone's final LayerNorm, as ViTForImageClassification."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.vit import modeling_vit
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTMLP

from ..inputs import Batch
from ..kernels import unhooked
from .base import BackboneAdapter, LayerKeys, attend, heads


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
        return LayerKeys(heads(att.k_proj(normed), att.head_dim), heads(att.v_proj(normed), att.head_dim))

    def _layer_from_keys(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None, keys: LayerKeys) -> torch.Tensor:
        """ViTLayer's steps (pre-norm) for the queries ``hidden`` (N, P, H) over precomputed keys."""
        layer = self.model.layers[i]
        att = layer.attention
        query = heads(att.q_proj(layer.layernorm_before(hidden)), att.head_dim)
        hidden = att.o_proj(attend(att, modeling_vit.eager_attention_forward, query, keys, bias)) + hidden
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
