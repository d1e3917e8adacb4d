"""cglab.tune.stats: the t distribution, intervals and Holm's correction (pure)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.tune.stats import diff_ci, diff_estimate, estimate, holm, mean_ci, t975, t_cdf, t_quantile


def test_t_distribution_matches_scipy():
    sp = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 8, 29, 30, 31, 60, 250):
        for x in (-12.0, -2.5, -0.3, 0.0, 0.7, 1.9, 4.0):
            assert t_cdf(x, df) == pytest.approx(sp.t.cdf(x, df), abs=1e-12), (x, df)
        for p in (0.9, 0.95, 0.975, 0.025):
            assert t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), abs=1e-9), (p, df)
    assert t_cdf(1.0, 2.7) == t_cdf(1.0, 2)  # Welch's fractional df: rounded down, the conservative side


def test_t_interval_matches_the_textbook():
    assert t975(2) == pytest.approx(4.302653, abs=1e-6) and t975(60) == pytest.approx(2.000298, abs=1e-6)
    assert math.isinf(t975(0.5))
    iv = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half width t(0.975, 2) / sqrt(3)
    assert (iv.mean, iv.half) == (2.0, pytest.approx(4.302653 / 3**0.5, rel=1e-6))
    assert mean_ci([5.0]).lo is None and estimate([5.0]).p_above(0.0) is None
    d, paired = diff_ci({1: 1.0, 2: 2.0}, {3: 1.0, 4: 2.0})
    assert not paired and d.mean == 0 and d.covers_zero()


def test_paired_and_welch_differences_match_scipy():
    sp = pytest.importorskip("scipy.stats")
    a, b = {1: 10.0, 2: 11.5, 3: 9.2, 4: 10.1}, {1: 10.4, 2: 11.6, 3: 9.9, 4: 10.3}
    est, paired = diff_estimate(a, b)
    ref = sp.ttest_rel(list(a.values()), list(b.values()), alternative="less")
    assert paired and est.p_below(0.0) == pytest.approx(ref.pvalue, rel=1e-9)
    b2 = {s + 10: x for s, x in b.items()}  # no shared seeds: Welch (its df, as scipy's, before rounding down)
    est, paired = diff_estimate(a, b2)
    ref = sp.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    assert not paired and est.mean / est.se == pytest.approx(ref.statistic, rel=1e-12)


def test_holm_matches_the_textbook():
    # Holm (1979) step-down: sorted 0.01, 0.02, 0.03, 0.04 times 4, 3, 2, 1 -> 0.04, 0.06, 0.06, 0.06 (monotone)
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]  # None: not in the family
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped
    assert holm([]) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), max_size=12))
def test_holm_never_lowers_a_p_value_and_keeps_their_order(ps):
    adj = holm(ps)
    assert [a is None for a in adj] == [p is None for p in ps]
    pairs = sorted((p, a) for p, a in zip(ps, adj) if p is not None)
    assert all(p <= a <= 1.0 for p, a in pairs)
    assert all(a1 <= a2 for (_, a1), (_, a2) in zip(pairs, pairs[1:]))  # monotone in the raw p
    k = len(pairs)
    assert all(a >= min(1.0, k * pairs[0][0]) for _, a in pairs)  # the smallest is multiplied by the family size
