"""Random-matrix-theory statistics of one singular-value spectrum.

Conventions (SPEC "Conv weights"): a weight block is a ``rows x cols`` matrix (``rows`` = output channels),
its empirical spectral density (ESD) is over ``lambda = sigma**2 / rows``. For i.i.d. entries of variance
``v`` the nonzero eigenvalues follow Marchenko-Pastur with ratio ``y = cols / rows`` and bulk edges
``v (1 -+ sqrt(y))**2``. Training leaves structure as eigenvalues outside that bulk ("spikes") and as a
heavy power-law tail (small alpha); a randomly permuted copy of the same weights shows neither.

Every alpha comes with its KS distance, tail size, the KS critical value and a ``reliable`` flag whose rule
is in ``assess_powerlaw`` (tail >= 50 values, KS below Stephens' 5% critical value, 1 < alpha <= 8, and the
bootstrap p >= 0.1 when ``alpha_bootstrap`` asks for it); ``reason`` says which rule failed, and every NaN
alpha has one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class RMTConfig:
    """Tuning of the Marchenko-Pastur and power-law fits."""
    mp_fit_quantiles: tuple[float, float] = (0.05, 0.80)  # ESD quantile range treated as noise bulk
    tw_units: float = 3.0  # Tracy-Widom scale units above the Johnstone centring before a value is a spike
    fit_z: float = 2.0  # standard errors of the fitted variance added to the edge (finite sample)
    alpha_min_tail: int = 10  # smallest tail (values >= x_min) a power-law fit may use
    alpha_max_candidates: int = 200  # x_min candidates scanned (quantile-spaced when there are more values)
    alpha_max_points: int = 5000  # larger spectra are quantile-thinned to this many points before the fit
    # Reliability of an alpha (see ``assess_powerlaw``): tail size, KS level and a sane range.
    reliable_min_tail: int = 50  # values >= x_min; below ~50 the MLE's standard error (alpha-1)/sqrt(n) is > 15%
    ks_level: float = 0.05  # significance of the KS test of the tail against the fitted power law
    alpha_range: tuple[float, float] = (1.0, 8.0)  # (lo, hi]: alpha <= 1 is not normalisable; above 8 the
    # "tail" falls by 1e-7 over a decade, which a finite ESD cannot tell from an exponential cut-off
    alpha_bootstrap: int = 0  # > 0: Clauset's semi-parametric bootstrap p-value with that many refits (slow)
    bootstrap_min_p: float = 0.1  # Clauset et al.: the power law is ruled out when p < 0.1


@dataclass(frozen=True)
class MPFit:
    """Marchenko-Pastur fit: noise variance, bulk edges, finite-size threshold and spike count."""
    variance: float
    ratio: float
    lambda_minus: float
    lambda_plus: float
    threshold: float
    spikes: int


@dataclass(frozen=True)
class PowerLawFit:
    """Continuous power-law fit p(x) ~ x**-alpha for x >= xmin (Clauset, Shalizi, Newman 2009)."""
    alpha: float
    xmin: float
    ks: float
    n_tail: int
    ks_critical: float = float("nan")  # the KS distance above which the tail is not a power law (see assess)
    p_value: float = float("nan")  # bootstrap p-value (only with RMTConfig.alpha_bootstrap > 0)
    reliable: bool = False
    reason: str = ""  # why the fit is unreliable (or NaN); "" when reliable


def esd(svals: np.ndarray, rows: int) -> np.ndarray:
    """Eigenvalues of the ESD, ``sigma**2 / rows``, in the order given."""
    return np.asarray(svals, dtype=np.float64) ** 2 / rows


def mp_edges(ratio: float, variance: float) -> tuple[float, float]:
    """Bulk edges ``v (1 -+ sqrt(y))**2`` of the Marchenko-Pastur law."""
    r = math.sqrt(ratio)
    return variance * (1.0 - r) ** 2, variance * (1.0 + r) ** 2


def mp_density(lam: np.ndarray, ratio: float, variance: float) -> np.ndarray:
    """MP density of the *nonzero* eigenvalues (integrates to 1 over the bulk, whatever ``ratio``).

    The law of ``W^T W / rows`` has mass ``1 - 1/y`` at zero when ``y > 1``; the nonzero eigenvalues are
    those of ``W W^T / rows``, so the continuous part is renormalised by ``min(1, 1/y)``.
    """
    lo, hi = mp_edges(ratio, variance)
    lam = np.asarray(lam, dtype=np.float64)
    inside = np.clip((hi - lam) * (lam - lo), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = np.sqrt(inside) / (2.0 * math.pi * variance * ratio * lam)
    return np.where(inside > 0, dens, 0.0) / min(1.0, 1.0 / ratio)


@functools.lru_cache(maxsize=256)
def _mp_unit_quantile_table(ratio: float, points: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    """(cdf, lambda) table of the unit-variance MP law of the nonzero eigenvalues.

    The grid ``lambda = a + (b - a)(1 - cos t)/2`` clusters points at both edges, where the density has
    square-root behaviour (and a ``1/sqrt`` pole at 0 when ``ratio == 1``), so the trapezoid rule stays
    accurate; the CDF is renormalised to end exactly at 1.
    """
    lo, hi = mp_edges(ratio, 1.0)
    t = np.linspace(0.0, math.pi, points)
    lam = lo + (hi - lo) * (1.0 - np.cos(t)) / 2.0
    integrand = mp_density(lam, ratio, 1.0) * (hi - lo) * np.sin(t) / 2.0
    if ratio == 1.0:  # density ~ 1/sqrt(lam) at 0 while dlam/dt ~ t: the limit is finite, fill it
        integrand[0] = integrand[1]
    cdf = np.concatenate([[0.0], np.cumsum((integrand[1:] + integrand[:-1]) / 2.0 * np.diff(t))])
    return cdf / cdf[-1], lam


def mp_quantile(p: np.ndarray, ratio: float) -> np.ndarray:
    """Quantiles of the unit-variance MP law of the nonzero eigenvalues."""
    cdf, lam = _mp_unit_quantile_table(float(ratio))
    return np.interp(p, cdf, lam)


def _johnstone_edge(rows: int, cols: int, tw_units: float) -> float:
    """Largest-eigenvalue threshold for unit-variance noise on the ``sigma**2 / rows`` scale.

    Johnstone (2001): the top eigenvalue of ``X^T X`` for an ``n x p`` Gaussian matrix centres at
    ``mu = (sqrt(n-1) + sqrt(p))**2`` with Tracy-Widom scale ``(sqrt(n-1) + sqrt(p))(1/sqrt(n-1) + 1/sqrt(p))**(1/3)``.
    """
    n1 = math.sqrt(max(rows - 1, 1))
    p1 = math.sqrt(cols)
    mu = (n1 + p1) ** 2
    scale = (n1 + p1) * (1.0 / n1 + 1.0 / p1) ** (1.0 / 3.0)
    return (mu + tw_units * scale) / rows


def fit_marchenko_pastur(lam: np.ndarray, rows: int, cols: int, cfg: RMTConfig = RMTConfig()) -> MPFit:
    """Fit the noise variance from the bulk of the ESD and count eigenvalues above the finite-size edge.

    The variance is the least-squares slope of the empirical quantiles on the unit MP quantiles over
    ``cfg.mp_fit_quantiles``: a handful of spikes only move the top quantiles, which are left out. The
    threshold is Johnstone's Tracy-Widom edge widened by ``fit_z`` standard errors of that slope.
    """
    lam = np.sort(np.asarray(lam, dtype=np.float64))
    ratio = cols / rows
    p = (np.arange(lam.size) + 0.5) / lam.size
    sel = (p >= cfg.mp_fit_quantiles[0]) & (p <= cfg.mp_fit_quantiles[1])
    if sel.sum() < 2:
        sel = np.ones_like(sel)
    q = mp_quantile(p[sel], ratio)
    variance = float(np.dot(lam[sel], q) / np.dot(q, q))
    lo, hi = mp_edges(ratio, variance)
    widen = 1.0 + cfg.fit_z / math.sqrt(sel.sum())
    threshold = variance * _johnstone_edge(rows, cols, cfg.tw_units) * widen
    return MPFit(variance, ratio, lo, hi, threshold, int((lam > threshold).sum()))


def _thin_sorted(x: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` points of the sorted array ``x`` at evenly spaced ranks (keeps the distribution)."""
    if x.size <= n:
        return x
    return x[np.round(np.linspace(0, x.size - 1, n)).astype(np.int64)]


