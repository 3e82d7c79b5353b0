"""The training loss of an early-exit model: every exit head's, weighted by depth (PABEE/EPEE).

The loss of exit head i (1-based) is weighted by i and the weights are normalised to sum to 1
(PABEE, Zhou et al. 2020, eq. 6; EPEE trains the same way), so deep heads, which see the most
computation, count most while every head learns.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from .encoding import IGNORE


def layer_weights(num_layers: int) -> torch.Tensor:
    w = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return w / w.sum()


def weighted_exit_loss(
    logits: Sequence[torch.Tensor], targets: torch.Tensor, distill_weight: float = 0.0,
    teacher: torch.Tensor | None = None, teacher_weight: float = 0.0, temperature: float = 2.0,
) -> torch.Tensor:
    """Σ_i w_i · CE(head_i, y) with w_i ∝ i; token tasks ignore positions marked IGNORE.

    With ``distill_weight`` α > 0 every head but the last learns ``(1 - α) · CE(head_i, y) +
    α · KL(p_last ‖ p_i)``, the last head's distribution detached (self-distillation, as in
    BERxiT and DeeBERT follow-ups): early heads learn to agree with full depth, which is what
    lets the patience and entropy criteria exit early without changing the answer.

    With ``teacher`` logits (B, C) and ``teacher_weight`` β > 0 (sequence-level tasks), every
    head's loss above becomes ``(1 - β) · loss_i + β · T² · KL(q_T ‖ p_i,T)``: the teacher's
    and the head's distributions softened by temperature T (Hinton et al. 2015; the T² keeps the
    gradients' scale). A pruned model learns from the dense model it was cut from, the usual way
    to recover accuracy at high sparsity (Sanh et al. 2020, Kurtic et al. 2022).
    """
    weights = layer_weights(len(logits)).to(targets.device)
    last = None
    if distill_weight > 0:
        last = F.softmax(logits[-1].detach().float(), dim=-1)
    soft = None
    if teacher is not None and teacher_weight > 0:
        if targets.dim() != 1 or teacher.shape != logits[-1].shape:
            raise ValueError(f"teacher logits {tuple(teacher.shape)} must match a sequence-level head's "
                             f"{tuple(logits[-1].shape)}")
        soft = F.softmax(teacher.detach().float() / temperature, dim=-1)
    total = logits[0].new_zeros(())
    for i, (w, lg) in enumerate(zip(weights, logits)):
        flat, flat_targets = lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1)
        loss = F.cross_entropy(flat, flat_targets, ignore_index=IGNORE)  # (N, C) vs (N,), or (N, T, C) vs (N, T)
        if last is not None and i < len(logits) - 1:
            keep = flat_targets != IGNORE
            kl = F.kl_div(F.log_softmax(flat[keep], dim=-1), last.reshape(-1, lg.shape[-1])[keep], reduction="batchmean")
            loss = (1 - distill_weight) * loss + distill_weight * kl
        if soft is not None:
            kl = F.kl_div(F.log_softmax(flat / temperature, dim=-1), soft, reduction="batchmean")
            loss = (1 - teacher_weight) * loss + teacher_weight * temperature**2 * kl
        total = total + w * loss
    return total


def stack_targets(targets: Sequence[int | torch.Tensor], length: int | None = None) -> torch.Tensor:
    if isinstance(targets[0], torch.Tensor):
        t = length or max(int(x.numel()) for x in targets)
        out = torch.full((len(targets), t), IGNORE, dtype=torch.long)
        for i, x in enumerate(targets):
            out[i, : x.numel()] = x
        return out
    return torch.tensor(list(targets), dtype=torch.long)
