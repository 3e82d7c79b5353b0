"""Learn then Test with fixed-sequence testing: an exit setting whose risk is at most ε with
confidence 1 - δ, for the setting chosen, not for each setting separately.

Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021, arXiv 2110.01052) turns the
choice of a setting into multiple testing: for each setting λ, H0(λ): risk(λ) > ε. A setting whose
H0 is rejected is safe; if the family-wise error rate of the rejections is at most δ, every
rejected setting, and so the fastest of them, has risk <= ε with probability >= 1 - δ. CALM
(Schuster et al. 2022, "Confident Adaptive Language Modeling", section 4) tests the settings
in a fixed order, safest first, and stops at the first H0 it cannot reject: fixed-sequence
testing controls the family-wise error at δ without dividing δ among the settings (no
Bonferroni), provided the order does not depend on the samples tested.

The risk here is a rate of per-sample 0/1 losses (a sample disagreeing with full depth, or
wrong at the exit while right at full depth), so the exact p-value of H0 is the binomial tail
P[Binom(n, ε) <= k] for k losses out of n samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

PROCEDURE = "ltt-fixed-sequence-binomial"


def binomial_p_value(losses: int, n: int, epsilon: float) -> float:
    """P[Binom(n, ε) <= losses]: the exact p-value of H0 "risk > ε" after ``losses`` in ``n``.

    Under H0 the loss count is stochastically at least Binom(n, ε), so this tail bounds the
    chance of seeing so few losses. scipy's ``binom.cdf`` where installed, else the same sum in
    log space (exact up to float rounding).
    """
    if n < 1:
        raise ValueError(f"n ({n}) must be >= 1")
    if not 0 <= losses <= n:
        raise ValueError(f"losses ({losses}) must lie in [0, n={n}]")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon ({epsilon}) must lie in (0, 1)")
    return binomial_cdf(losses, n, epsilon)


def share_lower_bound(k: int, n: int, delta: float) -> float:
    """The one-sided Clopper-Pearson lower bound of a share after ``k`` hits in ``n``: the
    smallest p with P[Binom(n, p) >= k] >= δ, so the true share is at least it with probability
    >= 1 - δ (0.0 when k is 0)."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k ({k}) <= n ({n}) and n >= 1")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta ({delta}) must lie in (0, 1)")
    if k == 0:
        return 0.0
    lo, hi = 0.0, k / n  # P[X >= k] = 1 - cdf(k - 1) rises with p; bisect where it crosses δ
    for _ in range(50):  # 2^-50 of the share: far below any δ's effect
        mid = (lo + hi) / 2
        if 1.0 - binomial_cdf(k - 1, n, mid) >= delta:
            hi = mid
        else:
            lo = mid
    return lo


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P[Binom(n, p) <= k], 0 < p < 1: scipy's ``binom.cdf`` where installed, else the same sum in
    log space (exact up to float rounding)."""
    try:
        from scipy.stats import binom
    except ImportError:  # pragma: no cover - scipy is in the project's environment
        return _binomial_cdf_log_space(k, n, p)
    return float(min(1.0, binom.cdf(k, n, p)))


def _binomial_cdf_log_space(k: int, n: int, p: float) -> float:
    i = np.arange(k + 1, dtype=np.float64)
    log_terms = (math.lgamma(n + 1) - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in i])
                 + i * math.log(p) + (n - i) * math.log1p(-p))
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


@dataclass(frozen=True)
class LttTest:
    """One setting's test, in the order tested."""

    setting: Any  # what the caller tests (a SweepPoint, a dict, an index)
    losses: int  # samples with loss 1
    risk: float  # losses / n
    p_value: float  # P[Binom(n, ε) <= losses]
    rejected: bool  # H0 "risk > ε" rejected at δ: the setting is certified
    cost: float  # lower is faster (mean exit layer); the chosen setting is the cheapest rejected one


@dataclass(frozen=True)
class LttResult:
    """What :func:`fixed_sequence_test` decided; ``chosen`` is None ("full depth") when no setting
    was certified."""

    procedure: str
    epsilon: float
    delta: float
    n: int
    tests: tuple[LttTest, ...]  # every setting tested, in order; the last one failed unless all passed
    untested: int  # settings after the first non-rejection, never tested
    chosen: LttTest | None

    @property
    def chosen_label(self) -> str:
        return "full depth" if self.chosen is None else str(self.chosen.setting)

    def to_dict(self, setting_to_dict=lambda s: s) -> dict[str, Any]:
        """JSON-ready summary: the test counts and the chosen setting (not every test)."""
        last = self.tests[-1] if self.tests else None
        return {
            "procedure": self.procedure, "epsilon": self.epsilon, "delta": self.delta, "samples_tested_on": self.n,
            "settings_tested": len(self.tests), "settings_rejected": sum(t.rejected for t in self.tests),
            "settings_untested": self.untested,
            "first_not_rejected": None if last is None or last.rejected else {
                "setting": setting_to_dict(last.setting), "risk": last.risk, "p_value": last.p_value},
            "chosen": None if self.chosen is None else {
                "setting": setting_to_dict(self.chosen.setting), "risk": self.chosen.risk,
                "p_value": self.chosen.p_value, "cost": self.chosen.cost},
        }


def fixed_sequence_test(losses: np.ndarray, epsilon: float, delta: float, settings: Sequence | None = None,
                        costs: Sequence[float] | None = None) -> LttResult:
    """Test the settings (rows of ``losses``) in order, safest first, and choose the cheapest rejected.

    ``losses`` is (S, n) of 0/1 (or bool): per setting in test order, per sample, whether the
    sample is lost under it. Row s is tested only if rows 0..s-1 were all rejected (p <= δ); the
    first row that is not rejected ends the sequence. The order must be fixed before these
    samples are looked at (e.g. learned on other samples), else the guarantee does not hold.
    ``costs`` (default: the row index, decreasing, i.e. later rows are faster) picks the chosen
    setting among the rejected ones.
    """
    matrix = np.asarray(losses)
    if matrix.ndim != 2:
        raise ValueError(f"losses must be (settings, samples), got shape {matrix.shape}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta ({delta}) must lie in (0, 1)")
    num_settings, n = matrix.shape
    if settings is None:
        settings = list(range(num_settings))
    if costs is None:
        costs = [float(num_settings - i) for i in range(num_settings)]
    if len(settings) != num_settings or len(costs) != num_settings:
        raise ValueError(f"{num_settings} rows of losses, {len(settings)} settings and {len(costs)} costs")
    if num_settings and not np.isin(matrix, (0, 1)).all():
        raise ValueError("losses must be 0/1 per sample")
    tests: list[LttTest] = []
    for s in range(num_settings):
        k = int(matrix[s].sum())
        p = binomial_p_value(k, n, epsilon)
        tests.append(LttTest(settings[s], k, k / n, p, p <= delta, float(costs[s])))
        if p > delta:
            break
    rejected = [t for t in tests if t.rejected]
    chosen = min(rejected, key=lambda t: t.cost) if rejected else None  # first of equal costs: the safer one
    return LttResult(PROCEDURE, float(epsilon), float(delta), int(n), tuple(tests), num_settings - len(tests), chosen)
