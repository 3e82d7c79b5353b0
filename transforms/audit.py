"""The nightly audit (``--audit_fraction``, issue 33): a keyed sample of records also run at full depth.

Early exit promises to predict what full depth would; on an archive nobody calibrated on, only a
comparison on that archive can say whether it does. A deterministic sample of the records is run
a second time with no exit (policy "none") and each audited record counts as agreeing when its
exit prediction is the full-depth one: the same label (sequence, relation, image) or the same set
of spans (token). The sample is drawn by a keyed hash of the record id, so a rerun on the same
records audits the same ones; with ``--pseudonymize_ids`` the key is the pseudonym key, so who
knows the ids but not the key cannot tell which records were audited.

No Beam here: the handler draws and compares (:mod:`transforms.handler`), the exit statistics and
the run report tally (:class:`AuditTally`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from epee.ltt import binomial_cdf

# the sample's key when ids are not pseudonymised: fixed, so every run of every version audits the same records
AUDIT_SALT = b"epee-beam audit sample v1"
# with the pseudonym key, a message prefix: the draw is not the record's published pseudonym
_KEYED_PREFIX = b"audit\x00"


def audit_draw(record_id: str, key: bytes | None = None) -> float:
    """A record's draw in [0, 1): the first 64 bits of HMAC-SHA256(key, id) over 2^64 (``key``:
    the pseudonym key, else :data:`AUDIT_SALT`). A record is audited iff its draw < the fraction,
    so a larger fraction audits a superset of the records a smaller one does."""
    message = record_id.encode("utf-8", "surrogatepass")
    if key is None:
        digest = hmac.new(AUDIT_SALT, message, hashlib.sha256).digest()
    else:
        digest = hmac.new(key, _KEYED_PREFIX + message, hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_audited(record_id: str, fraction: float, key: bytes | None = None) -> bool:
    return fraction > 0 and audit_draw(record_id, key) < fraction


# -- Clopper-Pearson interval ----------------------------------------------------------------------
def _bisect(f, target: float, increasing: bool) -> float:
    """The p in (0, 1) where the monotone ``f(p)`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return (lo + hi) / 2


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided binomial interval: the lower bound is the rate at which
    P[X >= k] = (1-c)/2, the upper the rate at which P[X <= k] = (1-c)/2 (the binomial tails of
    :func:`epee.ltt.binomial_cdf`, inverted). It covers the true rate with probability >=
    ``confidence`` whatever it is; with no trials it is [0, 1]."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes ({successes}) must lie in [0, trials ({trials})]")
    alpha = 1.0 - confidence
    k, n = successes, trials
    low = 0.0 if k == 0 else _bisect(lambda p: 1.0 - binomial_cdf(k - 1, n, p), alpha / 2, increasing=True)
    high = 1.0 if k == n else _bisect(lambda p: binomial_cdf(k, n, p), alpha / 2, increasing=False)
    return low, high


# -- tallies ---------------------------------------------------------------------------------------
@dataclass
class AuditTally:
    """Audited and agreeing records, overall, per exit layer and per label, and the audit's MACs.
    Merged across bundles (the exit statistics' combiner) and across windows (the run report)."""

    audited: int = 0
    agreeing: int = 0
    macs: int = 0  # multiply-adds the audited records ran after their exit, to the last layer
    per_layer: dict[int, list[int]] = field(default_factory=dict)  # exit layer -> [audited, agreeing]
    per_label: dict[str, list[int]] = field(default_factory=dict)  # full-depth label -> [audited, agreeing]

    def add(self, exit_layer: int, label: str, agrees: bool, macs: int) -> "AuditTally":
        self.audited += 1
        self.agreeing += int(agrees)
        self.macs += int(macs)
        for table, key in ((self.per_layer, int(exit_layer)), (self.per_label, str(label))):
            counts = table.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += int(agrees)
        return self

    def merge(self, other: "AuditTally") -> "AuditTally":
        self.audited += other.audited
        self.agreeing += other.agreeing
        self.macs += other.macs
        for mine, theirs in ((self.per_layer, other.per_layer), (self.per_label, other.per_label)):
            for key, (n, k) in theirs.items():
                counts = mine.setdefault(key, [0, 0])
                counts[0] += n
                counts[1] += k
        return self

    def add_row(self, row: dict) -> "AuditTally":
        """Adds an ``exit_stats`` row's audit columns (:meth:`columns`)."""
        self.audited += int(row.get("audited_records") or 0)
        self.agreeing += int(row.get("audit_agreeing") or 0)
        self.macs += int(row.get("audit_macs") or 0)
        for col, table, key in (("audit_per_layer", self.per_layer, "exit_layer"), ("audit_per_label", self.per_label, "label")):
            for r in row.get(col) or []:
                counts = table.setdefault(int(r[key]) if key == "exit_layer" else str(r[key]), [0, 0])
                counts[0] += int(r["audited"])
                counts[1] += int(r["agreeing"])
        return self

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.audited if self.audited else None

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return clopper_pearson(self.agreeing, self.audited, confidence)

    def status(self, fraction: float, min_agreement: float | None, confidence: float = 0.95) -> str:
        """``off`` (no audit), ``unchecked`` (no --min_agreement), else ``failed`` when the lower
        confidence bound is below it (no audited record: the bound is 0) and ``passed``."""
        if fraction <= 0:
            return "off"
        if min_agreement is None:
            return "unchecked"
        return "failed" if self.interval(confidence)[0] < min_agreement else "passed"

    def compute_share(self, run_macs: int) -> float | None:
        """Audit MACs / (run MACs + audit MACs): the share of the job's compute the audit took."""
        total = run_macs + self.macs
        return self.macs / total if total > 0 else None

    def columns(self, fraction: float, min_agreement: float | None, run_macs: int, confidence: float = 0.95) -> dict:
        """The ``exit_stats`` audit columns (transforms.records.ExitStats)."""
        on = fraction > 0
        low, high = self.interval(confidence) if on else (None, None)
        return dict(
            audit_fraction=float(fraction), audited_records=self.audited, audit_agreeing=self.agreeing,
            audit_agreement=self.agreement, audit_agreement_low=low, audit_agreement_high=high,
            audit_per_layer=[{"exit_layer": k, "audited": n, "agreeing": a, "agreement": a / n}
                             for k, (n, a) in sorted(self.per_layer.items())],
            audit_per_label=[{"label": k, "audited": n, "agreeing": a, "agreement": a / n}
                             for k, (n, a) in sorted(self.per_label.items())],
            audit_macs=self.macs, audit_compute_share=self.compute_share(run_macs) if on else None,
            audit_status=self.status(fraction, min_agreement, confidence),
        )
