"""Offline calibration of the exit policy: choose τ and P from one full-depth pass over a dev set.

EPEE (arXiv 2503.02053, section 4) tunes its entropy threshold τ and patience P on the dev set.
Every exit head's output can be computed once (no early exit, :func:`collect_layer_outputs`);
what any policy would then do is a pure function of those outputs, so the whole (τ, P) grid is
swept without running the model again (:func:`sweep`).

The simulation reuses the engine's own decision code (``exit_signal``, ``update_streak`` and
``ExitPolicy.decide``, layer by layer over every row), so a setting chosen here exits each dev
sample at exactly the layer the batched engine will, up to float noise between batch shapes.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ExitPolicyConfig
from .histogram import ExitHistogram
from .inputs import EncodedSample, collate
from .kernels import Int8Weights, linear_kernel_mode, resolve_linear_kernel
from .modeling import EarlyExitModel, precision_autocast
from .policies import CONTINUE, ExitPolicy, ExitSignal, exit_signal, update_streak

logger = logging.getLogger(__name__)

SWEEP_KINDS = ("none", "entropy", "patience", "epee")
THRESHOLD_GRID = tuple(round(i * 0.025, 10) for i in range(41))  # 0.0, 0.025, ..., 1.0
# Quantiles of the observed entropies added to the grid: a well-trained head's entropies often
# sit far below 0.025, where the fixed grid would see only "never exit" and "exit at layer 1".
THRESHOLD_QUANTILES = tuple(round(q, 4) for q in np.linspace(0.02, 0.98, 49))


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
    autocast = precision_autocast(device, precision)
    int8 = Int8Weights.for_model(model) if precision == "int8" else None
    kernel = linear_kernel_mode(resolve_linear_kernel(linear_kernel, device, precision), int8)
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
    with torch.inference_mode(), autocast, kernel:
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
        return ExitHistogram.of_layers(self.exit_layers.tolist())

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


@dataclass(frozen=True)
class SweepPoint:
    """One policy setting and what it scored on the dev set."""

    kind: str  # "none", "entropy", "patience" or "epee"
    entropy_threshold: float | None  # τ; None where the kind does not use it
    patience: int | None  # P; None where the kind does not use it
    score: float  # score_fn of the simulated predictions, a fraction in [0, 1]
    mean_exit_layer: float
    layer_speedup: float  # num_layers / mean_exit_layer: the ideal speedup from skipped layers
    min_exit_layer: int = 1

    def policy_config(self) -> ExitPolicyConfig:
        """The config that reproduces this point in the engine."""
        kwargs: dict[str, Any] = {"kind": self.kind, "min_exit_layer": self.min_exit_layer}
        if self.entropy_threshold is not None:
            kwargs["entropy_threshold"] = self.entropy_threshold
        if self.patience is not None:
            kwargs["patience"] = self.patience
        return ExitPolicyConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _thresholds(entropies: list[torch.Tensor]) -> list[float]:
    values = set(THRESHOLD_GRID)
    observed = torch.cat([e.flatten() for e in entropies]).double().numpy() if entropies else np.zeros(0)
    observed = observed[np.isfinite(observed)]
    if observed.size:
        distinct = np.unique(observed)  # sorted
        # τ goes just above each quantile, halfway to the next distinct entropy: "entropy < τ" then
        # includes the quantile itself, and float noise between the engine's batch shapes cannot
        # move a dev entropy across τ.
        quantiles = np.quantile(observed, THRESHOLD_QUANTILES, method="lower")
        for i in np.unique(np.searchsorted(distinct, quantiles, side="right")):
            if i < distinct.size:  # above the largest entropy τ = 1.0 already does the same
                values.add(min(1.0, max(0.0, float((distinct[i - 1] + distinct[i]) / 2))))
    return sorted(values)


def default_thresholds(outputs: LayerOutputs, min_exit_layer: int = 1) -> list[float]:
    """The fixed grid 0, 0.025, ..., 1 plus quantiles of the entropies where an exit can happen
    (layers ``min_exit_layer`` .. L-1), deduplicated and sorted."""
    trace = _trace(outputs)
    return _thresholds([s.entropy for s in trace.signals[min_exit_layer - 1 : outputs.num_layers - 1]])


def sweep(
    outputs: LayerOutputs,
    score_fn: Callable[[list], float],
    num_layers: int,
    thresholds: Sequence[float] | None = None,
    patiences: Sequence[int] | None = None,
    min_exit_layer: int = 1,
) -> list[SweepPoint]:
    """Score every policy setting on the collected outputs.

    Points: one ``none`` (full depth), one ``entropy`` point per τ, one ``patience`` point per P
    (default 1 .. L-1) and an ``epee`` point per (τ, P). ``score_fn`` receives the predictions as
    :func:`simulate` returns them. Settings that exit every sample at the same layers share one
    call of ``score_fn``, so a fine τ grid costs little more than a coarse one.
    """
    if num_layers != outputs.num_layers:
        raise ValueError(f"num_layers ({num_layers}) does not match the {outputs.num_layers} collected layers")
    trace = _trace(outputs)
    if thresholds is None:
        thresholds = _thresholds([s.entropy for s in trace.signals[min_exit_layer - 1 : num_layers - 1]])
    if patiences is None:
        patiences = range(1, num_layers)
    scores: dict[bytes, float] = {}

    def point(kind: str, tau: float | None, patience: int | None) -> SweepPoint:
        probe = SweepPoint(kind, tau, patience, 0.0, 0.0, 0.0, min_exit_layer)
        exit_layers = _exit_layers(trace, ExitPolicy(probe.policy_config(), num_layers))
        key = exit_layers.numpy().tobytes()
        if key not in scores:
            scores[key] = float(score_fn(_predictions_at(trace, outputs, exit_layers)))
        mean = float(exit_layers.double().mean())
        return SweepPoint(kind, tau, patience, scores[key], mean, num_layers / mean, min_exit_layer)

    points = [point("none", None, None)]
    points += [point("entropy", float(tau), None) for tau in thresholds]
    points += [point("patience", None, int(p)) for p in patiences]
    points += [point("epee", float(tau), int(p)) for tau in thresholds for p in patiences]
    logger.debug("swept %d policy settings, %d distinct exit schedules", len(points), len(scores))
    return points


def _speed_first(p: SweepPoint) -> tuple:
    """Fastest, then best score, then larger τ and smaller P (the more eager of equal settings)."""
    tau = p.entropy_threshold if p.entropy_threshold is not None else -math.inf
    patience = p.patience if p.patience is not None else math.inf
    return (p.mean_exit_layer, -p.score, -tau, patience)


def frontier(points: Sequence[SweepPoint], kind: str) -> list[SweepPoint]:
    """Pareto frontier of one kind (higher score, lower mean exit layer), fastest first.

    Settings with exactly the same score and mean exit layer (common on a fine τ grid) are
    reported once, by the setting :func:`choose` would prefer among them.
    """
    out: list[SweepPoint] = []
    best = -math.inf
    for p in sorted((p for p in points if p.kind == kind), key=_speed_first):
        if p.score > best:  # every point before it is at least as fast
            out.append(p)
            best = p.score
    return out


def choose(points: Sequence[SweepPoint], full_score: float, tolerance: float, kind: str = "epee") -> SweepPoint:
    """The fastest setting of ``kind`` whose score is within ``tolerance`` of ``full_score``.

    Scores and tolerance are fractions (0.01 = one point). If no setting qualifies, the safest
    one is returned: the highest score, then the lowest mean exit layer.
    """
    pool = [p for p in points if p.kind == kind]
    if not pool:
        raise ValueError(f"no sweep points of kind {kind!r}")
    floor = full_score - tolerance - 1e-12  # 0.53 - 0.05 is 0.48000000000000004 in floats
    qualified = [p for p in pool if p.score >= floor]
    if qualified:
        return min(qualified, key=_speed_first)
    logger.warning(
        "no %s setting scores within %.4f of %.4f; taking the most accurate one", kind, tolerance, full_score
    )
    return min(pool, key=lambda p: (-p.score,) + _speed_first(p))


@dataclass(frozen=True)
class RobustChoice:
    """A setting chosen by :func:`choose_robust`, with the bootstrap evidence behind it."""

    point: SweepPoint
    drop_quantile: float  # the ``confidence`` quantile of the resampled drop (full minus setting), a fraction
    mean_drop: float  # mean resampled drop
    candidates_tested: int  # settings tested before (and including) this one


def choose_robust(
    outputs: LayerOutputs,
    points: Sequence[SweepPoint],
    gold: Sequence,
    score_fn: Callable[[list, list], float],
    tolerance: float,
    kind: str = "epee",
    confidence: float = 0.9,
    resamples: int = 200,
    seed: int = 0,
) -> RobustChoice:
    """The fastest setting of ``kind`` whose score drop stays within ``tolerance`` under resampling.

    :func:`choose` takes the fastest setting whose score on the dev set is within tolerance. Among
    hundreds of settings, that is the one whose dev-set noise happened to favour it most (the
    winner's curse): on new records it loses more than the tolerance. Here each candidate is
    compared with full depth on ``resamples`` paired bootstrap resamples of the dev set (the same
    records for both, the same resamples for every candidate); it qualifies when the
    ``confidence`` quantile of its drop, ``score_fn(full) - score_fn(setting)``, is at most
    ``tolerance``. Candidates are that kind's settings that pass the plain test, fastest first
    (settings with the same exit schedule are resampled once); the first that qualifies is
    returned. If none does, the candidate with the smallest drop quantile is.

    ``score_fn(gold, predictions)`` scores any subset; ``gold`` is in the same order as ``outputs``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence ({confidence}) must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples ({resamples}) must be >= 1")
    n = outputs.num_samples
    if len(gold) != n:
        raise ValueError(f"gold has {len(gold)} entries, outputs have {n} samples")
    full_point = next((p for p in points if p.kind == "none"), None)
    if full_point is None:
        raise ValueError("points need the full-depth ('none') setting")
    pool = [p for p in points if p.kind == kind]
    if not pool:
        raise ValueError(f"no sweep points of kind {kind!r}")
    num_layers = outputs.num_layers
    trace = _trace(outputs)
    full_preds = _predictions_at(trace, outputs, torch.full((n,), num_layers, dtype=torch.long))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, n, size=n) for _ in range(resamples)]
    gold_draws = [[gold[i] for i in d] for d in draws]
    full_scores = np.array([score_fn(g, [full_preds[i] for i in d]) for g, d in zip(gold_draws, draws)])
    floor = full_point.score - tolerance - 1e-12
    candidates = sorted((p for p in pool if p.score >= floor), key=_speed_first)
    tested: dict[bytes, tuple[float, float]] = {}
    best: RobustChoice | None = None  # the smallest drop quantile seen, should none qualify

    def drop_stats(p: SweepPoint) -> tuple[float, float]:
        exit_layers = _exit_layers(trace, ExitPolicy(p.policy_config(), num_layers))
        key = exit_layers.numpy().tobytes()
        if key not in tested:
            preds = _predictions_at(trace, outputs, exit_layers)
            drops = full_scores - np.array([score_fn(g, [preds[i] for i in d]) for g, d in zip(gold_draws, draws)])
            tested[key] = (float(np.quantile(drops, confidence)), float(drops.mean()))
        return tested[key]

    for count, p in enumerate(candidates, start=1):
        q, mean = drop_stats(p)
        if q <= tolerance + 1e-12:
            return RobustChoice(p, q, mean, count)
        if best is None or q < best.drop_quantile:
            best = RobustChoice(p, q, mean, count)
    logger.warning("no %s setting keeps its drop within %.4f at confidence %.2f; taking the safest one",
                   kind, tolerance, confidence)
    if best is not None:
        return dataclasses.replace(best, candidates_tested=len(candidates))
    safest = min(pool, key=lambda p: (-p.score,) + _speed_first(p))
    q, mean = drop_stats(safest)
    return RobustChoice(safest, q, mean, 0)


