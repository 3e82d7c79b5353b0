"""EarlyExitModel: a stock transformers backbone plus one exit head after every layer."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from .backbones import BackboneAdapter, build_backbone, load_backbone, make_adapter
from .config import PRECISIONS, EarlyExitConfig
from .inputs import Batch
from .weights import (  # noqa: F401 - re-exported: the model directory's weights rules live there
    WEIGHTS_NAME,
    PickleWeightsRefused,
    is_pickle_weights,
    load_pickle_state_dict,
    pickle_refusal_message,
    weights_path,
)

log = logging.getLogger(__name__)

EPEE_CONFIG_NAME = "epee_config.json"


def precision_autocast(device: str | torch.device, precision: str) -> torch.autocast:
    """The context the engine and calibration run the model in: ``torch.autocast`` in bfloat16 for
    ``precision="bfloat16"`` (matrix products in bfloat16; softmax and exit decisions, which cast
    to float32, stay float32), a disabled one for float32 and int8 (whose products are routed by
    :func:`epee.kernels.linear_kernel_mode` instead)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision ({precision!r}) must be one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@dataclass
class AllLayerOutput:
    """Exit-head logits of every layer, for training and calibration (no early exit)."""

    logits: list[torch.Tensor]  # L tensors of (N, C), or (N, T, C) for token tasks


