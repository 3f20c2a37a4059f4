"""evaluate.stats against independent references: scipy.stats and literal loops."""
from __future__ import annotations

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from rankshard.evaluate import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 100, 1000])
@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.975, 0.995, 0.9995, 0.025, 0.001])
def test_t_ppf_matches_scipy(p, df):
    assert stats.t_ppf(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 0.5, 0.99), (1.5, 3.0, 0.01),
                                   (50.0, 0.5, 0.5)])
def test_betainc_matches_scipy(a, b, x):
    from scipy.special import betainc
    assert stats.betainc(a, b, x) == pytest.approx(betainc(a, b, x), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("values", [[0.869, 0.933], [0.91, 0.88, 0.93], [0.5, 0.52, 0.49, 0.51, 0.55]])
def test_mean_ci_matches_scipy_t_interval(values):
    ci = stats.mean_ci(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-9)
    assert ci.mean == pytest.approx(np.mean(values)) and ci.n == len(values)


def test_mean_ci_single_value_has_no_interval():
    ci = stats.mean_ci([0.7])
    assert ci.n == 1 and math.isnan(ci.low) and ci.format() == "70.0 (n=1)"
    with pytest.raises(ValueError):
        stats.mean_ci([])


@pytest.mark.parametrize("k,n", [(0, 0), (6, 22), (16, 22), (0, 5), (5, 5), (50, 120), (3, 1), (700, 1500)])
def test_binomial_p_matches_scipy_binomtest(k, n):
    if k > n:
        k = n
    ref = 1.0 if n == 0 else scipy_stats.binomtest(k, n, 0.5).pvalue
    assert stats.binom_two_sided_half(k, n) == pytest.approx(ref, rel=1e-10, abs=1e-300)


def test_mcnemar_counts_discordant_pairs_and_matches_binomtest():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.8
    b = a.copy()
    flip = rng.choice(400, 30, replace=False)
    b[flip] = ~b[flip]
    res = stats.mcnemar_exact(a, b)
    assert res.only_a == int(sum(x and not y for x, y in zip(a, b)))
    assert res.only_b == int(sum(y and not x for x, y in zip(a, b)))
    ref = scipy_stats.binomtest(res.only_a, res.only_a + res.only_b, 0.5).pvalue
    assert res.p_value == pytest.approx(ref, rel=1e-10)
    # issue 16's hand computation: 16 vs 6 discordant attacks, p ~ 0.05
    assert stats.binom_two_sided_half(16, 22) == pytest.approx(0.0525, abs=5e-4)


def test_mcnemar_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        stats.mcnemar_exact([True], [True, False])


def test_paired_bootstrap_equals_literal_loop():
    rng = np.random.default_rng(3)
    a, b = rng.random(157) < 0.7, rng.random(157) < 0.75
    res = stats.paired_bootstrap(a, b, resamples=1234, seed=7)
    gen = np.random.default_rng(7)
    means = []
    for _ in range(1234):  # literally: draw n indices with replacement, mean difference of the resample
        idx = gen.integers(0, 157, 157)
        means.append(sum(float(b[i]) - float(a[i]) for i in idx) / 157)
    assert res.low == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert res.high == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    assert res.diff == pytest.approx(b.mean() - a.mean())


def test_paired_bootstrap_guarantees():
    same = np.ones(50, bool)
    res = stats.paired_bootstrap(same, same, 200)
    assert res.diff == res.low == res.high == 0.0 and res.includes_zero
    far = stats.paired_bootstrap(np.zeros(200), np.ones(200), 200)
    assert not far.includes_zero
    assert stats.paired_bootstrap([0, 1, 1], [1, 1, 0], 300, seed=2) == stats.paired_bootstrap([0, 1, 1], [1, 1, 0], 300, seed=2)


def test_compare_paired_within_noise():
    a = np.array([True] * 80 + [False] * 20)
    b = a.copy()
    b[:2] = False
    assert stats.compare_paired(a, b, 500).within_noise
    c = np.zeros(100, bool)
    assert not stats.compare_paired(a, c, 500).within_noise


def test_cohens_d_matches_formula():
    a, b = [0.86, 0.90, 0.88], [0.91, 0.94, 0.95]
    pooled = math.sqrt((np.var(a, ddof=1) * 2 + np.var(b, ddof=1) * 2) / 4)
    assert stats.cohens_d(a, b) == pytest.approx((np.mean(b) - np.mean(a)) / pooled)
    assert math.isnan(stats.cohens_d([1.0], b))


def _holm_rejects(p: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure, literally: walk the p-values up from the smallest, reject while
    p_(j) <= alpha / (m - j + 1), stop at the first that is not."""
    m, rejected = len(p), [False] * len(p)
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        if p[i] > alpha / (m - j):
            break
        rejected[i] = True
    return rejected


def test_holm_adjusted_p_values():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.3]) == [0.3] and stats.holm([]) == []
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = list(rng.random(int(rng.integers(1, 8))) ** 3)
        adjusted = stats.holm(p)
        assert all(a >= q for a, q in zip(adjusted, p)) and max(adjusted) <= 1
        for alpha in (0.01, 0.05, 0.1):  # adjusted p < alpha exactly where the procedure rejects at alpha
            assert [a <= alpha for a in adjusted] == _holm_rejects(p, alpha)
