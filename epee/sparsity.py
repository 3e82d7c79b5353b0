"""Weight sparsity for the transformer layers (MediSwift, arXiv 2403.00952): magnitude masks,
sparse training with the masks enforced, compact storage of sparse weights.

What is pruned: the weight matrices of every linear map inside the transformer layers (attention
query/key/value/output and the feed-forward pair; GPT-2's ``Conv1D`` included). Embeddings,
poolers, final norms, biases and exit heads stay dense, as in MediSwift.

Masks are chosen by weight magnitude, either over all prunable weights at once (``global``: the
layers that matter less lose more) or per matrix (``layer``: every matrix at the target), or in
the 2:4 semi-structured pattern (in every group of 4 consecutive input weights of an output, the
2 largest are kept), the pattern that NVIDIA's sparse tensor cores run. Pruning may be gradual:
the sparsity then follows the cubic schedule of Zhu & Gupta (2017) over the first training steps,
re-selecting masks by magnitude as it rises.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

SCOPES = ("global", "layer")
PATTERNS = ("unstructured", "2:4")
# a stored weight matrix with at least this share of exact zeros is kept as bitmask + values
PACK_MIN_ZEROS = 0.25
MASK_SUFFIX = ".__sparse_mask"
VALUES_SUFFIX = ".__sparse_values"
SHAPE_SUFFIX = ".__sparse_shape"


@dataclass(frozen=True)
class SparsityConfig:
    """Target and method of pruning; recorded in the model directory."""

    sparsity: float  # share of prunable weights set to zero, in [0, 1)
    scope: str = "global"  # "global" (one magnitude threshold) or "layer" (each matrix at the target)
    pattern: str = "unstructured"  # or "2:4" (then sparsity must be 0.5)
    gradual_steps: int = 0  # 0: prune at once; N: rise from 0 to the target over N steps (cubic)

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0 or math.isnan(self.sparsity):
            raise ValueError(f"sparsity ({self.sparsity!r}) must lie in [0, 1)")
        if self.scope not in SCOPES:
            raise ValueError(f"scope ({self.scope!r}) must be one of {SCOPES}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern ({self.pattern!r}) must be one of {PATTERNS}")
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"the 2:4 pattern keeps 2 of every 4 weights: sparsity must be 0.5, not {self.sparsity}")
        if isinstance(self.gradual_steps, bool) or not isinstance(self.gradual_steps, int) or self.gradual_steps < 0:
            raise ValueError(f"gradual_steps ({self.gradual_steps!r}) must be an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def at_step(self, step: int) -> float:
        """Target sparsity after ``step`` optimiser steps (1-based): s·(1 - (1 - t/N)^3)."""
        if not self.gradual_steps or step >= self.gradual_steps:
            return float(self.sparsity)
        return float(self.sparsity) * (1.0 - (1.0 - max(step, 0) / self.gradual_steps) ** 3)


@dataclass(frozen=True)
class Prunable:
    name: str  # parameter name in the EarlyExitModel's state dict
    weight: nn.Parameter
    in_axis: int  # axis of the input features: 1 for nn.Linear (out, in), 0 for GPT-2's Conv1D (in, out)
    layer: int  # 0-based transformer layer (ALBERT: the first layer that runs the shared group)


def layer_linears(model, i: int) -> list[nn.Module]:
    """The linear maps (``nn.Linear`` and GPT-2's ``Conv1D``) that 0-based layer ``i`` runs."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.adapter.layer_module(i).modules() if isinstance(m, (nn.Linear, Conv1D))]


def prunable_weights(model) -> list[Prunable]:
    """Every linear weight inside the transformer layers, once each (ALBERT shares them)."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    out = []
    for i in range(model.num_layers):
        for module in layer_linears(model, i):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                out.append(Prunable(names[id(module.weight)], module.weight, 1 if isinstance(module, nn.Linear) else 0, i))
    return out


def _keep_largest(magnitude: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping all but the round(sparsity·n) smallest entries (exact count, ties by index)."""
    flat = magnitude.flatten()
    k = int(round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view_as(magnitude)


def _groups_of_four(weight: torch.Tensor, in_axis: int) -> torch.Tensor:
    """(out, in / 4, 4) view of a weight: each output's consecutive input weights in fours."""
    w = weight.detach()
    if in_axis == 0:
        w = w.t()
    out_f, in_f = w.shape
    if in_f % 4:
        raise ValueError(f"2:4 sparsity needs input features divisible by 4, got {in_f}")
    return w.reshape(out_f, in_f // 4, 4)


def two_four_mask(weight: torch.Tensor, in_axis: int) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive input weights of each output."""
    groups = _groups_of_four(weight, in_axis).abs()
    top = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).flatten(1)
    return keep.t() if in_axis == 0 else keep


def magnitude_masks(weights: list[Prunable], sparsity: float, scope: str = "global",
                    pattern: str = "unstructured") -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) by weight magnitude; see the module docstring."""
    if pattern == "2:4":
        return {p.name: two_four_mask(p.weight, p.in_axis) for p in weights}
    if scope == "layer":
        return {p.name: _keep_largest(p.weight.detach().abs(), sparsity) for p in weights}
    flat = torch.cat([p.weight.detach().abs().flatten().float() for p in weights])
    keep = _keep_largest(flat, sparsity)
    out, start = {}, 0
    for p in weights:
        n = p.weight.numel()
        out[p.name] = keep[start : start + n].view_as(p.weight)
        start += n
    return out


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        params[name].mul_(keep.to(params[name].device, params[name].dtype))


def measured_sparsity(model) -> dict[str, Any]:
    """Exact zeros among the prunable weights: overall, per layer and per matrix."""
    per_layer: dict[int, list[int]] = {}  # layer -> [zeros, weights]
    for p in prunable_weights(model):
        counts = per_layer.setdefault(p.layer, [0, 0])
        counts[0] += int((p.weight == 0).sum())
        counts[1] += p.weight.numel()
    zeros, total = sum(z for z, _ in per_layer.values()), sum(n for _, n in per_layer.values())
    return {"sparsity": zeros / total if total else 0.0, "prunable_weights": total,
            "per_layer": [round(z / n, 4) for _, (z, n) in sorted(per_layer.items())]}


class MaskEnforcer:
    """Keeps a model sparse during training: call :meth:`after_step` after every optimiser step.

    With a gradual schedule the masks are re-selected by magnitude as the target rises (weights
    already pruned are zero, so they stay pruned); afterwards the last masks are re-applied.
    """

    def __init__(self, model, config: SparsityConfig, start_step: int = 0) -> None:
        self.model, self.config = model, config
        self.weights = prunable_weights(model)
        self._select(config.at_step(start_step))

    def _select(self, sparsity: float) -> None:
        self.current = sparsity
        self.masks = magnitude_masks(self.weights, sparsity, self.config.scope, self.config.pattern)
        apply_masks(self.model, self.masks)

    def after_step(self, step: int) -> None:
        target = self.config.at_step(step)
        if target != self.current:
            self._select(target)
        else:
            apply_masks(self.model, self.masks)

    def finish(self) -> None:
        """Reach the target now, whether or not training ran through the whole schedule."""
        self.after_step(self.config.gradual_steps)


# -- compact storage ----------------------------------------------------------------------------
def pack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store each 2-D float weight with at least 25% zeros as a bitmask and its non-zero values.

    A 75%-sparse float32 matrix then takes 1/8 byte (mask) + 1 byte (values) per entry instead
    of 4. Other tensors are unchanged. :func:`unpack_state` inverts it exactly.
    """
    out = {}
    for name, t in state.items():
        if t.dim() == 2 and t.is_floating_point() and t.numel() >= 64:
            zero = t == 0
            if float(zero.float().mean()) >= PACK_MIN_ZEROS:
                keep = (~zero).flatten().numpy()
                out[name + MASK_SUFFIX] = torch.from_numpy(np.packbits(keep))
                out[name + VALUES_SUFFIX] = t.flatten()[torch.from_numpy(keep)].contiguous()
                out[name + SHAPE_SUFFIX] = torch.tensor(list(t.shape), dtype=torch.long)
                continue
        out[name] = t
    return out


def unpack_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense tensors again from :func:`pack_state`'s output (a no-op for a dense state)."""
    if not any(k.endswith(MASK_SUFFIX) for k in state):
        return state
    out = {}
    for name, t in state.items():
        if name.endswith(VALUES_SUFFIX) or name.endswith(SHAPE_SUFFIX):
            continue
        if not name.endswith(MASK_SUFFIX):
            out[name] = t
            continue
        base = name[: -len(MASK_SUFFIX)]
        shape = [int(x) for x in state[base + SHAPE_SUFFIX].tolist()]
        n = int(np.prod(shape))
        keep = torch.from_numpy(np.unpackbits(t.cpu().numpy(), count=n).astype(bool))
        values = state[base + VALUES_SUFFIX]
        if int(keep.sum()) != values.numel():
            raise ValueError(f"sparse weight {base}: mask keeps {int(keep.sum())} entries, {values.numel()} values stored")
        dense = torch.zeros(n, dtype=values.dtype, device=values.device)
        dense[keep.to(values.device)] = values
        out[base] = dense.view(shape)
    return out


# -- real speed on GPUs with sparse tensor cores ---------------------------------------------------
SEMI_STRUCTURED_MIN = {torch.float16: (32, 64), torch.bfloat16: (32, 64)}  # rows, cols multiples (PyTorch's CUTLASS)


def is_two_four(weight: torch.Tensor, in_axis: int = 1) -> bool:
    """Whether every group of 4 consecutive input weights of each output has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[in_axis] % 4:
        return False
    return bool(((_groups_of_four(weight, in_axis) != 0).sum(-1) <= 2).all())


def semi_structured_support(device: torch.device | str) -> str | None:
    """None if this device runs PyTorch's 2:4 semi-structured kernels, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"2:4 sparse kernels need a CUDA GPU, not {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 sparse tensor cores need compute capability 8.0 or newer, this GPU has {major}.x"
    return None


def convert_semi_structured(model) -> dict[str, Any]:
    """Swap 2:4-sparse ``nn.Linear`` weights for PyTorch semi-structured sparse tensors, in place.

    For inference on a CUDA GPU with sparse tensor cores (Ampere or newer), with the model in
    float16 or bfloat16 (the dtypes those kernels take). Weights that are not 2:4, are not
    ``nn.Linear`` (GPT-2's Conv1D) or whose shape the kernels do not take stay dense. Returns
    counts: converted, and skipped by reason.
    """
    from torch.sparse import to_sparse_semi_structured

    first = next(model.parameters())
    why = semi_structured_support(first.device)
    if why:
        raise ValueError(why)
    if first.dtype not in SEMI_STRUCTURED_MIN:
        raise ValueError(f"2:4 sparse kernels take float16 or bfloat16 weights, the model is {first.dtype}")
    rows, cols = SEMI_STRUCTURED_MIN[first.dtype]
    report: dict[str, Any] = {"converted": 0, "skipped": {}}
    modules = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}
    for p in prunable_weights(model):
        module = modules.get(id(p.weight))
        reason = None
        if module is None:
            reason = "not nn.Linear"
        elif p.weight.shape[0] % rows or p.weight.shape[1] % cols:
            reason = f"shape not a multiple of ({rows}, {cols})"
        elif not is_two_four(p.weight, 1):
            reason = "not 2:4 sparse"
        if reason:
            report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        report["converted"] += 1
    return report
