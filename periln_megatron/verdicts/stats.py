"""The statistics the verdicts use, in plain Python (the package does not depend on scipy): the F
distribution through the regularized incomplete beta function, the power of a variance-ratio test, a
pooled standard deviation, an exact permutation rank test, and least-squares R^2."""

from __future__ import annotations

import itertools
import math
import statistics

LEVEL = 0.05   # a verdict is "shown" (or "contradicted") only at a p-value of at most this
POWER = 0.8    # the power the seeds-needed figure is computed for
MAX_SEEDS = 1000


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return math.exp(log_front) * h / a


def f_cdf(f: float, d1: float, d2: float) -> float:
    """P(F <= f) for the F distribution with (d1, d2) degrees of freedom."""
    if f <= 0:
        return 0.0
    if math.isinf(f):
        return 1.0
    return betainc(d1 / 2, d2 / 2, d1 * f / (d1 * f + d2))


def f_sf(f: float, d1: float, d2: float) -> float:
    """P(F > f), computed without cancellation for large f."""
    if f <= 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return betainc(d2 / 2, d1 / 2, d2 / (d1 * f + d2))


def f_ppf(q: float, d1: float, d2: float) -> float:
    """The f with P(F <= f) = q (bisection on the log scale)."""
    lo, hi = 1e-12, 1.0
    while f_cdf(hi, d1, d2) < q:
        hi *= 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if f_cdf(mid, d1, d2) < q:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-12:
            break
    return math.sqrt(lo * hi)


def variance_ratio_power(ratio: float, n: int, level: float = LEVEL) -> float:
    """The power of the one-sided F-test at `level` with n values per group, when the true variance
    ratio is `ratio` (s_a^2 / s_b^2 is then ratio x an F(n-1, n-1) variable)."""
    df = n - 1
    return f_sf(f_ppf(1 - level, df, df) / ratio, df, df)


def seeds_for_power(ratio: float, power: float = POWER, level: float = LEVEL) -> int | None:
    """The fewest seeds per model whose one-sided F-test finds a variance ratio of `ratio` (> 1) with
    `power`; None when no number up to MAX_SEEDS does (or the ratio is not above 1)."""
    if not ratio > 1:
        return None
    if math.isinf(ratio):
        return 2
    lo, hi = 2, MAX_SEEDS
    if variance_ratio_power(ratio, hi, level) < power:
        return None
    while lo < hi:  # the power grows with n
        mid = (lo + hi) // 2
        if variance_ratio_power(ratio, mid, level) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def pooled_sd(groups: list[list[float]]) -> tuple[float | None, int]:
    """(the pooled standard deviation of the groups with at least 2 values, its degrees of freedom);
    (None, 0) when no group has 2 values."""
    usable = [g for g in groups if len(g) >= 2]
    df = sum(len(g) - 1 for g in usable)
    if not df:
        return None, 0
    return math.sqrt(sum(statistics.variance(g) * (len(g) - 1) for g in usable) / df), df


def _ranks(values: list[float]) -> list[float]:
    """Mid-ranks from 1 (ties share the mean of their ranks); inf ranks last."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_test_greater(a: list[float], b: list[float]) -> float:
    """One-sided exact permutation p-value of the rank sum that `a`'s values are larger than `b`'s
    (Mann-Whitney, mid-ranks for ties; every split of the pooled values enumerated)."""
    if not a or not b:
        return 1.0
    ranks = _ranks(list(a) + list(b))
    observed = sum(ranks[:len(a)])
    splits = list(itertools.combinations(ranks, len(a)))
    return sum(sum(s) >= observed - 1e-9 for s in splits) / len(splits)


def r_squared(xs: list[float], ys: list[float]) -> float:
    """R^2 of the least-squares line through (xs, ys); 1.0 when ys are all equal (a line fits exactly)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if syy == 0 or sxx == 0:
        return 1.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy * sxy / (sxx * syy)


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
