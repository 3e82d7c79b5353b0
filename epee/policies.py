"""Per-sample exit decisions on batched tensors.

Nothing here decides for a whole batch (PABEE and DeeBERT exited only when ``torch.all`` agreed):
every function returns one decision per row, and the engine removes exactly those rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ExitPolicyConfig

# Exit reasons, stored per row as small integers; 0 means "keep going".
CONTINUE = 0
ENTROPY = 1
PATIENCE = 2
LAST_LAYER = 3
SCHEDULED = 4
REASON_NAMES = {ENTROPY: "entropy", PATIENCE: "patience", LAST_LAYER: "last_layer", SCHEDULED: "scheduled"}


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last dim divided by log(C): 0 for one-hot, 1 for uniform."""
    c = probs.shape[-1]
    ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)
    return ent / math.log(c)


@dataclass
class ExitSignal:
    """What one exit head says about each row at one layer."""

    probs: torch.Tensor  # (N, C) or (N, T, C)
    entropy: torch.Tensor  # (N,) normalised; token task: the maximum over the row's scored tokens
    prediction: torch.Tensor  # (N,) argmax; token task: (N, T) with -1 where a token is not scored


def exit_signal(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> ExitSignal:
    """Turn exit-head logits into probabilities, entropy and predictions.

    For token classification a sample is only as certain as its least certain token, so its
    entropy is the maximum normalised token entropy over the tokens that count (``token_mask``).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    ent = normalised_entropy(probs)
    pred = probs.argmax(dim=-1)
    if probs.dim() == 3:  # (N, T, C)
        if token_mask is None:
            token_mask = torch.ones(pred.shape, dtype=torch.bool, device=pred.device)
        ent = torch.where(token_mask, ent, torch.zeros_like(ent)).amax(dim=1)
        pred = torch.where(token_mask, pred, torch.full_like(pred, -1))
    return ExitSignal(probs=probs, entropy=ent, prediction=pred)


def update_streak(
    prediction: torch.Tensor, previous: torch.Tensor | None, streak: torch.Tensor
) -> torch.Tensor:
    """PABEE's patience counter: +1 where the prediction equals the previous layer's, else 0."""
    if previous is None:
        return torch.zeros_like(streak)
    same = prediction == previous
    if same.dim() == 2:  # token task: every scored tag must be unchanged
        same = same.all(dim=1)
    return torch.where(same, streak + 1, torch.zeros_like(streak))


class ExitPolicy:
    """Applies an :class:`ExitPolicyConfig` to one layer's signal, row by row."""

    def __init__(self, config: ExitPolicyConfig, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers ({num_layers}) must be >= 1")
        self.config = config
        self.num_layers = num_layers

    def may_exit(self, layer: int) -> bool:
        """Whether any row can exit at 1-based ``layer`` (False: :meth:`decide` says CONTINUE to all)."""
        cfg = self.config
        return layer >= self.num_layers or (cfg.kind != "none" and layer >= cfg.min_exit_layer)

    def decide(
        self, layer: int, signal: ExitSignal, streak: torch.Tensor, sample_index: torch.Tensor
    ) -> torch.Tensor:
        """Exit reason per row at 1-based ``layer`` ((N,) int8, CONTINUE where the row goes on).

        Entropy wins over patience when both hold at the same layer; the last layer always exits.
        """
        n = streak.shape[0]
        reasons = torch.zeros(n, dtype=torch.int8, device=streak.device)
        if layer >= self.num_layers:
            return reasons.fill_(LAST_LAYER)
        cfg = self.config
        if layer < cfg.min_exit_layer or cfg.kind == "none":
            return reasons
        if cfg.uses_patience:
            reasons = torch.where(streak >= cfg.patience, torch.full_like(reasons, PATIENCE), reasons)
        if cfg.uses_entropy:
            reasons = torch.where(
                signal.entropy < cfg.entropy_threshold, torch.full_like(reasons, ENTROPY), reasons
            )
        return reasons


class ScheduledExit(ExitPolicy):
    """A scripted schedule: sample i leaves at layer ``exit_layers[i]`` whatever its heads say.

    Used by the benchmark to measure the engine alone, with a known ideal speedup.
    """

    def __init__(self, exit_layers: torch.Tensor, num_layers: int) -> None:
        super().__init__(ExitPolicyConfig(kind="none"), num_layers)
        layers = torch.as_tensor(exit_layers, dtype=torch.long)
        if layers.numel() and (layers.min() < 1 or layers.max() > num_layers):
            raise ValueError(f"scheduled exit layers must lie in [1, {num_layers}]")
        self.exit_layers = layers

    def may_exit(self, layer: int) -> bool:
        return True

    def decide(
        self, layer: int, signal: ExitSignal, streak: torch.Tensor, sample_index: torch.Tensor
    ) -> torch.Tensor:
        target = self.exit_layers.to(sample_index.device)[sample_index]
        reasons = torch.where(
            target <= layer,
            torch.full(target.shape, SCHEDULED, dtype=torch.int8, device=target.device),
            torch.zeros(target.shape, dtype=torch.int8, device=target.device),
        )
        if layer >= self.num_layers:
            reasons = torch.where(reasons == 0, torch.full_like(reasons, LAST_LAYER), reasons)
        return reasons