CSV_FIELDS = ("kind", "entropy_threshold", "patience", "min_exit_layer", "score", "mean_exit_layer", "layer_speedup")


def write_sweep_table(points: Sequence[SweepPoint], path_csv: str | os.PathLike) -> None:
    """Every swept point as one CSV row (empty cells where a kind has no τ or P)."""
    path = Path(path_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for p in points:
            writer.writerow(["" if getattr(p, k) is None else getattr(p, k) for k in CSV_FIELDS])


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table_markdown(points: Sequence[SweepPoint], chosen: SweepPoint | None) -> str:
    """A Markdown table of each kind's frontier, the chosen setting marked."""
    lines = [
        "| kind | τ | P | score | mean exit layer | layer speedup | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    shown = False
    for kind in SWEEP_KINDS:
        for p in frontier(points, kind):
            mark = "**chosen**" if p == chosen else ""
            shown |= p == chosen
            lines.append(
                f"| {p.kind} | {_fmt(p.entropy_threshold, '.4g')} | {_fmt(p.patience, 'd')} | {p.score:.4f} "
                f"| {p.mean_exit_layer:.3f} | {p.layer_speedup:.2f}x | {mark} |"
            )
    if chosen is not None and not shown:  # off the frontier (e.g. a hand-picked setting)
        c = chosen
        lines.append(
            f"| {c.kind} | {_fmt(c.entropy_threshold, '.4g')} | {_fmt(c.patience, 'd')} | {c.score:.4f} "
            f"| {c.mean_exit_layer:.3f} | {c.layer_speedup:.2f}x | **chosen** (off the frontier) |"
        )
    return "\n".join(lines) + "\n"


def plot_frontier(
    points: Sequence[SweepPoint], chosen: SweepPoint | None, path_png: str | os.PathLike, title: str
) -> None:
    """Score against mean exit layer: each kind's frontier, the full-depth point and the choice."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the machines that run calibration
    from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    styles = {"entropy": ("tab:blue", "o"), "patience": ("tab:green", "s"), "epee": ("tab:orange", "^")}
    for kind, (color, marker) in styles.items():
        line = frontier(points, kind)
        if line:
            ax.plot(
                [p.mean_exit_layer for p in line], [p.score for p in line],
                color=color, marker=marker, markersize=4, linewidth=1.2, label=f"{kind} frontier",
            )
    for p in points:
        if p.kind == "none":
            ax.scatter([p.mean_exit_layer], [p.score], color="black", marker="D", s=40, zorder=3, label="full depth")
            break
    if chosen is not None:
        setting = ", ".join(
            s for s in (
                None if chosen.entropy_threshold is None else f"τ={chosen.entropy_threshold:.3g}",
                None if chosen.patience is None else f"P={chosen.patience}",
            ) if s
        )
        ax.scatter(
            [chosen.mean_exit_layer], [chosen.score], color="red", marker="*", s=180, zorder=4,
            label=f"chosen: {chosen.kind} {setting}".rstrip(),
        )
    ax.set_xlabel("mean exit layer")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
