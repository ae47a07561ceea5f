"""Summaries with error bars: mean ± standard error over seeds, and paired differences between arms with a 95%
interval (Student's t over the per-seed differences: the seeds are the replicates, the arms share them).

Effects are claims: `verdict` says "yes" only when the interval excludes zero in the claimed direction, and
says "no effect at 95%" (or "opposite") otherwise, as plainly as a success. A "not below" claim is a
non-inferiority test with a stated margin δ: "yes" only when the interval's lower end is above −δ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of the values; s.e. is nan for fewer than two values."""
    xs = [float(x) for x in xs]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def t_interval(mean: float, se: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval with n - 1 degrees of freedom."""
    if n < 2 or math.isnan(se):
        return math.nan, math.nan
    q = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
    return mean - q * se, mean + q * se


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """a[i] - b[i] over paired replicates (the same seed in both arms): mean, s.e., the t interval, n."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, se = mean_se(d)
    lo, hi = t_interval(m, se, len(d), confidence)
    return {"mean": m, "se": se, "lo": lo, "hi": hi, "n": len(d)}


def paired_items(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict[str, float]:
    """a[i] - b[i] over paired items of ONE run (e.g. the same held-out problems scored two ways): mean, s.e.
    and a normal interval (many items). It covers the sampling of problems, not the training seed: the
    experiment tables (`paired_difference` over seeds) cover that."""
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} vs {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, se = mean_se(d)
    return {"mean": m, "se": se, "lo": m - z * se, "hi": m + z * se, "n": len(d)}


def verdict(diff: dict[str, float], direction: str = ">", margin: float | None = None) -> str:
    """Is the claimed direction ('>': a above b, '>=': a not below b) supported by the interval?

    '>': "yes" when the interval lies above 0; "opposite" when it lies below; else "no effect at 95%".
    '>=': non-inferiority with margin δ = `margin` (> 0, in the units of the difference; required): "yes" when
    the interval's lower end is above −δ (a is at most δ below b, at 95%); "no (below by more than δ)" when its
    upper end is below −δ; else "not shown (the interval reaches below −δ)". (An upper end >= 0 is no evidence
    of "not below": with few seeds the interval is wide and such a test passes almost by construction.)"""
    if direction == ">=":
        if margin is None or not margin > 0:
            raise ValueError(f"a '>=' (not below) claim needs a margin > 0, got {margin!r}")
    elif direction != ">":
        raise ValueError(f"direction must be '>' or '>=', got {direction!r}")
    lo, hi = diff["lo"], diff["hi"]
    if math.isnan(lo):
        return "n/a (one seed)"
    if direction == ">":
        return "yes" if lo > 0 else "opposite" if hi < 0 else "no effect at 95%"
    if lo > -margin:
        return "yes"
    return "no (below by more than δ)" if hi < -margin else "not shown (the interval reaches below −δ)"


def fmt_num(x: float, digits: int = 1) -> str:
    """A table number: fixed point, or scientific when fixed point would print a nonzero value as 0."""
    if abs(x) < 1e-9:  # float noise of a difference that is zero (e.g. the same greedy answers)
        return f"{0.0:.{digits}f}"
    if abs(x) < 0.5 * 10 ** -digits:
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def fmt_pm(mean: float, se: float, scale: float = 100.0, digits: int = 1) -> str:
    """'30.2 ± 1.1' (values scaled, e.g. accuracies in %); '3.1e-07 ± 2.0e-08' for values that would round to 0."""
    if math.isnan(mean):
        return "-"
    if math.isnan(se):
        return fmt_num(scale * mean, digits)
    return f"{fmt_num(scale * mean, digits)} ± {fmt_num(scale * se, digits)}"
