"""Error bars: mean ± s.e., the paired t interval and the verdicts, against hand computations."""

import math

import pytest

from ponder import stats


def test_mean_se_by_hand():
    m, se = stats.mean_se([0.2, 0.3, 0.4])
    assert m == pytest.approx(0.3)
    assert se == pytest.approx(math.sqrt(0.01 / 3))       # sample variance 0.01, n = 3
    assert math.isnan(stats.mean_se([0.5])[1])


def test_paired_difference_uses_t_with_n_minus_1():
    a, b = [0.30, 0.34, 0.32], [0.25, 0.27, 0.30]         # differences 0.05, 0.07, 0.02
    d = stats.paired_difference(a, b)
    assert d["mean"] == pytest.approx(0.14 / 3)
    sd = math.sqrt(sum((x - 0.14 / 3) ** 2 for x in (0.05, 0.07, 0.02)) / 2)
    assert d["se"] == pytest.approx(sd / math.sqrt(3))
    assert d["hi"] - d["mean"] == pytest.approx(4.302652729911275 * d["se"])   # t_{0.975, 2}
    assert stats.verdict(d, ">") == "no effect at 95%"   # 3 seeds: t = 4.30 makes the interval wide


def test_verdicts():
    assert stats.verdict({"lo": -0.01, "hi": 0.05}, ">") == "no effect at 95%"
    assert stats.verdict({"lo": -0.05, "hi": -0.01}, ">") == "opposite"
    assert stats.verdict({"lo": math.nan, "hi": math.nan}, ">") == "n/a (one seed)"


def test_not_below_is_non_inferiority_with_a_stated_margin():
    """'>=' holds only when the lower end is above −δ; an interval whose upper end is >= 0 no longer passes by
    itself (with 3 seeds the intervals are ±7 points: the old rule could hardly fail)."""
    assert stats.verdict({"lo": -0.015, "hi": 0.06}, ">=", margin=0.02) == "yes"
    assert stats.verdict({"lo": 0.01, "hi": 0.06}, ">=", margin=0.02) == "yes"
    assert stats.verdict({"lo": -0.076, "hi": 0.068}, ">=", margin=0.02).startswith("not shown")  # retry's guard
    assert stats.verdict({"lo": -0.021, "hi": 0.083}, ">=", margin=0.02).startswith("not shown")  # SSFT pass@12
    assert stats.verdict({"lo": -0.05, "hi": -0.03}, ">=", margin=0.02).startswith("no (below by more than")
    assert stats.verdict({"lo": -0.05, "hi": -0.01}, ">=", margin=0.02).startswith("not shown")
    for bad in (None, 0, -1.0):
        with pytest.raises(ValueError, match="needs a margin"):
            stats.verdict({"lo": -0.01, "hi": 0.05}, ">=", margin=bad)
    with pytest.raises(ValueError, match="paired values differ"):
        stats.paired_difference([1, 2], [1])


def test_paired_items_normal_interval_by_hand():
    a, b = [1, 1, 0, 1], [0, 1, 0, 0]                      # differences 1, 0, 0, 1
    d = stats.paired_items(a, b)
    assert d["mean"] == 0.5 and d["se"] == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))   # s^2 = 1/3, n = 4
    assert d["lo"] == pytest.approx(0.5 - 1.96 * d["se"]) and d["n"] == 4


def test_fmt_pm_keeps_small_values_visible():
    assert stats.fmt_pm(0.302, 0.011) == "30.2 ± 1.1"
    assert stats.fmt_pm(3.1e-7, 2e-8, scale=1) == "3.1e-07 ± 2.0e-08"  # an identity's residual, not "0.0 ± 0.0"
    assert stats.fmt_pm(0.0, 0.0, scale=1) == "0.0 ± 0.0"
    assert stats.fmt_pm(0.04, float("nan"), scale=1) == "4.0e-02" and stats.fmt_pm(0.06, float("nan"), scale=1) == "0.1"
    assert stats.fmt_pm(3.7e-17, 0.006) == "0.0 ± 0.6"  # float noise of an exact tie


def test_effect_note_words_a_not_below_claim_as_non_inferiority_within_the_margin():
    from ponder.recipes.common import effect_note
    a = [1.0] * 20 + [0.0] * 80  # 5 points lower than b, the problems solved differ: the interval reaches above 0
    b = [0.0] * 10 + [1.0] * 25 + [0.0] * 65
    note = effect_note("m1@t1 − base", a, b, "docs/results/x.md", ">=")
    assert "-5.0 points" in note and "not shown: the interval reaches below −2 points" in note
    # +5 with an interval [−4.9, +14.9]: an upper end above 0 is no evidence of "not below" (the old wording passed it)
    assert "not shown" in effect_note("m1@t1 − base", b, a, "docs/results/x.md", ">=")
    assert "not below by more than 2 points at 95%" in effect_note("m1@t1 − base", a, a, "docs/results/x.md", ">=")
    assert "below by more than 2 points" in effect_note("x", [0.0] * 100, [1.0] * 50 + [0.0] * 50, "x.md", ">=")
    assert "within noise" in effect_note("m1@t5 − m1@t1", b, a, "docs/results/x.md")
