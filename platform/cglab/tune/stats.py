"""The statistics behind a lesson's verdicts: Student-t intervals of a mean and of a difference (paired over
seeds where the variants share them, else Welch), one-sided p-values against a shifted null (what superiority,
non-inferiority and the two halves of TOST are), and Holm's correction over a family of p-values.

Pure Python: the t distribution comes from its closed form for integer degrees of freedom (Abramowitz & Stegun
26.7.3-4), which keeps scipy (it only arrives with mlflow's extras) out of the dependencies. A fractional df
(Welch) is rounded down: a slightly wider interval and larger p-values, the conservative side."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


def _df(df: float) -> int:
    return int(math.floor(df))


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with floor(df) >= 1 degrees of freedom."""
    nu = _df(df)
    if nu < 1:
        raise ValueError(f"t_cdf: df must be >= 1, got {df}")
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    th = math.atan(abs(x) / math.sqrt(nu))
    s, c2 = math.sin(th), math.cos(th) ** 2
    if nu % 2:  # odd: A = 2/pi (theta + sin theta (cos + 2/3 cos^3 + 2.4/(3.5) cos^5 + ... cos^(nu-2)))
        term = total = math.cos(th)
        for k in range(3, nu - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        a = 2 / math.pi * (th + (s * total if nu > 1 else 0.0))
    else:  # even: A = sin theta (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... cos^(nu-2))
        term = total = 1.0
        for k in range(2, nu - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        a = s * total
    return 0.5 + math.copysign(a, x) / 2


def t_quantile(p: float, df: float) -> float:
    """x with P(T <= x) = p (0 < p < 1), by bisection on t_cdf; inf below one degree of freedom."""
    if _df(df) < 1:
        return math.inf if p > 0.5 else -math.inf
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t975(df: float) -> float:
    """t(0.975, df): the half-width factor of a two-sided 95% interval."""
    return t_quantile(0.975, df)


@dataclass(frozen=True)
class Interval:
    """A mean over n values with its t-interval; lo/hi are None below two values (no spread to measure)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def covers_zero(self) -> bool:
        return self.lo is not None and self.lo <= 0.0 <= self.hi


@dataclass(frozen=True)
class Estimate:
    """A mean (or a difference of means) with its standard error and degrees of freedom; se and df are None
    below two values on a side (no spread to measure: no interval, no test)."""

    mean: float
    se: float | None
    df: float | None
    n: int

    def interval(self, level: float = 0.95) -> Interval:
        if self.se is None:
            return Interval(self.mean, None, None, self.n)
        h = t_quantile(0.5 + level / 2, self.df) * self.se if self.se > 0 else 0.0
        return Interval(self.mean, self.mean - h, self.mean + h, self.n)

    def p_above(self, bound: float) -> float | None:
        """One-sided p-value of H0: true mean <= bound against H1: true mean > bound."""
        if self.se is None:
            return None
        if self.se == 0:  # no spread: the mean is exact
            return 0.0 if self.mean > bound else 1.0
        return 1.0 - t_cdf((self.mean - bound) / self.se, self.df)

    def p_below(self, bound: float) -> float | None:
        """One-sided p-value of H0: true mean >= bound against H1: true mean < bound."""
        flipped = Estimate(-self.mean, self.se, self.df, self.n)
        return flipped.p_above(-bound)

    def scaled(self, k: float) -> Estimate:
        return Estimate(k * self.mean, None if self.se is None else abs(k) * self.se, self.df, self.n)


def estimate(xs: Sequence[float]) -> Estimate:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return Estimate(m, None, None, n)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return Estimate(m, sd / math.sqrt(n), n - 1, n)


def mean_ci(xs: Sequence[float]) -> Interval:
    """The mean of xs with its two-sided 95% t-interval."""
    return estimate(xs).interval()


def diff_estimate(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[Estimate, bool]:
    """(mean(a) - mean(b) with its standard error, paired). a, b: seed -> value. Paired over the seeds both have
    when they share at least two: a seed fixes the data order and the initialisation, so the per-seed difference
    removes the noise both variants share. Otherwise Welch's unpaired difference."""
    common = [s for s in a if s in b]
    if len(common) >= 2:
        return estimate([a[s] - b[s] for s in common]), True
    ea, eb = estimate(list(a.values())), estimate(list(b.values()))
    d = ea.mean - eb.mean
    if ea.se is None or eb.se is None:
        return Estimate(d, None, None, min(ea.n, eb.n)), False
    va, vb = ea.se**2, eb.se**2
    if va + vb == 0.0:  # no spread on either side: the difference is exact
        return Estimate(d, 0.0, min(ea.n, eb.n) - 1, min(ea.n, eb.n)), False
    df = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    return Estimate(d, math.sqrt(va + vb), df, min(ea.n, eb.n)), False


def diff_ci(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[Interval, bool]:
    """(95% interval of mean(a) - mean(b), paired): `diff_estimate`'s interval."""
    est, paired = diff_estimate(a, b)
    return est.interval(), paired


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error control without assuming independence): sorted
    ascending, the i-th of k is multiplied by k - i, and the adjusted values are made monotone (each at least
    the one before it) and capped at 1. None (a test that could not be run) is not in the family and stays
    None."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: list[float | None] = [None] * len(ps)
    k, run = len(idx), 0.0
    for rank, i in enumerate(idx):
        run = max(run, min(1.0, (k - rank) * ps[i]))
        out[i] = run
    return out
