"""The numbers of a run report: every count and average the page shows, tallied from one run's
output rows batch by batch (:class:`RunTally`) into one :class:`RunSummary`. No HTML, no files:
:mod:`transforms.report` renders a summary and reads the rows."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from epee.histogram import ExitHistogram

from .audit import AuditTally
from .records import stats_label

FINE_SCORE_BINS = 1000  # the counts kept: the median is given to within 1/1000


@dataclass(frozen=True)
class LabelRow:
    label: str
    count: int
    mean_exit_layer: float
    speedup: float  # num_layers / mean exit layer of this label's records


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: could not be checked
    detail: str


@dataclass(frozen=True)
class AuditSummary:
    """The audit (``--audit_fraction``) over the run's ``exit_stats`` rows (streaming: every window)."""

    fraction: float
    audited: int
    agreeing: int
    agreement: float | None  # None: no record was audited
    low: float  # Clopper-Pearson 95% interval of the agreement
    high: float
    per_layer: tuple[tuple[int, int, int], ...]  # (exit layer, audited, agreeing)
    per_label: tuple[tuple[str, int, int], ...]  # (full-depth label, audited, agreeing)
    macs: int  # of the full-depth reruns
    compute_share: float | None  # audit MACs / (run MACs + audit MACs)
    status: str  # failed if any row failed, passed if every row passed, else unchecked
    windows_failed: int  # rows (streaming: windows) whose audit failed


@dataclass(frozen=True)
class RunSummary:
    """Every number the page shows, computed once from the rows (tests read it directly too)."""

    run_ids: tuple[str, ...]
    model_ids: tuple[str, ...]
    tasks: tuple[str, ...]
    predictions: int
    dead_letters: int
    records_in: int  # predictions + dead letters
    num_layers: int
    exits_per_layer: tuple[int, ...]  # index i: records that exited at layer i + 1
    mean_exit_layer: float | None  # None when there are no predictions
    layer_speedup: float | None
    labels: tuple[LabelRow, ...]  # most frequent first
    exit_reasons: tuple[tuple[str, int], ...]
    score_bins: tuple[int, ...]  # FINE_SCORE_BINS counts over [0, 1]
    dead_by_reason: tuple[tuple[str, str, int], ...]  # (stage, error_type, count), most frequent first
    wall_seconds: float | None
    wall_source: str  # where wall_seconds came from
    records_per_second: float | None
    timings: tuple[tuple[str, float], ...]  # numeric entries of the manifest's "timings"
    checks: tuple[Check, ...]
    macs: tuple[int, int, int] | None = None  # (run, dense at the exits, dense full depth); None: not recorded
    audit: AuditSummary | None = None  # None: the run had no audit