def powerlaw_mle(x: np.ndarray, xmin: float) -> float:
    """Continuous MLE ``alpha = 1 + n / sum(ln(x_i / xmin))`` over ``x_i >= xmin``."""
    tail = np.asarray(x, dtype=np.float64)
    tail = tail[tail >= xmin]
    return 1.0 + tail.size / float(np.sum(np.log(tail / xmin)))


def fit_powerlaw(x: np.ndarray, cfg: RMTConfig = RMTConfig()) -> PowerLawFit:
    """Power-law alpha by MLE with ``x_min`` minimising the KS distance (Clauset, Shalizi, Newman 2009),
    with its reliability (``assess_powerlaw``). Non-positive values are dropped; larger spectra are
    quantile-thinned to ``cfg.alpha_max_points`` first."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = _thin_sorted(x[x > 0], cfg.alpha_max_points)
    if x.size < cfg.alpha_min_tail + 1:
        return PowerLawFit(float("nan"), float("nan"), float("nan"), 0,
                           reason=f"too few positive values ({x.size} < {cfg.alpha_min_tail + 1}) to fit a tail")
    fit = _scan_powerlaw(x, cfg.alpha_min_tail, cfg.alpha_max_candidates)
    if cfg.alpha_bootstrap > 0 and np.isfinite(fit.alpha):
        fit = replace(fit, p_value=bootstrap_p_value(x, fit, cfg))
    return assess_powerlaw(fit, cfg)


def _scan_powerlaw(x: np.ndarray, min_tail: int, max_candidates: int) -> PowerLawFit:
    """The fit on sorted positive ``x``: all ``x_min`` candidates scored at once on a ``[candidates, points]``
    grid (row ``c`` holds the tail from sorted index ``c``, masked below it, its fitted CDF and both sides
    of the empirical CDF)."""
    n = x.size
    cand = np.unique(np.round(np.linspace(0, n - min_tail, min(max_candidates, n - min_tail + 1))))
    cand = cand.astype(np.int64)
    logx = np.log(x)
    suffix = np.concatenate([np.cumsum(logx[::-1])[::-1], [0.0]])  # sum of log x[c:]
    n_tail = n - cand
    with np.errstate(divide="ignore"):
        alpha = 1.0 + n_tail / (suffix[cand] - n_tail * logx[cand])
    j = np.arange(n)[None, :]
    rank = j - cand[:, None]  # position inside the tail, negative below x_min
    mask = rank >= 0
    with np.errstate(over="ignore", invalid="ignore"):
        model = 1.0 - np.exp((1.0 - alpha[:, None]) * (logx[None, :] - logx[cand][:, None]))
    upper = np.abs(model - (rank + 1) / n_tail[:, None])
    lower = np.abs(model - rank / n_tail[:, None])
    ks = np.where(mask, np.maximum(upper, lower), 0.0).max(axis=1)
    ks = np.where(np.isfinite(alpha), ks, np.inf)
    best = int(np.argmin(ks))
    return PowerLawFit(float(alpha[best]), float(x[cand[best]]), float(ks[best]), int(n_tail[best]))


# Stephens (1974), KS test of an exponential with estimated scale (log(x / x_min) of a power-law tail is
# exponential with rate alpha - 1): reject when (D - 0.2/n)(sqrt(n) + 0.26 + 0.5/sqrt(n)) exceeds these.
_STEPHENS_EXP = {0.15: 0.926, 0.10: 0.990, 0.05: 1.094, 0.025: 1.190, 0.01: 1.308}


def ks_critical(n_tail: int, level: float = 0.05) -> float:
    """KS distance above which a tail of ``n_tail`` values is not a power law at ``level``.

    ``x_min`` is also chosen to minimise the distance, which makes observed distances smaller than this
    test assumes: a fit above the critical value is certainly poor; below it, use ``alpha_bootstrap``
    (Clauset's p-value) to be sure."""
    if level not in _STEPHENS_EXP:
        raise ValueError(f"ks_level={level}: use one of {sorted(_STEPHENS_EXP)}")
    r = math.sqrt(n_tail)
    return _STEPHENS_EXP[level] / (r + 0.26 + 0.5 / r) + 0.2 / n_tail


def assess_powerlaw(fit: PowerLawFit, cfg: RMTConfig = RMTConfig()) -> PowerLawFit:
    """``reliable`` iff every rule holds, else ``reason`` lists the failures (``;``-separated):

    * ``n_tail >= cfg.reliable_min_tail`` (50);
    * ``ks <= ks_critical(n_tail, cfg.ks_level)`` (Stephens' 5% value for a fitted exponential);
    * ``cfg.alpha_range[0] < alpha <= cfg.alpha_range[1]`` ((1, 8]);
    * with ``cfg.alpha_bootstrap > 0``: bootstrap ``p_value >= cfg.bootstrap_min_p`` (0.1).
    """
    if not np.isfinite(fit.alpha):
        return replace(fit, reliable=False, reason=fit.reason or "no finite alpha (all tail values equal)")
    crit = ks_critical(fit.n_tail, cfg.ks_level)
    lo, hi = cfg.alpha_range
    reasons = []
    if fit.n_tail < cfg.reliable_min_tail:
        reasons.append(f"tail of {fit.n_tail} values < {cfg.reliable_min_tail}")
    if fit.ks > crit:
        reasons.append(f"KS {fit.ks:.3g} > critical {crit:.3g} at {cfg.ks_level}")
    if not lo < fit.alpha <= hi:
        reasons.append(f"alpha {fit.alpha:.3g} outside ({lo:g}, {hi:g}]")
    if cfg.alpha_bootstrap > 0 and not fit.p_value >= cfg.bootstrap_min_p:
        reasons.append(f"bootstrap p {fit.p_value:.3g} < {cfg.bootstrap_min_p}")
    return replace(fit, ks_critical=crit, reliable=not reasons, reason="; ".join(reasons))


def bootstrap_p_value(x: np.ndarray, fit: PowerLawFit, cfg: RMTConfig) -> float:
    """Clauset et al. (2009) section 4.1: the share of synthetic samples whose refitted KS distance is at
    least the observed one. Each synthetic sample has ``x.size`` values: with probability ``n_tail / n``
    a draw from the fitted power law above ``x_min``, else a value resampled from the data below it."""
    rng = np.random.default_rng(cfg.alpha_bootstrap)
    body = x[x < fit.xmin]
    n = x.size
    worse = 0
    for _ in range(cfg.alpha_bootstrap):
        n_tail = rng.binomial(n, fit.n_tail / n) if body.size else n
        tail = fit.xmin * (1.0 - rng.random(n_tail)) ** (-1.0 / (fit.alpha - 1.0))
        sample = np.sort(np.concatenate([tail, rng.choice(body, n - n_tail) if body.size else tail[:0]]))
        worse += _scan_powerlaw(sample, cfg.alpha_min_tail, cfg.alpha_max_candidates).ks >= fit.ks
    return worse / cfg.alpha_bootstrap


def stable_rank(svals: np.ndarray) -> float:
    """``||W||_F**2 / ||W||_2**2``."""
    s = np.asarray(svals, dtype=np.float64)
    return float(np.sum(s**2) / np.max(s) ** 2)


def effective_rank(svals: np.ndarray) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p = sigma / sum(sigma)`` (0 log 0 = 0)."""
    s = np.asarray(svals, dtype=np.float64)
    p = s[s > 0] / np.sum(s)
    return float(np.exp(-np.sum(p * np.log(p))))


def spectrum_stats(svals: np.ndarray, rows: int, cols: int, cfg: RMTConfig = RMTConfig()) -> dict:
    """All scalar statistics of one spectrum (``rows x cols`` block; ``svals`` with multiplicity)."""
    s = np.asarray(svals, dtype=np.float64)
    lam = esd(s, rows)
    mp = fit_marchenko_pastur(lam, rows, cols, cfg)
    pl = asdict(fit_powerlaw(lam, cfg))
    if cfg.alpha_bootstrap == 0:  # no bootstrap, no p-value: leave the column out rather than fill it with NaN
        del pl["p_value"]
    return {
        "n_values": int(s.size),
        "spectral_norm": float(np.max(s)),
        "frobenius_norm": float(np.sqrt(np.sum(s**2))),
        "stable_rank": stable_rank(s),
        "effective_rank": effective_rank(s),
        **{f"mp_{k}": v for k, v in asdict(mp).items()},
        **{f"alpha_{k}" if k != "alpha" else "alpha": v for k, v in pl.items()},
    }
