"""Statistics for comparisons: seed spread (mean ± Student-t CI), paired tests on the same test points.

Why this module exists: on small models the seed effect can exceed the effect being studied (issue 16: the
same full-rank model scored 86.9% and 93.3% with two seeds), so every comparison in the report carries

* across seeds: mean ± 95% confidence interval, ``mean ± t_{0.975, n-1} · sd / sqrt(n)``;
* between two checkpoints on the same points: McNemar's exact test on the discordant pairs (two-sided
  binomial with p = 1/2) and a paired bootstrap CI for the difference in accuracy (or attack success);
* effect sizes: the difference itself, the discordant odds ratio, Cohen's d across seeds;
* several pairs in one table: Holm-Bonferroni adjusted McNemar p-values (family-wise error at ALPHA).

scipy is only a test dependency, so the t quantile is computed here: the Student-t CDF through the
regularized incomplete beta function (continued fraction, Numerical Recipes 6.4), inverted by bisection.
Tests check every routine against scipy.stats or a literal loop.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # two-sided level of every test and interval in the report (95% intervals)


# -- Student t ---------------------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; converges for x < (a+1)/(a+b+2))."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)`` for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b  # symmetry: the fraction converges there


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: bisection on ``t_cdf`` (monotone), to ~1e-12 absolute."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_ppf: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # the bracket grows fast: df=1 at p=0.9995 needs t ~ 637
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# -- across seeds ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeanCI:
    """Mean of ``n`` values (one per seed) and its two-sided Student-t confidence interval.

    With one value the interval is undefined: ``low``/``high`` are NaN and the report says "1 seed"."""

    mean: float
    low: float
    high: float
    sd: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"89.4 ± 3.1 (n=3)"`` (percent by default); ``"86.9 (n=1)"`` without an interval."""
        if self.n < 2:
            return f"{self.mean * scale:.{digits}f} (n=1)"
        return f"{self.mean * scale:.{digits}f} ± {self.half_width * scale:.{digits}f} (n={self.n})"


def mean_ci(values: Sequence[float], level: float = 1 - ALPHA) -> MeanCI:
    """Mean ± ``t_{(1+level)/2, n-1} · sd / sqrt(n)`` with the sample sd (ddof=1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci: no values")
    mean = float(v.mean())
    if v.size < 2:
        return MeanCI(mean, math.nan, math.nan, math.nan, 1)
    sd = float(v.std(ddof=1))
    half = t_ppf((1 + level) / 2, v.size - 1) * sd / math.sqrt(v.size)
    return MeanCI(mean, mean - half, mean + half, sd, int(v.size))


def cohens_d(a: Sequence[float], b: Sequence[float]) -> float:
    """Standardized difference ``(mean(b) - mean(a)) / pooled sd`` of two groups (e.g. seeds of two variants).

    NaN when a group has one value or both have zero spread (the effect has no noise scale to be measured in)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return math.nan
    pooled = ((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2)
    return float((b.mean() - a.mean()) / math.sqrt(pooled)) if pooled > 0 else math.nan


# -- paired, on the same test points -----------------------------------------------------------------------

@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two paired binary outcomes (correct/incorrect, attack succeeded/failed).

    ``only_a``: points where only A has the outcome, ``only_b``: only B. Under H0 each discordant point is
    A-only with probability 1/2, so p is the two-sided binomial test of ``only_a`` out of ``only_a + only_b``."""

    only_a: int
    only_b: int
    p_value: float

    @property
    def odds_ratio(self) -> float:
        """``only_b / only_a``, the conditional odds ratio (effect size); +0.5 on both when one is zero."""
        a, b = (self.only_a, self.only_b) if self.only_a and self.only_b else (self.only_a + .5, self.only_b + .5)
        return b / a


def binom_two_sided_half(k: int, n: int) -> float:
    """Two-sided exact binomial p-value of ``k`` successes in ``n`` trials with p = 1/2.

    The null distribution is symmetric, so p = min(1, 2 · P(X <= min(k, n-k))). Integer arithmetic: Python's
    int/int division rounds correctly even for n in the tens of thousands (floats of 2^n would overflow)."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """McNemar's exact test for outcomes ``a`` and ``b`` on the same points (same order, same length)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: paired outcomes differ in length ({a.size} vs {b.size})")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return McNemar(only_a, only_b, binom_two_sided_half(only_a, only_a + only_b))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest p becomes
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``. Rejecting where the adjusted p < ALPHA keeps the chance of any
    false "significant" among the m tests at ALPHA (every pair of a report table is one such family)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class BootstrapCI:
    """Difference ``mean(b) - mean(a)`` on the same points and its percentile bootstrap interval."""

    diff: float
    low: float
    high: float
    resamples: int
    seed: int
    level: float = 1 - ALPHA  # each interval's own coverage (1 - ALPHA / m for m simultaneous ones)

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0.0 <= self.high


BOOT_CHUNK = 500  # resamples drawn per generator call: bounds memory at 500 x n int64 indices


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 1 - ALPHA) -> BootstrapCI:
    """Percentile bootstrap CI of ``mean(b - a)``: resample points (not models) with replacement, seeded.

    Each resample draws ``n`` indices with ``np.random.default_rng(seed).integers(0, n, n)``, in order, so a
    literal loop with the same generator reproduces it exactly (the test does)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError("paired_bootstrap: need two equally long, non-empty 1-D sequences")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, BOOT_CHUNK):
        rows = min(BOOT_CHUNK, resamples - start)
        means[start:start + rows] = d[rng.integers(0, d.size, (rows, d.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapCI(float(d.mean()), float(low), float(high), resamples, seed, level)


@dataclass(frozen=True)
class PairedComparison:
    """Everything the report's paired-test table shows for one pair of checkpoints on one set of points."""

    rate_a: float
    rate_b: float
    mcnemar: McNemar
    bootstrap: BootstrapCI

    @property
    def within_noise(self) -> bool:
        """Not significant at ALPHA and the bootstrap interval covers zero: no evidence of a difference."""
        return self.mcnemar.p_value >= ALPHA and self.bootstrap.includes_zero


def compare_paired(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0,
                   level: float = 1 - ALPHA) -> PairedComparison:
    """McNemar + paired bootstrap (interval at ``level``) for two binary outcomes on the same points."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return PairedComparison(float(a.mean()), float(b.mean()), mcnemar_exact(a, b),
                            paired_bootstrap(a, b, resamples, seed, level))
