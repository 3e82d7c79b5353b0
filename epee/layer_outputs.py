"""Every exit head's outputs on a dev set, and what any exit policy would do with them.

EPEE (arXiv 2503.02053, section 4) tunes its entropy threshold τ and patience P on the dev set.
Every exit head's output can be computed once (no early exit, :func:`collect_layer_outputs`);
what any policy would then do is a pure function of those outputs (:func:`simulate`), so the
whole (τ, P) grid is swept without running the model again (:mod:`epee.policy_search`).

The simulation reuses the engine's own decision code (``exit_signal``, ``update_streak`` and
``ExitPolicy.decide``, layer by layer over every row), so a setting chosen here exits each dev
sample at exactly the layer the batched engine will, up to float noise between batch shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .histogram import ExitHistogram
from .inputs import EncodedSample, collate
from .modeling import EarlyExitModel
from .policies import CONTINUE, ExitPolicy, ExitSignal, exit_signal, update_streak
from .runtime import Runtime


@dataclass(frozen=True)
class LayerOutputs:
    """Every exit head's class probabilities on a dev set, in input order.

    Token tasks are padded on the right to one length T across the whole set: pad positions hold
    uniform probabilities and ``token_mask`` False, so they never count.
    """

    probs: list[torch.Tensor]  # L tensors of (N, C), or (N, T, C) for token tasks; float32
    token_mask: torch.Tensor | None = None  # (N, T) bool, token tasks: tags that are scored
    lengths: torch.Tensor | None = None  # (N,) long, token tasks: real tokens per sample

    def __post_init__(self) -> None:
        if not self.probs:
            raise ValueError("LayerOutputs needs the probabilities of at least one layer")
        shape = tuple(self.probs[0].shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"probs must be (N, C) or (N, T, C) per layer, got {shape}")
        for i, p in enumerate(self.probs):
            if tuple(p.shape) != shape:
                raise ValueError(f"layer {i + 1} probs have shape {tuple(p.shape)}, layer 1 has {shape}")
        if self.token_mask is not None and (len(shape) != 3 or tuple(self.token_mask.shape) != shape[:2]):
            raise ValueError(f"token_mask shape {tuple(self.token_mask.shape)} does not match probs {shape}")
        if self.lengths is not None and (len(shape) != 3 or tuple(self.lengths.shape) != shape[:1]):
            raise ValueError(f"lengths shape {tuple(self.lengths.shape)} does not match probs {shape}")

    @property
    def num_layers(self) -> int:
        return len(self.probs)

    @property
    def num_samples(self) -> int:
        return int(self.probs[0].shape[0])

    @property
    def is_token(self) -> bool:
        return self.probs[0].dim() == 3


def collect_layer_outputs(
    model: EarlyExitModel,
    samples: list[EncodedSample],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    linear_kernel: str = "auto",
) -> LayerOutputs:
    """Run every sample through every layer once and keep each exit head's probabilities.

    Samples are batched by length (less padding) and the result is put back in input order.
    ``device`` is where batches go; the model must already be there, as with the engine.
    ``precision`` and ``linear_kernel`` as in :class:`EngineConfig` (calibrate with the
    arithmetic the pipeline runs with).
    """
    runtime = Runtime(model, device, precision, linear_kernel)  # the engine's arithmetic (epee.runtime)
    if not samples:
        raise ValueError("no samples to collect layer outputs from")
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    model.eval()
    token = model.config.task == "token"
    num_labels = model.config.num_labels
    order = sorted(range(len(samples)), key=lambda i: samples[i].length)
    chunks: list[list[torch.Tensor]] = []  # per batch: L probs tensors
    masks: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    with runtime.context():
        for start in range(0, len(order), batch_size):
            batch = collate([samples[i] for i in order[start : start + batch_size]], model.adapter.pad_token_id)
            out = model(batch.to(device))
            chunks.append([torch.softmax(lg.float(), dim=-1).cpu() for lg in out.logits])
            if token:
                masks.append(batch.token_mask)  # (n, t) bool, False at pad positions
                lengths.append(batch.attention_mask.sum(dim=1))  # (n,)
    inverse = torch.argsort(torch.tensor(order))  # sorted position of each input sample
    if not token:
        probs = [torch.cat([c[layer] for c in chunks])[inverse] for layer in range(model.num_layers)]
        return LayerOutputs(probs=probs)
    t = max(m.shape[1] for m in masks)
    length = torch.cat(lengths)[inverse]
    real = torch.arange(t).unsqueeze(0) < length.unsqueeze(1)  # (N, T)
    uniform = 1.0 / num_labels
    probs = []
    for layer in range(model.num_layers):
        # (n, t_batch, C) -> (n, T, C); positions past a sample's end become uniform whatever
        # batch they were computed in, so the outputs do not depend on batch composition
        p = torch.cat([F.pad(c[layer], (0, 0, 0, t - c[layer].shape[1]), value=uniform) for c in chunks])[inverse]
        probs.append(torch.where(real.unsqueeze(-1), p, torch.full_like(p, uniform)))
    mask = torch.cat([F.pad(m, (0, t - m.shape[1]), value=False) for m in masks])[inverse]
    return LayerOutputs(probs=probs, token_mask=mask & real, lengths=length)


@dataclass(frozen=True)
class SimulatedRun:
    """What the engine would do with a policy on the collected dev set."""

    exit_layers: torch.Tensor  # (N,) long, 1-based
    predictions: list  # per sample: label id, or (token task) tag ids over real tokens, -1 unscored

    @property
    def exits(self) -> ExitHistogram:
        return ExitHistogram.of_tensor(self.exit_layers)

    @property
    def mean_exit_layer(self) -> float:
        return self.exits.mean_exit_layer


@dataclass(frozen=True)
class _Trace:
    """Per-layer signals and patience counters; they do not depend on the policy."""

    signals: list[ExitSignal]
    streaks: list[torch.Tensor]  # (N,) PABEE counter at each layer
    predictions: torch.Tensor  # (L, N) or (L, N, T) with -1 where a token is not scored


def _trace(outputs: LayerOutputs) -> _Trace:
    """The policy-independent trace of ``outputs``, computed once per LayerOutputs (it is frozen:
    a sweep, a bootstrap and an LTT test over hundreds of settings share one softmax pass)."""
    cached = outputs.__dict__.get("_trace")
    if cached is None:
        cached = _compute_trace(outputs)
        object.__setattr__(outputs, "_trace", cached)
    return cached


def _compute_trace(outputs: LayerOutputs) -> _Trace:
    n = outputs.num_samples
    signals, streaks = [], []
    streak = torch.zeros(n, dtype=torch.long)
    previous: torch.Tensor | None = None
    for probs in outputs.probs:
        # softmax(log p) == p: the engine's exit_signal sees the same distribution it saw there
        signal = exit_signal(torch.log(probs), outputs.token_mask)
        streak = update_streak(signal.prediction, previous, streak)
        previous = signal.prediction
        # keep the collected probs rather than the recomputed copy: same values, half the memory
        signals.append(ExitSignal(probs=probs, entropy=signal.entropy, prediction=signal.prediction))
        streaks.append(streak)
    return _Trace(signals, streaks, torch.stack([s.prediction for s in signals]))


def _exit_layers(trace: _Trace, policy: ExitPolicy) -> torch.Tensor:
    """First 1-based layer at which ``policy.decide`` gives each row a nonzero reason.

    Rows that have already exited are still shown to ``decide``: its answer is per row, so the
    other rows' answers are the same as in the engine, where the exited rows are gone.
    """
    n = trace.predictions.shape[1]
    exit_layers = torch.zeros(n, dtype=torch.long)
    index = torch.arange(n)
    for layer, (signal, streak) in enumerate(zip(trace.signals, trace.streaks), start=1):
        reasons = policy.decide(layer, signal, streak, index)
        exit_layers = torch.where((reasons != CONTINUE) & (exit_layers == 0), layer, exit_layers)
        if bool((exit_layers > 0).all()):
            break
    return exit_layers


def _predictions_at(trace: _Trace, outputs: LayerOutputs, exit_layers: torch.Tensor) -> list:
    rows = torch.arange(exit_layers.shape[0])
    final = trace.predictions[exit_layers - 1, rows]  # (N,) or (N, T)
    if not outputs.is_token:
        return final.tolist()
    t = final.shape[1]
    lengths = outputs.lengths.tolist() if outputs.lengths is not None else [t] * final.shape[0]
    return [row[:k] for row, k in zip(final.tolist(), lengths)]


def simulate(outputs: LayerOutputs, policy: ExitPolicy) -> SimulatedRun:
    """Exit layer and prediction of every dev sample under ``policy``, without the model."""
    if policy.num_layers != outputs.num_layers:
        raise ValueError(f"policy is for {policy.num_layers} layers, outputs have {outputs.num_layers}")
    trace = _trace(outputs)
    exit_layers = _exit_layers(trace, policy)
    return SimulatedRun(exit_layers=exit_layers, predictions=_predictions_at(trace, outputs, exit_layers))

def layer_predictions(outputs: LayerOutputs) -> list[list]:
    """Per layer, every sample's prediction at that layer's exit head (as :func:`simulate`
    returns them): the per-layer scores of the same pass the policy search reads."""
    trace = _trace(outputs)
    n = outputs.num_samples
    return [_predictions_at(trace, outputs, torch.full((n,), layer, dtype=torch.long))
            for layer in range(1, outputs.num_layers + 1)]
