"""Backbone adapters: the only family-specific code in the exit loop, one module per family.

Each adapter wraps a stock transformers model (BertModel, AlbertModel, GPT2Model, ViTModel) behind
the contract of :class:`~epee.backbones.base.BackboneAdapter`; with policy "none" the engine
reproduces that model's own forward.
"""

from __future__ import annotations

import os

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

from .albert import AlbertAdapter
from .base import BackboneAdapter, LayerKeys
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .vit import ViTAdapter

__all__ = ["FAMILIES", "AlbertAdapter", "BackboneAdapter", "BertAdapter", "GPT2Adapter", "LayerKeys", "ViTAdapter",
           "build_backbone", "family_of", "load_backbone", "make_adapter"]

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

    from ..weights import refuse_pickle_backbone

    refuse_pickle_backbone(path, allow_pickle)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(config)
    _, model_cls, _, kwargs = FAMILIES[family]
    return model_cls.from_pretrained(path, local_files_only=True, use_safetensors=None if allow_pickle else True, **kwargs)


def make_adapter(model: nn.Module) -> BackboneAdapter:
    family = family_of(model.config)
    return FAMILIES[family][2](model)
