"""The batched early-exit engine: exited samples leave the batch, the rest are regrouped by depth.

Work proceeds layer by layer over a window of samples. At depth d every sample still running,
from whichever incoming micro-batch it started in, is regrouped into full batches of
``batch_size`` rows; each batch runs layer d+1 and its exit head, and the rows whose policy says
"exit" are emitted and dropped before layer d+2. A sample that exits at layer k therefore costs
exactly k layer-rows, and deep layers still run on full batches. Samples are sorted by length
before batching and every regrouped batch is trimmed to its longest member, so padding stays low.

Two-step layers (``EngineConfig.split_layers``, on by default): where the exit heads read a few
positions ([CLS], GPT-2's last token, a relation's entity markers), a layer where rows
may exit first computes every token's keys and values and the layer's output at those positions
only, enough for the head; the queries, attention output and feed-forward of all their tokens
(the head's positions a second time: 1/T of the work), reusing the keys and values, run only for
the rows that go on. A row that exits at layer k so pays k-1 whole layers plus its exit layer's
keys and values (about a sixth of a BERT layer);
the results are the same as whole layers'.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import EngineConfig
from .histogram import ExitHistogram
from .inputs import EncodedSample, collate
from .kernels import Int8Weights, linear_kernel_mode, resolve_linear_kernel
from .modeling import EarlyExitModel, precision_autocast
from .policies import CONTINUE, REASON_NAMES, ExitPolicy, exit_signal, update_streak


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

    @property
    def size(self) -> int:
        return int(self.index.shape[0])

    def take(self, rows: torch.Tensor) -> "_Rows":
        """Rows selected by a boolean mask or index tensor, trimmed to their longest member."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return _Rows(
            pick(self.hidden), pick(self.mask), pick(self.index), pick(self.streak),
            pick(self.previous), pick(self.entity_positions), pick(self.token_mask),
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


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 natively (``avx512_bf16`` or AMX flags), from Linux's
    /proc/cpuinfo; None where that cannot be read. Without it, bfloat16 is emulated and slower."""
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
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class EarlyExitEngine:
    """Runs an :class:`EarlyExitModel` over many samples with per-sample early exit."""

    def __init__(
        self, model: EarlyExitModel, config: EngineConfig | None = None, policy: ExitPolicy | None = None
    ) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.policy = policy or ExitPolicy(model.config.policy, model.num_layers)
        self.device = torch.device(self.config.device)
        # "onednn" or "aten": the float32 CPU linear kernel this engine's runs use (epee.kernels)
        self.linear_kernel = resolve_linear_kernel(self.config.linear_kernel, self.device, self.config.precision)
        # --precision int8: the layers' weights quantised once, here (after any pruning)
        self.int8 = Int8Weights.for_model(model) if self.config.precision == "int8" else None
        from .flops import MacCounter

        self.macs = MacCounter.for_model(model)  # non-zero weights as they are now: build engines after pruning

    def run(self, samples: Sequence[EncodedSample], policy: ExitPolicy | None = None) -> RunResult:
        """Predict every sample; results come back in input order."""
        policy = policy or self.policy
        cfg = self.config
        stats = EngineStats(num_layers=self.model.num_layers, batch_size=cfg.batch_size, samples=len(samples))
        results: list[ExitPrediction | None] = [None] * len(samples)
        order = list(range(len(samples)))
        if cfg.sort_by_length:
            order.sort(key=lambda i: samples[i].length)
        window = cfg.effective_window
        with torch.inference_mode(), precision_autocast(self.device, cfg.precision), \
                linear_kernel_mode(self.linear_kernel, self.int8):
            for start in range(0, len(order), window):
                self._run_window(samples, order[start : start + window], policy, stats, results)
        return RunResult(predictions=results, stats=stats)  # type: ignore[arg-type]

    def _run_window(
        self,
        samples: Sequence[EncodedSample],
        order: list[int],
        policy: ExitPolicy,
        stats: EngineStats,
        results: list[ExitPrediction | None],
    ) -> None:
        model, adapter, bsz = self.model, self.model.adapter, self.config.batch_size
        level: list[_Rows] = []
        for start in range(0, len(order), bsz):
            chunk = order[start : start + bsz]
            batch = collate([samples[i] for i in chunk], pad_token_id=adapter.pad_token_id).to(self.device)
            hidden = model.embed(batch)  # (N, T, H)
            n = len(chunk)
            level.append(
                _Rows(
                    hidden=hidden,
                    mask=batch.attention_mask,
                    index=torch.tensor(chunk, dtype=torch.long, device=self.device),
                    streak=torch.zeros(n, dtype=torch.long, device=self.device),
                    previous=None,
                    entity_positions=batch.entity_positions,
                    token_mask=batch.token_mask if model.config.task == "token" else None,
                )
            )
        for layer in range(model.num_layers):
            survivors: list[_Rows] = []
            for rows in _rebatch(level, bsz):
                stats.rows_per_layer[layer] += rows.size
                stats.calls_per_layer[layer] += 1
                if rows.mask is not None:
                    stats.token_slots += rows.mask.numel()
                    stats.real_tokens += int(rows.mask.sum())
                bias = adapter.attention_bias(rows.hidden, rows.mask)
                after_attention = model.head_reads_attention(layer)
                positions = None if after_attention else self._split_positions(layer, rows, policy)
                if after_attention:  # the attention sublayer, the head on it; the feed-forward below
                    stats.two_step_calls += 1
                    hidden = adapter.layer_attention(layer, rows.hidden, bias)
                    logits = model.head_logits(layer, hidden, rows.mask, rows.entity_positions)
                elif positions is None:  # the whole layer, then the head
                    hidden = adapter.layer(layer, rows.hidden, bias)
                    logits = model.head_logits(layer, hidden, rows.mask, rows.entity_positions)
                else:  # the head's positions first; the rest below, for the rows that go on
                    stats.two_step_calls += 1
                    hidden = rows.hidden  # the rows keep their inputs to this layer until then
                    keys = adapter.layer_keys(layer, hidden)
                    logits = model.head_logits_at(layer, adapter.layer_at(layer, hidden, bias, keys, positions))
                signal = exit_signal(logits, rows.token_mask)
                streak = update_streak(signal.prediction, rows.previous, rows.streak)
                reasons = policy.decide(layer + 1, signal, streak, rows.index)
                rows = replace(rows, hidden=hidden, streak=streak, previous=signal.prediction)
                exited = reasons != CONTINUE
                n_exit = int(exited.sum())
                if n_exit:
                    stats.exits_per_layer[layer] += n_exit
                    self._emit(layer + 1, rows, signal.probs, signal.entropy, reasons, exited, results, stats,
                               exit_positions=None if positions is None else positions.shape[1],
                               after_attention=after_attention)
                if n_exit == rows.size:
                    continue
                going_on = rows if n_exit == 0 else rows.take(~exited)
                if after_attention:
                    going_on = replace(going_on, hidden=adapter.layer_feed_forward(layer, going_on.hidden))
                elif positions is not None:
                    if n_exit:
                        keys = keys.take(~exited, going_on.hidden.shape[1])
                        bias = adapter.attention_bias(going_on.hidden, going_on.mask)
                    going_on = replace(going_on, hidden=adapter.layer_rest(layer, going_on.hidden, bias, keys))
                survivors.append(going_on)
            level = survivors
            if not level:
                break

    def _split_positions(self, layer: int, rows: _Rows, policy: ExitPolicy) -> torch.Tensor | None:
        """The positions to run 0-based ``layer`` at first (the exit head's), or None to run it whole:
        when splitting is off, no row can exit here, the head reads every token, or the layer
        cannot run in two steps."""
        if not (self.config.split_layers and policy.may_exit(layer + 1) and self.model.adapter.splits_layer(layer)):
            return None
        return self.model.head_positions(rows.hidden, rows.mask, rows.entity_positions)

    def _emit(
        self,
        exit_layer: int,
        rows: _Rows,
        probs: torch.Tensor,
        entropy: torch.Tensor,
        reasons: torch.Tensor,
        exited: torch.Tensor,
        results: list[ExitPrediction | None],
        stats: EngineStats,
        exit_positions: int | None = None,
        after_attention: bool = False,
    ) -> None:
        """Record the exited rows' predictions. ``exit_positions``: their exit layer ran in two
        steps, at that many positions (:meth:`_split_positions`), which their MACs count;
        ``after_attention``: they exited before its feed-forward (``head_input`` "attention")."""
        num_layers = self.model.num_layers
        index = rows.index[exited].tolist()
        n_exit = len(index)
        lengths_t = rows.mask[exited].sum(dim=1) if rows.mask is not None else torch.full((n_exit,), rows.hidden.shape[1])
        lengths = lengths_t.tolist()
        costs = self.macs.count(lengths_t, torch.full((n_exit,), exit_layer), exit_positions=exit_positions,
                                after_attention=after_attention)
        for c in costs:
            stats.macs += c.actual
            stats.dense_exit_macs += c.dense_at_exit
            stats.dense_full_macs += c.dense_full
        probs_np = probs[exited].cpu().numpy()
        entropy_l = entropy[exited].tolist()
        reason_l = reasons[exited].tolist()
        if probs.dim() == 2:
            labels = probs_np.argmax(axis=-1).tolist()
            for j, i in enumerate(index):
                results[i] = ExitPrediction(
                    label=labels[j], probs=probs_np[j], exit_layer=exit_layer, num_layers=num_layers,
                    exit_reason=REASON_NAMES[reason_l[j]], entropy=entropy_l[j], macs=costs[j].actual,
                    dense_exit_macs=costs[j].dense_at_exit, dense_full_macs=costs[j].dense_full,
                )
            return
        preds = rows.previous[exited].cpu().tolist()  # (n, T), -1 where a token is not scored
        for j, i in enumerate(index):
            k = lengths[j]
            results[i] = ExitPrediction(
                label=None, probs=probs_np[j, :k], exit_layer=exit_layer, num_layers=num_layers,
                exit_reason=REASON_NAMES[reason_l[j]], entropy=entropy_l[j], token_labels=tuple(preds[j][:k]),
                macs=costs[j].actual, dense_exit_macs=costs[j].dense_at_exit, dense_full_macs=costs[j].dense_full,
            )
