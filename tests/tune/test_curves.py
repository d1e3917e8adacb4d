"""Decision stability on metric histories built by hand (pure: no MLflow, no Ray)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.tune.curves import DIFFERENT, SAME, align, rankings, stability, stable_from
from cglab.tune.lessons import get_lesson
from cglab.tune.stats import mean_ci
from cglab.tune.verdicts import DISAGREES, EQUIVALENT, INCONCLUSIVE, NOT_MEASURED, ONE_SEED, verdict

LES = get_lesson(4)  # pl_only / nl_only / mix; code bpb: mix equivalent to pl_only (margin 0.02), NL: to nl_only
CODE = LES.metrics[0]
NL = LES.metrics[1]
VARIANTS = ("pl_only", "nl_only", "mix")


def _hist(table, tokens, seeds=("1", "2", "3"), noise=0.01):
    """table: variant -> one mean per point; each seed adds its own small offset (paired seeds, clear verdicts)."""
    return {
        v: {s: [(t, m + noise * (j - 1)) for t, m in zip(tokens, means)] for j, s in enumerate(seeds)}
        for v, means in table.items()
    }


def test_band_and_mean_match_the_final_reports_interval_at_every_point():
    h = {
        "pl_only": {"1": [(10, 5.0), (20, 4.0), (40, 3.0)], "2": [(10, 5.5), (20, 4.4), (40, 3.3)]},
        "mix": {"1": [(10, 6.0), (20, 5.0), (40, 4.0)], "2": [(10, 6.1), (20, 5.3), (40, 4.6)], "3": [(40, 4.1)]},
    }
    c = align(CODE.key, h, ["pl_only", "mix"])
    assert c.fraction.tolist() == [0.25, 0.5, 1.0] and c.tokens[0].tolist() == [10, 20, 40]
    assert c.n.tolist() == [[2, 2, 2], [2, 2, 3]]  # seed 3 of mix has only the final point
    for i, v in enumerate(c.variants):
        for p in range(3):
            iv = mean_ci([x for s, pts in h[v].items() for t, x in pts if t == c.tokens[i, p]])
            assert c.mean[i, p] == pytest.approx(iv.mean)
            assert (c.lo[i, p], c.hi[i, p]) == (pytest.approx(iv.lo), pytest.approx(iv.hi))


def test_final_point_gives_the_final_reports_verdict():
    h = _hist({"pl_only": [9, 5, 3], "nl_only": [8, 9, 9], "mix": [7, 5.01, 3.01]}, [100, 200, 400])
    s = stability(LES, CODE, h)
    final = {v: {CODE.key: {seed: pts[-1][1] for seed, pts in runs.items()}} for v, runs in h.items()}
    assert s.final == (verdict(LES, final)[0],) and s.final[0].contrast == LES.contrasts[0]
    assert s.rankings[0] == ("mix", "nl_only", "pl_only") and s.rankings[-1] == ("pl_only", "mix", "nl_only")
    assert [[o.verdict for o in os] for os in s.outcomes] == [[DISAGREES], [EQUIVALENT], [EQUIVALENT]]
    assert s.stable_from == 1 and s.stable_from_fraction == 0.5 and s.stable_from_tokens == 200
    assert s.quarter == DIFFERENT and s.quarter_point == 0 and s.final_tokens == 400


def test_quarter_reads_the_last_point_at_or_below_a_quarter():
    tokens = [50, 100, 120, 400]  # 0.125, 0.25, 0.3, 1: the 0.25 point counts, 0.3 does not
    h = _hist({"pl_only": [9, 3, 9, 3], "mix": [4, 5, 4, 5]}, tokens)
    s = stability(LES, CODE, h)
    assert s.quarter_point == 1 and s.quarter == SAME and s.stable_from == 3
    late = _hist({"pl_only": [3, 3], "mix": [4, 5]}, [300, 400])  # first evaluation at 3/4 of the run
    s = stability(LES, CODE, late)
    assert s.quarter == NOT_MEASURED and s.quarter_point is None and s.stable_from == 0


def test_single_point_runs_have_no_curve_and_do_not_fail():
    s = stability(LES, CODE, {"pl_only": {"1": [(400, 3.0)]}, "mix": {"1": [(400, 4.0)]}})
    assert s.curves is None and s.stable_from is None and s.quarter == NOT_MEASURED
    assert "no curve" in s.note
    assert stability(LES, CODE, {}).note == "not measured"


def test_a_variant_missing_at_a_point_is_not_ranked_there():
    h = _hist({"pl_only": [9, 5, 3], "mix": [7, 6, 4]}, [100, 200, 400])
    h["mix"] = {s: pts[1:] for s, pts in h["mix"].items()}  # mix skipped its first evaluation
    s = stability(LES, CODE, h)
    assert s.rankings[0] == ("pl_only",) and s.outcomes[0][0].verdict == NOT_MEASURED
    assert s.stable_from == 1


# ------------------------------------------------------------------------------------------- properties
# whole numbers: variants at least 1 bpb apart, far outside every margin, so the verdicts follow the ranking
means = st.lists(st.integers(1, 100).map(float), min_size=3, max_size=3, unique=True)


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(VARIANTS), points=st.integers(2, 8), base=means, n_seeds=st.integers(2, 4))
def test_a_ranking_constant_over_all_points_is_stable_from_the_first(order, points, base, n_seeds):
    ranked = dict(zip(order, sorted(base)))  # the same order at every point, values drifting down
    tokens = [100 * (k + 1) for k in range(points)]
    table = {v: [ranked[v] * (1 - 0.05 * k) for k in range(points)] for v in VARIANTS}
    s = stability(LES, CODE, _hist(table, tokens, tuple(str(i) for i in range(n_seeds))))
    assert set(s.rankings) == {tuple(order)}
    assert s.stable_from == 0 and s.stable_from_fraction == pytest.approx(1 / points)
    assert s.quarter in (SAME, NOT_MEASURED) and (s.quarter == NOT_MEASURED) == (points < 4)


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(VARIANTS), points=st.integers(2, 8), base=means)
def test_reversing_the_last_point_makes_it_stable_only_from_the_last(order, points, base):
    ranked = dict(zip(order, sorted(base)))
    tokens = [100 * (k + 1) for k in range(points)]
    rev = dict(zip(order, sorted(base, reverse=True)))
    table = {v: [ranked[v]] * (points - 1) + [rev[v]] for v in VARIANTS}
    s = stability(LES, CODE, _hist(table, tokens))
    assert s.rankings[-1] == tuple(reversed(order)) and s.stable_from == points - 1
    assert s.stable_from_fraction == 1.0 and s.stable_from_tokens == tokens[-1]
    if s.quarter != NOT_MEASURED:  # the winner flipped at the end: a quarter-length run crowned the other one
        assert s.quarter == DIFFERENT


@settings(max_examples=40, deadline=None)
@given(points=st.integers(1, 6), vals=st.lists(st.floats(1.0, 50.0), min_size=18, max_size=18))
def test_one_seed_gives_no_verdict_at_any_point(points, vals):
    it = iter(vals)
    h = {v: {"7": [(10 * (k + 1), next(it)) for k in range(points)]} for v in VARIANTS}
    s = stability(LES, CODE, h)
    if points == 1:
        assert s.curves is None
        return
    assert all(len(os) == 1 and os[0].verdict == INCONCLUSIVE and os[0].note == ONE_SEED for os in s.outcomes)
    assert np.isnan(s.curves.lo).all() and s.stable_from is not None


@settings(max_examples=60, deadline=None)
@given(decisions=st.lists(st.sampled_from("abc"), min_size=1, max_size=12))
def test_stable_from_is_the_first_index_after_the_last_change(decisions):
    i = stable_from(decisions)
    assert all(d == decisions[-1] for d in decisions[i:])
    assert i == 0 or decisions[i - 1] != decisions[-1]


def test_rankings_follow_the_metrics_goal():
    h = _hist({"pl_only": [1, 2], "mix": [2, 1]}, [1, 2])
    c = align(CODE.key, h, ["pl_only", "mix"])
    assert rankings(c, "min") == [("pl_only", "mix"), ("mix", "pl_only")]
    assert rankings(c, "max") == [("mix", "pl_only"), ("pl_only", "mix")]
    assert math.isclose(c.fraction[0], 0.5)


def test_a_late_swap_behind_the_winner_still_moves_stable_from():
    # pl_only leads and the verdict holds everywhere; mix and nl_only trade places at the last point
    h = _hist({"pl_only": [3, 3, 3], "nl_only": [5, 5, 7], "mix": [6, 6, 4]}, [100, 200, 400])
    s = stability(LES, CODE, h)
    assert {(tuple(o.verdict for o in os), r[0]) for os, r in zip(s.outcomes, s.rankings)} == {
        ((DISAGREES,), "pl_only")
    }
    assert s.rankings[1] != s.rankings[2] and s.stable_from == 2 and s.quarter == SAME


def test_each_points_verdict_is_corrected_over_the_whole_lessons_family():
    """A borderline code contrast (TOST p about 0.03 alone) is equivalent when the NL histories are not given,
    and inconclusive once the lesson's NL contrast joins the Holm family at every point, as in the final report."""

    def pair(a, b, base, diffs):  # b at base + a seed offset, a = b + that seed's diff, at two points
        runs = {a: {}, b: {}}
        for j, d in enumerate(diffs):
            x = base + 0.1 * j
            runs[b][str(j)] = [(100, x), (400, x)]
            runs[a][str(j)] = [(100, x + d), (400, x + d)]
        return runs

    code = pair("mix", "pl_only", 3.0, [0.003, 0.008, 0.013])  # 0.008 +- 0.005: near the 0.02 margin's edge
    nl = pair("mix", "nl_only", 3.5, [0.1, -0.1, 0.05])  # noisy: NL's contrast is the larger p
    family = stability(LES, CODE, code, {NL.key: nl})
    (lone,), (joint,) = stability(LES, CODE, code).final, family.final
    assert 0.025 < lone.p < 0.05 and lone.verdict == EQUIVALENT
    assert joint.p == pytest.approx(lone.p) and joint.p_holm == pytest.approx(2 * lone.p)
    assert [os[0].verdict for os in family.outcomes] == [INCONCLUSIVE, INCONCLUSIVE]
