"""The batched early-exit engine: exited samples leave the batch, the rest are regrouped by depth.

Work proceeds layer by layer over a window of samples. At depth d every sample still running,
from whichever incoming micro-batch it started in, is regrouped into full batches of
``batch_size`` rows; each batch runs layer d+1 and its exit head, and the rows whose policy says
"exit" are emitted and dropped before layer d+2. A sample that exits at layer k therefore costs
exactly k layer-rows, and deep layers still run on full batches. Samples are sorted by length
before batching and every regrouped batch is trimmed to its longest member, so padding stays low.

How a layer runs for rows that may exit after it (whole; the exit head's positions first; the
attention sublayer first) is a :class:`~epee.layer_step.LayerStep`, picked once per layer when the
engine is built (:class:`~epee.layer_step.LayerPlan`): ``first`` gives the head's logits, ``rest``
finishes the layer for the rows that go on, ``macs`` counts what an exited row ran.

An audited sample (``run(..., audit=flags)``, the pipelines' nightly audit) is emitted where its
policy exits, as any other, and then rides on with the rows still running to the last layer, whose
prediction is its full-depth reference: the audit costs the layers the sample skipped, not a second
run from layer 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import EngineConfig
from .flops import MacCounter
from .histogram import ExitHistogram
from .inputs import EncodedSample, collate
from .layer_step import LayerPlan, LayerStep
from .modeling import EarlyExitModel
from .policies import CONTINUE, REASON_NAMES, ExitPolicy, ExitSignal, exit_signal, update_streak
from .runtime import Runtime


@dataclass(frozen=True)
class ExitPrediction:
    """One sample's result: what it predicted, where and why it left the model."""

    label: int | None  # argmax class; None for token tasks (see token_labels)
    probs: np.ndarray  # (C,) class probabilities at exit; token task: (T, C) over the real tokens
    exit_layer: int  # 1-based layer whose head produced this prediction
    num_layers: int
    exit_reason: str  # "entropy", "patience", "last_layer" or "scheduled"
    entropy: float  # normalised entropy at exit (token task: max over scored tokens)
    token_labels: tuple[int, ...] | None = None  # token task: tag per real token, -1 if not scored
    macs: int = 0  # multiply-adds run for this sample (sparsity-aware; see epee.flops)
    dense_exit_macs: int = 0  # the same layers and heads with dense weights
    dense_full_macs: int = 0  # dense weights, every layer, one classifier: the reference cost


@dataclass
class EngineStats:
    """Counters of the work the engine actually did."""

    num_layers: int
    batch_size: int
    samples: int = 0
    rows_per_layer: list[int] = field(default_factory=list)  # sample-rows computed by layer i
    calls_per_layer: list[int] = field(default_factory=list)  # layer-i forward calls
    exits_per_layer: list[int] = field(default_factory=list)
    # layer calls run in two steps: the exit head's positions first (EngineConfig.split_layers), or
    # the attention sublayer first (EarlyExitConfig.head_input "attention")
    two_step_calls: int = 0
    token_slots: int = 0  # rows x padded length, summed over layer calls
    real_tokens: int = 0  # real (non-pad) tokens, summed over layer calls
    macs: int = 0  # multiply-adds, summed over samples (epee.flops)
    dense_exit_macs: int = 0
    dense_full_macs: int = 0

    def __post_init__(self) -> None:
        for name in ("rows_per_layer", "calls_per_layer", "exits_per_layer"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_layers)

    @property
    def layer_calls(self) -> int:
        return sum(self.calls_per_layer)

    @property
    def rows_computed(self) -> int:
        return sum(self.rows_per_layer)

    @property
    def mean_batch_fill(self) -> float:
        """Average rows per layer call as a share of batch_size (1.0 = every call full)."""
        calls = self.layer_calls
        return self.rows_computed / (calls * self.batch_size) if calls else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.token_slots if self.token_slots else 0.0

    @property
    def exits(self) -> ExitHistogram:
        """Samples per exit layer (a copy: the engine counts into ``exits_per_layer``)."""
        return ExitHistogram(list(self.exits_per_layer))

    @property
    def mean_exit_layer(self) -> float:
        return self.exits.mean_exit_layer

    @property
    def layer_speedup(self) -> float:
        """num_layers / mean exit layer: the ideal speedup from the layers skipped."""
        return self.exits.speedup(self.num_layers)

    def merge(self, other: "EngineStats") -> None:
        if other.num_layers != self.num_layers:
            raise ValueError(f"cannot merge stats of {other.num_layers} layers into {self.num_layers}")
        self.samples += other.samples
        for name in ("rows_per_layer", "calls_per_layer", "exits_per_layer"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, [a + b for a, b in zip(mine, theirs)])
        self.two_step_calls += other.two_step_calls
        self.token_slots += other.token_slots
        self.real_tokens += other.real_tokens
        self.macs += other.macs
        self.dense_exit_macs += other.dense_exit_macs
        self.dense_full_macs += other.dense_full_macs

    @property
    def mac_savings(self) -> dict[str, float]:
        """Shares of the dense full-depth cost saved in all, by early exit and by sparsity."""
        from .flops import savings

        return savings(self.macs, self.dense_exit_macs, self.dense_full_macs)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "num_layers": self.num_layers,
            "batch_size": self.batch_size,
            "rows_per_layer": list(self.rows_per_layer),
            "calls_per_layer": list(self.calls_per_layer),
            "exits_per_layer": list(self.exits_per_layer),
            "layer_calls": self.layer_calls,
            "two_step_calls": self.two_step_calls,
            "mean_batch_fill": self.mean_batch_fill,
            "mean_exit_layer": self.mean_exit_layer,
            "layer_speedup": self.layer_speedup,
            "padding_fraction": self.padding_fraction,
            "macs": self.macs,
            "dense_exit_macs": self.dense_exit_macs,
            "dense_full_macs": self.dense_full_macs,
            **{f"macs_{k}": v for k, v in self.mac_savings.items()},
        }


