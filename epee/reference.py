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
from .inputs import EncodedSample, collate
from .modeling import EarlyExitModel
from .policies import CONTINUE, REASON_NAMES, ExitPolicy, exit_signal, update_streak


def run_reference(
    model: EarlyExitModel,
    samples: Sequence[EncodedSample],
    policy: ExitPolicy | None = None,
    device: str = "cpu",
) -> list[ExitPrediction]:
    model = model.eval()
    policy = policy or ExitPolicy(model.config.policy, model.num_layers)
    adapter = model.adapter
    from .flops import MacCounter

    counter = MacCounter.for_model(model)
    out: list[ExitPrediction] = []
    with torch.inference_mode():
        for i, sample in enumerate(samples):
            batch = collate([sample], pad_token_id=adapter.pad_token_id).to(device)
            token_mask = batch.token_mask if model.config.task == "token" else None
            hidden = model.embed(batch)
            bias = adapter.attention_bias(hidden, batch.attention_mask)
            previous, streak = None, torch.zeros(1, dtype=torch.long, device=device)
            index = torch.tensor([i], device=device)
            for layer in range(model.num_layers):
                after_attention = model.head_reads_attention(layer)
                if after_attention:  # the head reads the attention sublayer; the feed-forward waits
                    hidden = adapter.layer_attention(layer, hidden, bias)
                else:
                    hidden = adapter.layer(layer, hidden, bias)
                logits = model.head_logits(layer, hidden, batch.attention_mask, batch.entity_positions)
                signal = exit_signal(logits, token_mask)
                streak = update_streak(signal.prediction, previous, streak)
                previous = signal.prediction
                reason = int(policy.decide(layer + 1, signal, streak, index)[0])
                if reason != CONTINUE:
                    probs = signal.probs[0].cpu().numpy()
                    token_labels = None
                    label: int | None = int(probs.argmax())
                    if probs.ndim == 2:
                        label, token_labels = None, tuple(signal.prediction[0].tolist())
                    length = batch.attention_mask.sum(dim=1) if batch.attention_mask is not None else torch.tensor([hidden.shape[1]])
                    cost = counter.count(length, torch.tensor([layer + 1]), after_attention=after_attention)[0]
                    out.append(
                        ExitPrediction(
                            label=label, probs=probs, exit_layer=layer + 1, num_layers=model.num_layers,
                            exit_reason=REASON_NAMES[reason], entropy=float(signal.entropy[0]),
                            token_labels=token_labels, macs=cost.actual, dense_exit_macs=cost.dense_at_exit,
                            dense_full_macs=cost.dense_full,
                        )
                    )
                    break
                if after_attention:
                    hidden = adapter.layer_feed_forward(layer, hidden)
    return out
