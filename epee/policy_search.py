"""The search for an exit policy on collected layer outputs: sweep every (τ, P) setting and
choose the fastest within tolerance, plainly (:func:`choose`) or under bootstrap resampling of
the dev set (:func:`choose_robust`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import ExitPolicyConfig
from .histogram import ExitHistogram
from .layer_outputs import LayerOutputs, _exit_layers, _predictions_at, _trace
from .policies import ExitPolicy

logger = logging.getLogger("epee.calibration")

THRESHOLD_GRID = tuple(round(i * 0.025, 10) for i in range(41))  # 0.0, 0.025, ..., 1.0
# Quantiles of the observed entropies added to the grid: a well-trained head's entropies often
# sit far below 0.025, where the fixed grid would see only "never exit" and "exit at layer 1".
THRESHOLD_QUANTILES = tuple(round(q, 4) for q in np.linspace(0.02, 0.98, 49))



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
        exits = ExitHistogram.of_tensor(exit_layers, num_layers)
        return SweepPoint(kind, tau, patience, scores[key], exits.mean_exit_layer, exits.speedup(num_layers),
                          min_exit_layer)

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
    A ``score_fn`` with ``counts`` and ``from_counts`` (:class:`epee.metrics.CountedScore`, as
    :func:`epee.workflows.data.score_function` gives) is resampled from per-record statistics:
    the same drops, without rescoring every resample.
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
    counted = hasattr(score_fn, "counts") and hasattr(score_fn, "from_counts")
    if counted:  # a resample's score is its records' summed statistics: one (R, N) x (N, k) product
        weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)

        def resampled(preds: list) -> np.ndarray:
            return np.asarray(score_fn.from_counts(weights @ score_fn.counts(gold, preds)), dtype=np.float64)
    else:
        gold_draws = [[gold[i] for i in d] for d in draws]

        def resampled(preds: list) -> np.ndarray:
            return np.array([score_fn(g, [preds[i] for i in d]) for g, d in zip(gold_draws, draws)])

    full_scores = resampled(full_preds)
    floor = full_point.score - tolerance - 1e-12
    candidates = sorted((p for p in pool if p.score >= floor), key=_speed_first)
    tested: dict[bytes, tuple[float, float]] = {}
    best: RobustChoice | None = None  # the smallest drop quantile seen, should none qualify

    def drop_stats(p: SweepPoint) -> tuple[float, float]:
        exit_layers = _exit_layers(trace, ExitPolicy(p.policy_config(), num_layers))
        key = exit_layers.numpy().tobytes()
        if key not in tested:
            drops = full_scores - resampled(_predictions_at(trace, outputs, exit_layers))
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


# -- Learn then Test (epee.ltt) ----------------------------------------------------------------------
def record_predictions(outputs: LayerOutputs, exit_layers: torch.Tensor, owners: Sequence[int] | None = None,
                       trace=None) -> list:
    """Per record, its prediction when each sample (window) exits at ``exit_layers``.

    A record read in several windows (``owners[i]``: the record of sample i) is labelled as the
    handler labels it: the argmax of its windows' mean probabilities at their exit layers. Token
    tasks have one sample per record and give its tag ids (-1 where a tag is not scored).
    """
    trace = trace if trace is not None else _trace(outputs)
    if outputs.is_token or owners is None:
        return _predictions_at(trace, outputs, exit_layers)
    rows = torch.arange(exit_layers.shape[0])
    probs = torch.stack(outputs.probs)[exit_layers - 1, rows]  # (N, C) at each sample's exit
    index = torch.as_tensor(list(owners), dtype=torch.long)
    num_records = int(index.max()) + 1 if index.numel() else 0
    sums = torch.zeros(num_records, probs.shape[1], dtype=probs.dtype).index_add_(0, index, probs)
    return sums.argmax(dim=1).tolist()  # the mean's argmax: dividing by the window count changes nothing


def span_sets(predictions: list, label_names: Sequence[str]) -> list[set]:
    """Per record, the set of BIO spans its tag ids decode to (:func:`epee.metrics.bio_spans`)."""
    from .metrics import id_spans

    return [id_spans(tags, label_names) for tags in predictions]


def ltt_order(learn_losses: np.ndarray, mean_exit_layers: Sequence[float]) -> list[int]:
    """The test order of settings, learned on samples the test will not see: lowest loss rate
    on them first (the order of estimated p-values, Angelopoulos et al. 2021, section 5), the
    deeper setting first among equal rates. Without learn samples: deepest first."""
    rates = learn_losses.mean(axis=1) if learn_losses.shape[1] else np.zeros(learn_losses.shape[0])
    return sorted(range(len(mean_exit_layers)), key=lambda s: (float(rates[s]), -mean_exit_layers[s], s))


@dataclass(frozen=True)
class LttChoice:
    """A setting chosen by :func:`choose_ltt` (``point`` is the full-depth point when none was
    certified) and the test behind it."""

    point: SweepPoint
    result: Any  # epee.ltt.LttResult over the test samples; its settings are SweepPoints
    learn_samples: int  # samples that ordered the settings
    test_samples: int  # samples the settings were tested on


def choose_ltt(outputs: LayerOutputs, points: Sequence[SweepPoint], record_losses: Callable[[torch.Tensor], np.ndarray],
               learn: np.ndarray, epsilon: float, delta: float, kind: str = "epee") -> LttChoice:
    """The fastest setting of ``kind`` whose risk is at most ``epsilon`` with confidence 1 - ``delta``.

    ``record_losses(exit_layers)`` gives each record's 0/1 loss when the samples exit at those
    layers (disagreement with full depth, or a correct answer lost). Records where ``learn`` is
    True order the settings (:func:`ltt_order`); the others test them in that order, full depth
    first (:func:`epee.ltt.fixed_sequence_test`), so the order does not depend on the samples tested.
    Settings with the same exit schedule are one hypothesis.
    """
    from .ltt import fixed_sequence_test

    full = next((p for p in points if p.kind == "none"), None)
    if full is None:
        raise ValueError("points need the full-depth ('none') setting")
    pool = sorted((p for p in points if p.kind == kind), key=_speed_first)
    if not pool:
        raise ValueError(f"no sweep points of kind {kind!r}")
    num_layers = outputs.num_layers
    trace = _trace(outputs)
    learn = np.asarray(learn, dtype=bool)
    schedules: dict[bytes, tuple[SweepPoint, np.ndarray]] = {}
    for p in [full] + pool:  # the fastest-preferred setting of each distinct schedule speaks for it
        exit_layers = _exit_layers(trace, ExitPolicy(p.policy_config(), num_layers))
        key = exit_layers.numpy().tobytes()
        if key not in schedules:
            losses = np.asarray(record_losses(exit_layers), dtype=np.int8)
            if losses.shape != learn.shape:
                raise ValueError(f"record_losses gave {losses.shape[0]} losses for {learn.shape[0]} records")
            schedules[key] = (p, losses)
    settings = [p for p, _ in schedules.values()]
    matrix = np.stack([losses for _, losses in schedules.values()])  # (S, records)
    rest = settings[1:]
    order = [0] + [1 + s for s in ltt_order(matrix[1:][:, learn], [p.mean_exit_layer for p in rest])]
    result = fixed_sequence_test(matrix[order][:, ~learn], epsilon, delta, settings=[settings[s] for s in order],
                                 costs=[settings[s].mean_exit_layer for s in order])
    chosen = full if result.chosen is None else result.chosen.setting
    logger.debug("LTT: %d schedules, %d tested, chosen mean exit layer %.3f", len(settings), len(result.tests),
                 chosen.mean_exit_layer)
    return LttChoice(chosen, result, int(learn.sum()), int((~learn).sum()))
