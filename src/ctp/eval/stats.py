"""Uncertainty of what the evaluators measure: confidence intervals and the recovered share of a gap.

Pure functions of per-window (or per-item) scores. Windows are the sample:
tokens inside one window are correlated, windows of a split are close to
independent, so intervals are over windows, not tokens.

The **recovered share** of the compression gap is the paper's question in one
number: with mean per-token NLLs of the full model ``N_full``, the compressed
model ``N_none`` and the compressed model with a prompt ``N_prompt`` on the same
windows, ``(N_none - N_prompt) / (N_none - N_full)``; 0 means the prompt won
nothing back, 1 that it reached the full model (more than 1: better than the
full model). Its interval comes from a paired bootstrap over windows.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def mean_stderr(scores: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample (n-1) standard deviation; None when n < 2."""
    n = len(scores)
    if n < 2:
        return None
    mu = sum(scores) / n
    var = sum((s - mu) ** 2 for s in scores) / (n - 1)
    return math.sqrt(var / n)


def mean_ci(scores: Sequence[float]) -> tuple[float, float, float]:
    """(standard error, low, high) of the mean of ``scores`` at 95% (a t interval); a point when n < 2."""
    mu = sum(scores) / max(1, len(scores))
    se = mean_stderr(scores)
    if se is None:
        return 0.0, mu, mu
    half = t95(len(scores) - 1) * se
    return se, mu - half, mu + half


def recovered_share(none: Sequence[float], prompt: Sequence[float], full: Sequence[float],
                    resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(share, low, high): the recovered share of the gap and its 95% paired-bootstrap interval over windows.

    The three sequences are per-window mean NLLs of the same windows, in the
    same order. Returns NaNs when the lengths differ or there is no gap.
    """
    n = len(none)
    if n == 0 or len(prompt) != n or len(full) != n:
        return math.nan, math.nan, math.nan

    def share(idx) -> float:
        a = sum(none[i] for i in idx)
        gap = a - sum(full[i] for i in idx)
        return (a - sum(prompt[i] for i in idx)) / gap if gap > 0 else math.nan

    point = share(range(n))
    if n < 2 or math.isnan(point):
        return point, point, point
    rng = random.Random(seed)
    draws = sorted(s for s in (share([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
                   if not math.isnan(s))
    if not draws:
        return point, math.nan, math.nan
    return point, draws[int(0.025 * (len(draws) - 1))], draws[int(math.ceil(0.975 * (len(draws) - 1)))]


def differs(a: float, a_se: float | None, b: float, b_se: float | None) -> bool:
    """Whether two independent estimates differ by at least two standard errors of their difference."""
    if a_se is None or b_se is None:
        return False
    return abs(a - b) >= 2 * math.sqrt(a_se ** 2 + b_se ** 2)