# -- numbers ---------------------------------------------------------------------------------------
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class RunTally:
    """Running counts over one run's output rows, fed in batches: what it holds grows with the
    distinct labels, layers, ids and error types, never with the number of rows, so a report on a
    run of millions of records takes the memory of one batch. Scores are kept as a histogram of
    ``FINE_SCORE_BINS`` bins over [0, 1] (they are probabilities; a value outside is clamped)."""

    def __init__(self) -> None:
        self.predictions = 0
        self.dead_letters = 0
        self.ids: dict[str, set[str]] = {"run_id": set(), "model_id": set(), "task": set()}
        self.exits = ExitHistogram()
        self.num_layers = 0
        self.by_label: dict[str, ExitHistogram] = {}  # the exits of each label's records
        self.reasons: Counter[str] = Counter()
        self.fine_scores = [0] * FINE_SCORE_BINS
        self.dead: Counter[tuple[str, str]] = Counter()
        self.macs = [0, 0, 0]  # run, dense at the exits, dense full depth
        self.stats_records: int | None = None
        self.stats_walls: list[float] = []
        self.audit = AuditTally()
        self.audit_fraction = 0.0
        self.audit_statuses: Counter[str] = Counter()
        self.stats_macs = 0

    def _ids(self, row: dict) -> None:
        for key, seen in self.ids.items():
            if row.get(key) not in (None, ""):
                seen.add(str(row[key]))

    def add_predictions(self, rows: Iterable[dict]) -> "RunTally":
        for r in rows:
            self.predictions += 1
            self._ids(r)
            layer = int(r["exit_layer"])
            self.exits.add(layer)
            self.num_layers = max(self.num_layers, layer, int(r.get("num_layers") or 0))
            self.by_label.setdefault(stats_label(r.get("label"), r.get("event_spans")), ExitHistogram()).add(layer)
            self.reasons[str(r.get("exit_reason"))] += 1
            score = _number(r.get("score"))
            if score is not None:
                self.fine_scores[min(FINE_SCORE_BINS - 1, max(0, int(score * FINE_SCORE_BINS)))] += 1
            for i, k in enumerate(("macs", "dense_exit_macs", "dense_full_macs")):
                self.macs[i] += int(r.get(k) or 0)
        return self

    def add_dead_letters(self, rows: Iterable[dict]) -> "RunTally":
        for d in rows:
            self.dead_letters += 1
            self._ids(d)
            self.dead[(str(d.get("stage")), str(d.get("error_type")))] += 1
        return self

    def add_exit_stats(self, rows: Iterable[dict]) -> "RunTally":
        for s in rows:
            self._ids(s)
            self.num_layers = max(self.num_layers, int(s.get("num_layers") or 0))
            if s.get("records") is not None:
                self.stats_records = (self.stats_records or 0) + int(s["records"])
            wall = _number(s.get("wall_seconds"))
            if wall is not None:
                self.stats_walls.append(wall)
            fraction = _number(s.get("audit_fraction")) or 0.0
            if fraction > 0:
                self.audit_fraction = max(self.audit_fraction, fraction)
                self.audit.add_row(s)
                self.audit_statuses[str(s.get("audit_status"))] += 1
                self.stats_macs += int(s.get("macs") or 0)
        return self

    def _audit_summary(self) -> AuditSummary | None:
        if self.audit_fraction <= 0:
            return None
        a, statuses = self.audit, self.audit_statuses
        status = ("failed" if statuses["failed"] else "passed" if statuses["passed"] == sum(statuses.values())
                  else "unchecked")
        low, high = a.interval()
        return AuditSummary(
            fraction=self.audit_fraction, audited=a.audited, agreeing=a.agreeing, agreement=a.agreement, low=low, high=high,
            per_layer=tuple((k, n, g) for k, (n, g) in sorted(a.per_layer.items())),
            per_label=tuple((k, n, g) for k, (n, g) in sorted(a.per_label.items(), key=lambda kv: (-kv[1][0], kv[0]))),
            macs=a.macs, compute_share=a.compute_share(self.stats_macs), status=status, windows_failed=statuses["failed"])

    def summary(self, manifest: dict | None = None) -> RunSummary:
        """Of ``manifest`` (optional) only ``run_id``, ``model_id``, ``task``, ``records_in`` (top
        level or under ``counts``) and the numeric entries of ``timings`` (``wall_seconds`` among
        them) are used, each only when present."""
        manifest = manifest if isinstance(manifest, dict) else {}
        n_pred, n_dead = self.predictions, self.dead_letters

        def ids(key: str) -> tuple[str, ...]:
            found = tuple(sorted(self.ids[key]))
            extra = manifest.get(key)
            return found if found or not isinstance(extra, str) else (extra,)

        num_layers = self.num_layers
        exits = tuple(self.exits.merge(ExitHistogram.of_depth(num_layers)).counts)
        mean = self.exits.mean_exit_layer if n_pred else None
        labels = sorted((LabelRow(k, h.samples, h.mean_exit_layer, h.speedup(num_layers)) for k, h in self.by_label.items()),
                        key=lambda row: (-row.count, row.label))
        reasons = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        dead = sorted(self.dead.items(), key=lambda kv: (-kv[1], kv[0]))

        timings_doc = manifest.get("timings") if isinstance(manifest.get("timings"), dict) else {}
        timings = tuple((str(k), v) for k, v in ((k, _number(v)) for k, v in timings_doc.items()) if v is not None)
        wall, source = _number(timings_doc.get("wall_seconds")), "manifest timings (whole run)"
        if wall is None:
            wall = max(self.stats_walls) if self.stats_walls else None
            source = "exit statistics (pipeline start until the statistics were computed)" if wall is not None else "not recorded"
        records_in = n_pred + n_dead
        rate = records_in / wall if wall and wall > 0 else None
        macs = tuple(self.macs) if self.macs[2] > 0 else None

        checks = []
        counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
        counted = manifest.get("records_in", counts.get("records_in"))
        if isinstance(counted, int) and not isinstance(counted, bool):
            checks.append(Check("records in = predictions + dead letters", counted == records_in,
                                f"{counted} read; {n_pred} + {n_dead} = {records_in} written"))
        else:
            checks.append(Check("records in = predictions + dead letters", None,
                                f"{n_pred} + {n_dead} = {records_in}; the manifest gives no independent count of records read"))
        if self.stats_records is not None:
            checks.append(Check("exit statistics count every prediction", self.stats_records == n_pred,
                                f"{self.stats_records} in exit statistics, {n_pred} predictions"))
        else:
            checks.append(Check("exit statistics count every prediction", None, "no exit statistics found"))
        run_ids = ids("run_id")
        checks.append(Check("outputs hold one run", len(run_ids) <= 1, f"{len(run_ids)} run id(s) in the outputs"))

        return RunSummary(
            run_ids=run_ids, model_ids=ids("model_id"), tasks=ids("task"), predictions=n_pred, dead_letters=n_dead,
            records_in=records_in, num_layers=num_layers, exits_per_layer=exits, mean_exit_layer=mean,
            layer_speedup=self.exits.speedup(num_layers) if n_pred else None, labels=tuple(labels), exit_reasons=tuple(reasons),
            score_bins=tuple(self.fine_scores), dead_by_reason=tuple((s, e, c) for (s, e), c in dead),
            wall_seconds=wall, wall_source=source, records_per_second=rate, timings=timings, checks=tuple(checks),
            macs=macs, audit=self._audit_summary(),
        )


def summarize_rows(predictions: Iterable[dict], dead_letters: Iterable[dict], exit_stats: Iterable[dict],
                   manifest: dict | None = None) -> RunSummary:
    """Count and average the rows of one run's outputs (see :class:`RunTally`)."""
    return (RunTally().add_predictions(predictions).add_dead_letters(dead_letters).add_exit_stats(exit_stats)
            .summary(manifest))


def score_median(bins: tuple[int, ...]) -> float | None:
    """The lower edge of the histogram bin holding the median (the upper one for an even count)."""
    n = sum(bins)
    if not n:
        return None
    seen = 0
    for i, c in enumerate(bins):
        seen += c
        if seen > n // 2:
            return i / len(bins)
    return None  # not reached