@dataclass
class RunResult:
    predictions: list[ExitPrediction]  # in input order
    stats: EngineStats
    # audited samples (``run(audit=...)``) that exited early: their prediction at the last layer
    # (its ``macs``: every layer it ran, the prediction's included); None for every other sample
    audit: list[ExitPrediction | None] = field(default_factory=list)


@dataclass
class _Rows:
    """Samples that have reached the same depth, with everything that travels with them."""

    hidden: torch.Tensor  # (N, T, H)
    mask: torch.Tensor | None  # (N, T) long, 1 = real token; None for images
    index: torch.Tensor  # (N,) position of each row in the run's input list
    streak: torch.Tensor  # (N,) patience counter
    previous: torch.Tensor | None  # (N,) or (N, T) prediction at the previous layer
    entity_positions: torch.Tensor | None  # (N, 2)
    token_mask: torch.Tensor | None  # (N, T) bool
    audit: torch.Tensor | None = None  # (N,) int8: 0 not audited, 1 audited, 2 audited and emitted (riding on)

    @property
    def size(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: torch.Tensor) -> "_Rows":
        """Rows selected by a boolean mask or index tensor, trimmed to their longest member."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return _Rows(
            pick(self.hidden), pick(self.mask), pick(self.index), pick(self.streak),
            pick(self.previous), pick(self.entity_positions), pick(self.token_mask), pick(self.audit),
        ).trimmed()

    def slice(self, start: int, stop: int) -> "_Rows":
        if start == 0 and stop == self.size:
            return self
        return self.take(torch.arange(start, stop, device=self.index.device))

    def trimmed(self) -> "_Rows":
        """Drop trailing pad columns that no row needs (right padding)."""
        if self.mask is None or self.size == 0:
            return self
        t = int(self.mask.sum(dim=1).max())
        if t == self.mask.shape[1]:
            return self
        prev = self.previous
        if prev is not None and prev.dim() == 2:
            prev = prev[:, :t]
        tm = None if self.token_mask is None else self.token_mask[:, :t]
        return replace(self, hidden=self.hidden[:, :t].contiguous(), mask=self.mask[:, :t], previous=prev, token_mask=tm)

    @staticmethod
    def cat(parts: list["_Rows"]) -> "_Rows":
        """Concatenate rows of different padded lengths, right-padding to the longest."""
        if len(parts) == 1:
            return parts[0]
        t = max(p.hidden.shape[1] for p in parts)

        def join(name: str, pad_value: float) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            if tensors[0] is None:
                return None
            if tensors[0].dim() >= 2 and name != "entity_positions":
                tensors = [_pad_seq(x, t, pad_value) for x in tensors]
            return torch.cat(tensors, dim=0)

        return _Rows(
            hidden=join("hidden", 0.0), mask=join("mask", 0), index=join("index", 0),
            streak=join("streak", 0), previous=join("previous", -1),
            entity_positions=join("entity_positions", 0), token_mask=join("token_mask", False),
            audit=join("audit", 0),
        )


def _pad_seq(x: torch.Tensor, t: int, value: float) -> torch.Tensor:
    """Right-pad dim 1 of (N, T, ...) to length t."""
    extra = t - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]  # F.pad lists the last dim first
    return F.pad(x, pad, value=value)


def _rebatch(groups: list[_Rows], batch_size: int) -> list[_Rows]:
    """Regroup the rows at one depth into batches of exactly ``batch_size`` (the last may be short).

    Order is preserved, so rows sorted by length stay sorted; a group that is already a full
    batch passes through without a copy.
    """
    out: list[_Rows] = []
    pending: list[_Rows] = []
    count = 0
    for g in groups:
        start = 0
        while start < g.size:
            n = min(batch_size - count, g.size - start)
            pending.append(g.slice(start, start + n))
            count += n
            start += n
            if count == batch_size:
                out.append(_Rows.cat(pending).trimmed())
                pending, count = [], 0
    if pending:
        out.append(_Rows.cat(pending).trimmed())
    return out


def _cpu_flags(cpuinfo: str | None) -> set[str] | None:
    """The CPU's feature flags from Linux's /proc/cpuinfo (or the text given); None where unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return flags or None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 natively (``avx512_bf16`` or AMX flags), from Linux's
    /proc/cpuinfo; None where that cannot be read. Without it, bfloat16 is emulated and slower."""
    flags = _cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot_product(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), which
    ``torch._int_mm`` needs to be fast; None where unknown. Without them (an AVX2-only CPU) the
    int8 products fall back to a slow path: measured 1 record/s against 30 in float32 for the
    medical abstracts model on an AVX2 AMD EPYC (docs/benchmarks.md)."""
    flags = _cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


