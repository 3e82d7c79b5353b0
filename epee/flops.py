"""Multiply-add (MAC) accounting per sample: what the engine actually ran, against dense full depth.

Counted per sample on its own real length T (special tokens and soft prompt positions included;
padding is a batching artefact, reported separately as the engine's padding share):

* embeddings: lookups cost nothing; ALBERT's embedding projection costs T·E·H, ViT's patch
  projection (patches)·(C·p·p)·H;
* each layer run: every linear map, T·(non-zero weights) — a 75%-sparse matrix costs a quarter of
  its dense multiply-adds on hardware that skips zeros — plus attention, 2·T²·H (scores and
  weighted sum; these have no weights to prune);
* the layer a sample exited at, as far as its :class:`~epee.layer_step.LayerStep` ran it there:
  whole; or, run head positions first (``EngineConfig.split_layers``), the keys and values of
  every token, T·(their weights), and the rest of the layer for the P positions the head reads,
  P·(the other weights) + 2·P·T·H; or, run attention first (``head_input`` "attention"), the
  layer without its feed-forward's T·(weights);
* each exit head evaluated: its pooler (BERT/ALBERT default pooling, H·H), mean pooling (T·H),
  and the head itself (F·C, or T·H·C for token tasks).

The dense full-depth reference is the same backbone with dense weights, every layer run whole (as
the stock forward runs it), and one classifier: the last exit head. So "saved by exit" = reference
− dense cost of the layers and heads actually run (a two-step exit layer's saving included, even
at full depth), "saved by sparsity" = that − the actual (sparse) cost. FLOPs ≈ 2 × MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SampleMacs:
    actual: int  # multiply-adds run for this sample (sparsity-aware)
    dense_at_exit: int  # the same layers and heads with dense weights
    dense_full: int  # dense weights, every layer, one (last) classifier


def _nonzeros(weight: torch.Tensor) -> int:
    from torch.sparse import SparseSemiStructuredTensor

    if isinstance(weight, SparseSemiStructuredTensor):  # converted for 2:4 kernels: half of it by construction
        return weight.shape[0] * weight.shape[1] // 2
    return int(torch.count_nonzero(weight.detach()))


Cost = tuple[torch.Tensor, torch.Tensor]  # (actual, dense) multiply-adds per sample, float64


def weight_macs(weights: list[torch.Tensor]) -> tuple[int, int]:
    """Multiply-adds per token of ``weights``: (non-zeros, dense size)."""
    return sum(_nonzeros(w) for w in weights), sum(w.shape[0] * w.shape[1] for w in weights)


class MacCounter:
    """Per-layer costs of one model, read once from its weights (non-zeros counted then: build it
    after any pruning). A layer run whole is counted here; a layer run otherwise reports its own
    cost (:class:`epee.layer_step.LayerStep`)."""

    def __init__(self, model) -> None:
        from .sparsity import layer_linears

        adapter, cfg = model.adapter, model.config
        self.num_layers = model.num_layers
        self.hidden = adapter.hidden_size
        linears = [layer_linears(model, i) for i in range(self.num_layers)]  # ALBERT: shared, counted per layer run
        per_layer = [weight_macs([m.weight for m in ms]) for ms in linears]
        self.sparse_per_token = [s for s, _ in per_layer]
        self.dense_per_token = [d for _, d in per_layer]
        self.embed_per_token = 0
        self.embed_fixed = 0
        if adapter.family == "albert":
            self.embed_per_token = model.backbone.encoder.embedding_hidden_mapping_in.weight.numel()
        if adapter.is_image:
            proj = model.backbone.embeddings.patch_embeddings.projection
            patches = int(model.backbone.embeddings.patch_embeddings.num_patches)
            self.embed_fixed = patches * proj.weight.numel()
        head = model.exit_heads[0]
        c = head.out_features
        self.head_fixed = head.in_features * c if cfg.task != "token" else 0
        self.head_per_token = self.hidden * c if cfg.task == "token" else 0
        if cfg.task == "sequence" and cfg.pooling == "mean":
            self.head_per_token += self.hidden
        elif cfg.task == "sequence" and adapter.family in ("bert", "albert"):
            self.head_fixed += self.hidden * self.hidden  # the pooler's dense layer

    def _layers(self, per_token: list[int], t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Σ over layers 1..k of (T·weights_per_token + 2·T²·H), per sample."""
        cum = torch.cumsum(torch.tensor([0] + per_token, dtype=torch.float64), 0)  # (L+1,)
        return t * cum[k] + k.double() * 2.0 * t * t * self.hidden

    def whole_layer(self, t: torch.Tensor, k: torch.Tensor) -> Cost:
        """1-based layer ``k`` run whole on T tokens: T·(its weights) + 2·T²·H of attention."""
        attention = 2.0 * t * t * self.hidden
        sparse = torch.tensor([0] + self.sparse_per_token, dtype=torch.float64)[k]
        dense = torch.tensor([0] + self.dense_per_token, dtype=torch.float64)[k]
        return t * sparse + attention, t * dense + attention

    def count(self, lengths: torch.Tensor, exit_layers: torch.Tensor,
              exit_layer: Callable[[torch.Tensor, torch.Tensor], Cost] | None = None) -> list[SampleMacs]:
        """MACs of samples with real lengths T (images: patches + 1) that exited at 1-based layers:
        every layer before their exit layer run whole, the exit layer as ``exit_layer(T, k)`` says
        (the step that ran it; default :meth:`whole_layer`), an exit head after each."""
        t = lengths.detach().cpu().double()
        k = exit_layers.detach().cpu().long()
        embed = self.embed_fixed + t * self.embed_per_token
        head = self.head_fixed + t * self.head_per_token
        last_actual, last_dense = (exit_layer or self.whole_layer)(t, k)
        actual = embed + self._layers(self.sparse_per_token, t, k - 1) + last_actual + k.double() * head
        dense_exit = embed + self._layers(self.dense_per_token, t, k - 1) + last_dense + k.double() * head
        full = embed + self._layers(self.dense_per_token, t, torch.full_like(k, self.num_layers)) + head
        return [SampleMacs(int(a), int(d), int(f)) for a, d, f in zip(actual.tolist(), dense_exit.tolist(), full.tolist())]


def savings(actual: float, dense_at_exit: float, dense_full: float) -> dict[str, float]:
    """Shares of the dense full-depth cost: saved in all, by early exit and by sparsity."""
    if dense_full <= 0:
        return {"saved": 0.0, "saved_by_exit": 0.0, "saved_by_sparsity": 0.0, "relative_cost": 0.0}
    return {"saved": 1.0 - actual / dense_full, "saved_by_exit": (dense_full - dense_at_exit) / dense_full,
            "saved_by_sparsity": (dense_at_exit - actual) / dense_full, "relative_cost": actual / dense_full}
