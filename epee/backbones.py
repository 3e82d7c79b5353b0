"""Backbone adapters: the only family-specific code in the exit loop.

Each adapter wraps a stock transformers model (BertModel, AlbertModel, GPT2Model, ViTModel) and
exposes the four steps the shared exit loop needs: embed a batch, build the attention bias, run
layer i, and turn hidden states into exit-head input (pooled vector or per-token states). The
layer modules themselves are the transformers ones, called in the same order with the same masks
as the stock forward, so with policy "none" the engine reproduces that forward.
"""

from __future__ import annotations

import os

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
from transformers.models.bert.modeling_bert import BertIntermediate, BertLayer

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
        return module.output(linear_gelu(attention, module.intermediate.dense), attention)

    def layer_module(self, i: int) -> nn.Module:
        return self.model.encoder.layer[i]

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

    def embed(self, batch: Batch) -> torch.Tensor:
        embedded = self.model.embeddings(batch.input_ids, token_type_ids=batch.token_type_ids)  # (N, T, E)
        return self.model.encoder.embedding_hidden_mapping_in(embedded)  # (N, T, H)

    def _embed_words(self, words: torch.Tensor, batch: Batch) -> torch.Tensor:
        embedded = self.model.embeddings(inputs_embeds=words, token_type_ids=batch.token_type_ids)  # (N, T, E)
        return self.model.encoder.embedding_hidden_mapping_in(embedded)

    def layer(self, i: int, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.layer_module(i)(hidden, bias)

    def layer_module(self, i: int) -> nn.Module:
        # Same group arithmetic as AlbertTransformer.forward.
        group = int(i / (self.config.num_hidden_layers / self.config.num_hidden_groups))
        return self.model.encoder.albert_layer_groups[group]

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.pooler_activation(self.model.pooler(hidden[:, 0]))


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

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        n, t, _ = hidden.shape
        if attention_mask is None:
            last = torch.full((n,), t - 1, dtype=torch.long, device=hidden.device)
        else:
            last = attention_mask.sum(dim=1) - 1  # right padding: last real token
        picked = hidden[torch.arange(n, device=hidden.device), last]  # (N, H)
        return self.model.ln_f(picked)  # LayerNorm is per token, so norm-then-pick == pick-then-norm

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