class EarlyExitEngine:
    """Runs an :class:`EarlyExitModel` over many samples with per-sample early exit."""

    def __init__(
        self, model: EarlyExitModel, config: EngineConfig | None = None, policy: ExitPolicy | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        """``runtime``: the arithmetic to run with, when the caller already built it for this model
        and config (calibration, a worker's handler); else built here (int8 weights quantised)."""
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.policy = policy or ExitPolicy(model.config.policy, model.num_layers)
        self.device = torch.device(self.config.device)
        self.runtime = runtime or Runtime.from_config(model, self.config)
        self.linear_kernel = self.runtime.linear_kernel  # "onednn" or "aten" (epee.kernels)
        self.plan = LayerPlan(model, self.config.split_layers, MacCounter(model))  # after pruning: counts non-zeros

    def run(self, samples: Sequence[EncodedSample], policy: ExitPolicy | None = None,
            audit: Sequence[bool] | None = None) -> RunResult:
        """Predict every sample; results come back in input order. ``policy``: this call's exit
        policy (default: the engine's); the engine itself is built once and reused. ``audit``: per
        sample, whether to also carry it on to the last layer after it exits (``RunResult.audit``);
        its prediction is the same either way. The engine's counters count the rows that ride on
        (they are computed); its MACs and exit histogram count the predictions only."""
        policy = policy or self.policy
        cfg = self.config
        if audit is not None and len(audit) != len(samples):
            raise ValueError(f"audit has {len(audit)} flags for {len(samples)} samples")
        flags = None if audit is None or not any(audit) else torch.tensor([bool(a) for a in audit], dtype=torch.int8)
        stats = EngineStats(num_layers=self.model.num_layers, batch_size=cfg.batch_size, samples=len(samples))
        results: list[ExitPrediction | None] = [None] * len(samples)
        audited: list[ExitPrediction | None] = [None] * len(samples)
        order = list(range(len(samples)))
        if cfg.sort_by_length:
            order.sort(key=lambda i: samples[i].length)
        window = cfg.effective_window
        with self.runtime.context():
            for start in range(0, len(order), window):
                self._run_window(samples, order[start : start + window], policy, stats, results, flags, audited)
        return RunResult(predictions=results, stats=stats, audit=audited)  # type: ignore[arg-type]

    def stream(self, policy: ExitPolicy | None = None) -> EngineStream:
        """A stream over this engine: continuous batching across calls (:class:`EngineStream`)."""
        return EngineStream(self, policy)

    @property
    def macs(self) -> MacCounter:
        """The MAC counter this engine's layer steps report with (non-zeros counted at construction)."""
        return self.plan.counter

    def _run_window(
        self,
        samples: Sequence[EncodedSample],
        order: list[int],
        policy: ExitPolicy,
        stats: EngineStats,
        results: list[ExitPrediction | None],
        audit: torch.Tensor | None = None,
        audited: list[ExitPrediction | None] | None = None,
    ) -> None:
        """Run one window of samples layer by layer: the rows that exit leave, the rest regroup."""
        level = self._embed(samples, order, audit)
        for layer, step in enumerate(self.plan.steps(policy)):
            survivors: list[_Rows] = []
            for rows in _rebatch(level, self.config.batch_size):  # rows at this depth regroup here
                going_on = self._step(layer, step, rows, policy, stats, results, audited)
                if going_on is not None:
                    survivors.append(going_on)
            level = survivors
            if not level:
                break

    def _step(self, layer: int, step: LayerStep, rows: _Rows, policy: ExitPolicy, stats: EngineStats,
              results, audited) -> "_Rows | None":
        """One layer call on one batch of rows at the same depth: every row runs layer ``layer`` and
        its exit head, the rows whose policy exits are emitted into ``results`` (indexed by
        ``rows.index``), and the rows that go on come back with the layer finished (None: none)."""
        last = self.model.num_layers - 1
        _count_call(stats, layer, rows, step)
        logits, state = step.first(rows.hidden, rows.mask, rows.entity_positions)
        signal = exit_signal(logits, rows.token_mask)
        streak = update_streak(signal.prediction, rows.previous, rows.streak)
        reasons = policy.decide(layer + 1, signal, streak, rows.index)
        rows = replace(rows, hidden=state.carry, streak=streak, previous=signal.prediction)
        exited = reasons != CONTINUE
        if rows.audit is not None:  # audited rows: emitted once, where the policy exits; leave at the last layer
            emitted = exited & (rows.audit != 2)
            if layer == last and bool((rows.audit == 2).any()):
                self._emit(step, rows, signal, reasons, rows.audit == 2, audited, None)
            if layer < last:
                exited = exited & (rows.audit == 0)
                rows = replace(rows, audit=torch.where(emitted, torch.full_like(rows.audit, 2), rows.audit))
        else:
            emitted = exited
        n_emit = int(emitted.sum())
        if n_emit:  # these rows' predictions: this layer's head
            stats.exits_per_layer[layer] += n_emit
            self._emit(step, rows, signal, reasons, emitted, results, stats)
        n_exit = int(exited.sum())  # these rows leave the model here
        if n_exit == rows.size:
            return None
        going_on = rows if n_exit == 0 else rows.take(~exited)  # the others finish the layer and go on
        keep = None if n_exit == 0 else ~exited
        hidden = step.rest(state, going_on.hidden, going_on.mask, keep)
        return replace(going_on, hidden=hidden)

    def _embed(self, samples: Sequence[EncodedSample], order: list[int], audit: torch.Tensor | None = None,
               ids: Sequence[int] | None = None) -> list[_Rows]:
        """The window's samples, in ``order``, embedded in micro-batches of ``batch_size``; each row's
        ``index`` is its position in ``samples``, or ``ids[position]``."""
        model, bsz = self.model, self.config.batch_size
        level: list[_Rows] = []
        for start in range(0, len(order), bsz):
            chunk = order[start : start + bsz]
            batch = collate([samples[i] for i in chunk], pad_token_id=model.adapter.pad_token_id).to(self.device)
            n = len(chunk)
            level.append(
                _Rows(
                    hidden=model.embed(batch),  # (N, T, H)
                    mask=batch.attention_mask,
                    index=torch.tensor(chunk if ids is None else [ids[i] for i in chunk], dtype=torch.long,
                                       device=self.device),
                    streak=torch.zeros(n, dtype=torch.long, device=self.device),
                    previous=None,
                    entity_positions=batch.entity_positions,
                    token_mask=batch.token_mask if model.config.task == "token" else None,
                    audit=None if audit is None else audit[chunk].to(self.device),
                )
            )
        return level

    def _emit(self, step: LayerStep, rows: _Rows, signal: ExitSignal, reasons: torch.Tensor, exited: torch.Tensor,
              results: list[ExitPrediction | None], stats: EngineStats | None) -> None:
        """Record the exited rows' predictions, with the MACs ``step`` reports for them (``stats``
        None: an audit's full-depth reference, not counted in the run's stats)."""
        index = rows.index[exited].tolist()
        lengths_t = rows.mask[exited].sum(dim=1) if rows.mask is not None else torch.full((len(index),), rows.hidden.shape[1])
        lengths = lengths_t.tolist()
        costs = step.macs(lengths_t)
        if stats is not None:
            for c in costs:
                stats.macs += c.actual
                stats.dense_exit_macs += c.dense_at_exit
                stats.dense_full_macs += c.dense_full
        probs = signal.probs[exited].cpu().numpy()  # (n, C), or (n, T, C) for token tasks
        entropy, reason = signal.entropy[exited].tolist(), reasons[exited].tolist()
        token = probs.ndim == 3
        labels = rows.previous[exited].cpu().tolist() if token else probs.argmax(axis=-1).tolist()  # token: (n, T), -1 = not scored
        for j, i in enumerate(index):
            k = lengths[j]
            results[i] = ExitPrediction(
                label=None if token else labels[j], probs=probs[j, :k] if token else probs[j],
                exit_layer=step.layer + 1, num_layers=self.model.num_layers, exit_reason=REASON_NAMES[reason[j]],
                entropy=entropy[j], token_labels=tuple(labels[j][:k]) if token else None,
                macs=costs[j].actual, dense_exit_macs=costs[j].dense_at_exit, dense_full_macs=costs[j].dense_full,
            )


@dataclass(frozen=True)
class Finished:
    """A sample a :class:`EngineStream` has finished: its ticket from ``submit``, its prediction,
    and, for an audited sample that exited early, its prediction at the last layer."""

    ticket: int
    prediction: ExitPrediction
    audit: ExitPrediction | None = None


class EngineStream:
    """The engine over many calls: continuous batching across the batches a caller submits.

    :meth:`EarlyExitEngine.run` regroups survivors by depth inside one call, so at the end of
    every call its deep layers run on part-filled batches. A stream keeps the rows that have not
    exited between calls, one queue per layer: samples submitted later enter layer 1 while
    earlier ones wait at layer d, and :meth:`advance` runs only full batches (the deepest layer
    that has one first, so old samples finish first and few rows wait). :meth:`flush` drains
    every queue layer by layer, part-filled batches included: the caller's end of a bundle, so
    nothing waits longer than that. Each row runs the same layer step, exit head and policy as
    in ``run`` (one exit loop, :meth:`EarlyExitEngine._step`); only its batch partners differ,
    and predictions are batch-invariant. Between calls at most ``batch_size - 1`` rows wait at
    each layer.

    Tickets number the submitted samples from 0 in submission order (a :class:`ScheduledExit`
    policy indexes its schedule by them). ``stats`` counts the stream's whole life.
    """

    def __init__(self, engine: "EarlyExitEngine", policy: ExitPolicy | None = None) -> None:
        self.engine = engine
        self.policy = policy or engine.policy
        self.steps = list(engine.plan.steps(self.policy))
        layers = engine.model.num_layers
        self.stats = EngineStats(num_layers=layers, batch_size=engine.config.batch_size)
        self._queues: list[list[_Rows]] = [[] for _ in range(layers)]  # rows waiting to run layer d
        self._done: dict[int, ExitPrediction] = {}
        self._audited: dict[int, ExitPrediction] = {}
        self._in_flight: set[int] = set()
        self._audit_pending: set[int] = set()  # audited tickets emitted early, still riding on
        self._next = 0

    @property
    def in_flight(self) -> int:
        """Samples submitted and not yet returned by ``advance`` or ``flush``."""
        return len(self._in_flight)

    @property
    def waiting_rows(self) -> list[int]:
        """Rows queued before each layer."""
        return [sum(r.size for r in q) for q in self._queues]

    def submit(self, samples: Sequence[EncodedSample], audit: Sequence[bool] | None = None) -> list[int]:
        """Embed ``samples`` (sorted by length, in micro-batches) into layer 1's queue; their tickets."""
        if audit is not None and len(audit) != len(samples):
            raise ValueError(f"audit has {len(audit)} flags for {len(samples)} samples")
        tickets = list(range(self._next, self._next + len(samples)))
        if not samples:
            return tickets
        self._next += len(samples)
        flags = None if audit is None or not any(audit) else torch.tensor([bool(a) for a in audit], dtype=torch.int8)
        order = list(range(len(samples)))
        if self.engine.config.sort_by_length:
            order.sort(key=lambda i: samples[i].length)
        with self.engine.runtime.context():
            self._queues[0].extend(self.engine._embed(samples, order, flags, ids=tickets))
        self.stats.samples += len(samples)
        self._in_flight.update(tickets)
        if flags is not None:
            self._audit_pending.update(t for t, a in zip(tickets, audit) if a)
        return tickets

    def advance(self) -> list[Finished]:
        """Run every full batch there is, deepest layer first; the samples that finished."""
        bsz = self.engine.config.batch_size
        with self.engine.runtime.context():
            while True:
                sizes = self.waiting_rows
                layer = next((d for d in reversed(range(len(sizes))) if sizes[d] >= bsz), None)
                if layer is None:
                    break
                batch, self._queues[layer] = _take(self._queues[layer], bsz)
                self._run(layer, batch)
        return self._collect()

    def flush(self) -> list[Finished]:
        """Run everything still queued, part-filled batches included; every sample in flight."""
        bsz = self.engine.config.batch_size
        with self.engine.runtime.context():
            for layer in range(len(self._queues)):
                queued, self._queues[layer] = self._queues[layer], []
                for rows in _rebatch(queued, bsz):
                    self._run(layer, rows)
        return self._collect()

    def reset(self) -> list[int]:
        """Drop everything in flight (after a failed layer call); the tickets dropped."""
        dropped = sorted(self._in_flight)
        self._queues = [[] for _ in self._queues]
        self._done.clear()
        self._audited.clear()
        self._in_flight.clear()
        self._audit_pending.clear()
        return dropped

    def _run(self, layer: int, rows: _Rows) -> None:
        going_on = self.engine._step(layer, self.steps[layer], rows, self.policy, self.stats, self._done, self._audited)
        if going_on is not None:
            self._queues[layer + 1].append(going_on)

    def _collect(self) -> list[Finished]:
        """Samples whose prediction is in and, if audited, whose last layer ran too."""
        out = []
        for ticket in sorted(self._done):
            riding = ticket in self._audit_pending
            if riding and ticket not in self._audited and self._done[ticket].exit_layer < self.engine.model.num_layers:
                continue  # emitted early, still riding on to its full-depth reference
            pred = self._done.pop(ticket)
            ref = self._audited.pop(ticket, None)
            self._audit_pending.discard(ticket)
            self._in_flight.discard(ticket)
            out.append(Finished(ticket, pred, ref))
        return out


def _take(queue: list[_Rows], n: int) -> tuple[_Rows, list[_Rows]]:
    """The first ``n`` rows of a queue (first in, first out) as one batch, and what is left."""
    parts, count, rest = [], 0, list(queue)
    while count < n and rest:
        g = rest[0]
        k = min(n - count, g.size)
        parts.append(g.slice(0, k))
        count += k
        if k == g.size:
            rest.pop(0)
        else:
            rest[0] = g.slice(k, g.size)
    return _Rows.cat(parts).trimmed(), rest


def _count_call(stats: EngineStats, layer: int, rows: _Rows, step: LayerStep) -> None:
    """One layer call on ``rows``: the engine's own counters."""
    stats.rows_per_layer[layer] += rows.size
    stats.calls_per_layer[layer] += 1
    stats.two_step_calls += int(step.two_step)
    if rows.mask is not None:
        stats.token_slots += rows.mask.numel()
        stats.real_tokens += int(rows.mask.sum())
