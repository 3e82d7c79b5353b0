"""The EPEE/PABEE reference style: one sample at a time, stop at its exit layer.

This is how the published EPEE, PABEE and DeeBERT code runs early exit (batch size 1, a Python
``break`` per sample). It is kept as the oracle the batched engine is tested against and as the
baseline the benchmark compares with; it shares the model, heads and policy with the engine and
differs only in scheduling.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .engine import ExitPrediction
from .flops import MacCounter
from .inputs import EncodedSample, collate
from .layer_step import LayerPlan, LayerStep
from .modeling import EarlyExitModel
from .policies import CONTINUE, REASON_NAMES, ExitPolicy, ExitSignal, exit_signal, update_streak


def run_reference(
    model: EarlyExitModel,
    samples: Sequence[EncodedSample],
    policy: ExitPolicy | None = None,
    device: str = "cpu",
) -> list[ExitPrediction]:
    model = model.eval()
    policy = policy or ExitPolicy(model.config.policy, model.num_layers)
    # whole layers (or the attention sublayer first, where the heads read it): no two-step layers
    steps = LayerPlan(model, split_layers=False, counter=MacCounter(model)).steps(policy)
    out: list[ExitPrediction] = []
    with torch.inference_mode():
        for i, sample in enumerate(samples):
            batch = collate([sample], pad_token_id=model.adapter.pad_token_id).to(device)
            mask, token_mask = batch.attention_mask, batch.token_mask if model.config.task == "token" else None
            hidden = model.embed(batch)
            previous, streak = None, torch.zeros(1, dtype=torch.long, device=device)
            index = torch.tensor([i], device=device)
            for step in steps:
                logits, state = step.first(hidden, mask, batch.entity_positions)
                signal = exit_signal(logits, token_mask)
                streak = update_streak(signal.prediction, previous, streak)
                previous = signal.prediction
                reason = int(policy.decide(step.layer + 1, signal, streak, index)[0])
                if reason != CONTINUE:
                    out.append(_prediction(step, signal, reason, mask, state.carry))
                    break
                hidden = step.rest(state, state.carry, mask, None)
    return out


def _prediction(step: LayerStep, signal: ExitSignal, reason: int, mask: torch.Tensor | None,
                hidden: torch.Tensor) -> ExitPrediction:
    """The one sample's result at ``step``'s layer."""
    probs = signal.probs[0].cpu().numpy()
    token_labels = None
    label: int | None = int(probs.argmax())
    if probs.ndim == 2:
        label, token_labels = None, tuple(signal.prediction[0].tolist())
    length = mask.sum(dim=1) if mask is not None else torch.tensor([hidden.shape[1]])
    cost = step.macs(length)[0]
    return ExitPrediction(
        label=label, probs=probs, exit_layer=step.layer + 1, num_layers=step.model.num_layers,
        exit_reason=REASON_NAMES[reason], entropy=float(signal.entropy[0]), token_labels=token_labels,
        macs=cost.actual, dense_exit_macs=cost.dense_at_exit, dense_full_macs=cost.dense_full,
    )