class EarlyExitModel(nn.Module):
    """Backbone + exit heads.

    Exit heads as EPEE attaches them: sequence classification reads the adapter's pooled vector
    (BERT/ALBERT: [CLS] through the backbone's pooler; GPT-2: last real token; ViT: CLS token);
    relation classification concatenates the states of the two entity start markers (N, 2H);
    token classification (event triggers and arguments) reads every token's state.
    """

    def __init__(self, backbone: PreTrainedModel, config: EarlyExitConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.adapter: BackboneAdapter = make_adapter(backbone)
        if self.adapter.is_image and config.task != "sequence":
            raise ValueError(f"the {self.adapter.family} backbone supports task 'sequence' only, not {config.task!r}")
        h = self.adapter.hidden_size
        in_dim = 2 * h if config.task == "relation" else h
        self.head_dropout = nn.Dropout(config.head_dropout)
        self.exit_heads = nn.ModuleList(
            [nn.Linear(in_dim, config.num_labels) for _ in range(self.adapter.num_layers)]
        )
        std = float(getattr(backbone.config, "initializer_range", 0.02))
        for head in self.exit_heads:
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        if config.head_input == "attention" and not self.adapter.supports_attention_heads:
            raise ValueError(f"head_input 'attention' needs a backbone whose layers split after attention "
                             f"(bert); the {self.adapter.family} backbone's do not")
        self.prompts: nn.Parameter | None = None
        if config.num_prompts:
            if self.adapter.is_image:
                raise ValueError("soft prompts are for text backbones; the vit backbone takes none")
            table = self.adapter.word_embeddings().weight  # (V, E)
            # initialised as the embeddings of randomly drawn vocabulary tokens (prompt tuning's
            # sampled-vocabulary init); the trained values are loaded from the model directory
            picks = torch.randint(0, table.shape[0], (config.num_prompts,))
            self.prompts = nn.Parameter(table.detach()[picks].clone())

    def embed(self, batch: Batch) -> torch.Tensor:
        """Hidden states entering layer 1, with the soft prompts in their reserved positions."""
        if self.prompts is None:
            return self.adapter.embed(batch)
        return self.adapter.embed_with_prompts(batch, self.prompts, self.config.prompt_position)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    # -- the exit head --------------------------------------------------------------------------
    def head_features(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, entity_positions: torch.Tensor | None
    ) -> torch.Tensor:
        task = self.config.task
        if task == "sequence":
            if self.config.pooling == "mean":
                return self._mean_pooled(hidden, attention_mask)  # (N, H)
            return self.adapter.pooled(hidden, attention_mask)  # (N, H)
        if task == "token":
            return self.adapter.token_states(hidden)  # (N, T, H)
        if entity_positions is None:
            raise ValueError("relation task needs entity_positions (indices of the two entity start markers)")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._relation_features(hidden[rows.unsqueeze(1), entity_positions])  # (N, 2, H) picked

    def _mean_pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the real tokens' states (N, T, H) -> (N, H), as sentence-transformers pool.
        Padding is masked out, so the result does not depend on how much padding a batch carries."""
        states = self.adapter.token_states(hidden)
        if attention_mask is None:
            return states.mean(dim=1)
        mask = attention_mask.to(states.dtype).unsqueeze(-1)  # (N, T, 1)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def _relation_features(self, picked: torch.Tensor) -> torch.Tensor:
        """The two entity markers' states (N, 2, H) -> (N, 2H), after the family's per-token final norm."""
        return self.adapter.token_states(picked).reshape(picked.shape[0], -1)

    @property
    def head_position_count(self) -> int:
        """How many positions per row the exit heads read (:meth:`head_positions`): 2 (a
        relation's entity markers), 1 (the pooled token), 0 (every token: token tasks, mean pooling)."""
        task = self.config.task
        if task == "token" or (task == "sequence" and self.config.pooling == "mean"):
            return 0
        return 2 if task == "relation" else 1

    def head_positions(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, entity_positions: torch.Tensor | None
    ) -> torch.Tensor:
        """The token positions the exit heads read, per row: (N, P) long, P = :attr:`head_position_count`
        (> 0). A two-step layer (:class:`epee.layer_step.PositionsFirst`) runs at these first."""
        if self.head_position_count == 0:
            raise ValueError(f"the {self.config.task} heads ({self.config.pooling} pooling) read every token")
        if self.config.task == "relation":
            if entity_positions is None:
                raise ValueError("relation task needs entity_positions (indices of the two entity start markers)")
            return entity_positions
        return self.adapter.pooled_position(hidden, attention_mask).unsqueeze(1)

    def head_logits_at(self, layer_index: int, picked: torch.Tensor) -> torch.Tensor:
        """Logits of the exit head after 0-based layer ``layer_index`` from the states at
        :meth:`head_positions` alone, (N, P, H): the same as :meth:`head_logits` on the whole layer."""
        if self.config.task == "relation":
            features = self._relation_features(picked)
        else:
            features = self.adapter.pooled(picked, None)  # the one picked token is the one it reads
        return self.exit_heads[layer_index](self.head_dropout(features))

    def head_logits(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        entity_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the exit head after 0-based layer ``layer_index``."""
        features = self.head_features(hidden, attention_mask, entity_positions)
        return self.exit_heads[layer_index](self.head_dropout(features))

    def head_reads_attention(self, layer_index: int) -> bool:
        """Whether the exit head after 0-based layer ``layer_index`` reads that layer's attention
        sublayer output (``head_input`` "attention", every layer but the last) instead of its output."""
        return self.config.head_input == "attention" and layer_index < self.num_layers - 1

    # -- full-depth forward for training and calibration ---------------------------------------
    def layer_features(self, batch: Batch) -> list[torch.Tensor]:
        """Exit-head inputs after every layer (no early exit): L tensors of (N, F) or (N, T, F)."""
        from .layer_step import LayerPlan

        hidden = self.embed(batch)
        mask, entities = batch.attention_mask, batch.entity_positions
        bias = self.adapter.attention_bias(hidden, mask)
        features = []
        for step in LayerPlan(self).steps():  # whole layers, or attention sublayer first (head_input)
            state = step.start(hidden, bias, mask, entities)
            features.append(self.head_features(state.head_input, mask, entities))
            hidden = step.rest(state, state.carry, mask, None)
        return features

    def forward(self, batch: Batch) -> AllLayerOutput:
        features = self.layer_features(batch)
        return AllLayerOutput(logits=[head(self.head_dropout(f)) for head, f in zip(self.exit_heads, features)])

    def with_prompts(self, num_prompts: int, position: int) -> "EarlyExitModel":
        """This model with ``num_prompts`` new soft prompts at input ``position`` (the preprocessor's
        ``prompt_position``); backbone and exit heads are shared, not copied."""
        if self.prompts is not None:
            raise ValueError(f"the model already has {self.config.num_prompts} soft prompts")
        from dataclasses import replace

        out = EarlyExitModel(self.backbone, replace(self.config, num_prompts=num_prompts, prompt_position=position))
        out.exit_heads = self.exit_heads
        return out

    # -- construction and persistence -----------------------------------------------------------
    @classmethod
    def from_config(cls, backbone_config: PretrainedConfig, config: EarlyExitConfig) -> "EarlyExitModel":
        """Random weights from a transformers config alone (tests, training from scratch)."""
        return cls(build_backbone(backbone_config), config)

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, config: EarlyExitConfig, allow_pickle: bool = False) -> "EarlyExitModel":
        """Pretrained backbone from a local transformers directory (safetensors unless
        ``allow_pickle``), new exit heads."""
        return cls(load_backbone(path, allow_pickle), config)

    def save_pretrained(self, directory: str | os.PathLike, sections: dict | None = None) -> None:
        """Write config.json (backbone), epee_config.json and model.safetensors.

        ``sections`` are extra top-level entries of epee_config.json (preprocessing,
        calibration, training record); see :mod:`epee.modeldir`.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(out)
        doc = {"model": self.config.to_dict(), "backbone": self.adapter.family, **(sections or {})}
        (out / EPEE_CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
        self.save_weights(out / WEIGHTS_NAME)

    def save_weights(self, path: str | os.PathLike) -> None:
        """Backbone + exit-head weights as one safetensors file (written whole, then renamed).

        Matrices with many exact zeros (pruned weights) are stored as a bitmask plus their
        non-zero values (:func:`epee.sparsity.pack_state`); loading restores them exactly."""
        from safetensors.torch import save_file

        path = Path(path)
        from .sparsity import pack_state

        state = pack_state({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str = "cpu", allow_pickle: bool = False
    ) -> "EarlyExitModel":
        """Load a model directory written by :meth:`save_pretrained`.

        Weights come from ``model.safetensors``, which always wins when present. A directory
        whose weights are only a pickle file (``pytorch_model.bin``, ``model.pt``, ``*.pth``,
        ``*.ckpt``, ...) raises :class:`PickleWeightsRefused` unless ``allow_pickle=True``; then
        the file is read with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler:
        even with the flag, code hidden in a malicious pickle is NOT executed (such a file is
        refused too), and a warning is logged.
        """
        from safetensors.torch import load_file

        src = Path(directory)
        for name in ("config.json", EPEE_CONFIG_NAME):
            if not (src / name).is_file():
                raise FileNotFoundError(f"model directory {src} has no {name}")
        weights = weights_path(src)
        if weights is None:
            raise FileNotFoundError(f"model directory {src} has no {WEIGHTS_NAME}")
        if is_pickle_weights(weights.name) and not allow_pickle:
            raise PickleWeightsRefused(pickle_refusal_message(f"model directory {src}", weights.name))
        backbone_config = AutoConfig.from_pretrained(src, local_files_only=True)
        config = EarlyExitConfig.from_dict(json.loads((src / EPEE_CONFIG_NAME).read_text())["model"])
        from transformers.initialization import no_init_weights

        # every weight is overwritten below (strict): random initialisation would only cost time
        # (0.23 s of a MiniLM-L6 load), as transformers' own from_pretrained skips it too
        with no_init_weights():
            model = cls.from_config(backbone_config, config)
        if is_pickle_weights(weights.name):
            state = load_pickle_state_dict(weights, device)
            log.warning("loaded pickle weights %s (restricted unpickler, weights_only=True); convert them to %s "
                        "with `epee convert`", weights.name, WEIGHTS_NAME)
        else:
            from .sparsity import unpack_state

            state = unpack_state(load_file(str(weights), device=device))  # sparse weights: bitmask + values
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

