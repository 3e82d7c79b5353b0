"""Exit heads fitted as linear probes on a frozen backbone (what the sample job and the engine
demo do instead of fine-tuning), and the feature spread that says when such a probe is fragile
under int8 or bfloat16 rounding."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch.nn import functional as F

from .inputs import EncodedSample, collate
from .modeling import EarlyExitModel

log = logging.getLogger(__name__)


# Below this feature spread (see :func:`feature_spread`) a probe's head reads differences of the
# order of int8's per-row rounding (1-2% of a linear layer's output on MiniLM-L6) or bfloat16's:
# the sample notes model's [CLS] probes (spread 0.001-0.03 at layers 1-5 of MiniLM-L6) fell from
# 0.97-0.98 accuracy per head in float32 to 0.40-0.69 in int8 and 0.50-0.93 at layers 1-4 in
# bfloat16; its mean-pooled probes (spread about 0.42) scored the same in all three (docs/analyses.md).
LOW_PRECISION_SPREAD = 0.05


def feature_spread(x: torch.Tensor) -> float:
    """How much a head's input features differ between samples, relative to their common part:
    ``|std over samples| / |mean over samples|`` of ``x`` (N, F). A pretrained BERT's early [CLS]
    states are a large shared vector plus differences of about a thousandth of it."""
    x = x.double()
    mean = x.mean(0).norm().item()
    return math.inf if mean == 0 else x.std(0).norm().item() / mean


def fit_heads_as_probes(
    model: EarlyExitModel, samples: Sequence[EncodedSample], labels: torch.Tensor, batch_size: int, l2: float = 1e-3
) -> list[float]:
    """Fit every exit head as a linear probe on the frozen backbone; returns each head's
    :func:`feature_spread`.

    Early-layer [CLS] features of a pretrained BERT vary very little between notes (std ~1e-4),
    far too little for a briefly trained unnormalised head; so each head is fitted by L-BFGS
    logistic regression on standardised features and the standardisation is folded into the
    head's weights (exact). Full fine-tuning of backbone and heads is `epee train`'s job.

    Such a head amplifies its input's tiny differences, and with them any rounding: heads whose
    features spread less than ``LOW_PRECISION_SPREAD`` are named in a warning, since int8 or
    bfloat16 can change what they predict (mean pooling, ``EarlyExitConfig(pooling="mean")``,
    gives MiniLM-style backbones features that differ far more).
    """
    with torch.no_grad():
        chunks = [
            model.layer_features(collate(samples[s : s + batch_size], model.adapter.pad_token_id))
            for s in range(0, len(samples), batch_size)
        ]
    spreads = []
    for i, head in enumerate(model.exit_heads):
        x = torch.cat([c[i] for c in chunks])  # (N, F)
        spreads.append(feature_spread(x))
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], head.out_features, requires_grad=True)
        b = torch.zeros(head.out_features, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ w + b, labels) + l2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():  # logits = ((x - mean) / std) @ w + b  ==  x @ (w / std) + (b - mean @ (w / std))
            scaled = w / std[:, None]
            head.weight.copy_(scaled.T)
            head.bias.copy_(b - mean @ scaled)
    narrow = [f"{i + 1} ({s:.1e})" for i, s in enumerate(spreads) if s < LOW_PRECISION_SPREAD]
    if narrow:
        log.warning(
            "exit heads %s read features that differ between samples by less than %.0f%% of their common part: "
            "their probes amplify that, so int8 or bfloat16 rounding can change what they predict (calibrate "
            "and evaluate in the precision you run; pooling='mean' spreads a pretrained encoder's features more)",
            ", ".join(narrow), 100 * LOW_PRECISION_SPREAD)
    return spreads
