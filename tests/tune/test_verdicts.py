"""Verdicts on declared contrasts: TOST, non-inferiority and superiority in both metric directions, Holm over a
lesson's contrasts, and no verdict on a contrast the lesson did not declare (pure: no Ray, no MLflow)."""

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cglab.config import ConfigError
from cglab.tune.lessons import EQUIVALENCE, LESSONS, NON_INFERIORITY, SUPERIORITY, Contrast, Lesson, Metric, Variant
from cglab.tune.verdicts import (
    AGREES,
    DISAGREES,
    EQUIVALENT,
    INCONCLUSIVE,
    NOT_MEASURED,
    ONE_SEED,
    verdict,
)


def _lesson(*contrasts, goal="min"):
    variants = tuple(Variant(n, ()) for n in "abcd")
    return Lesson(7, "t", "?", variants, (), (Metric("m", goal), Metric("n", goal)), "", contrasts=contrasts)


def _samples(diffs, base=(3.0, 3.1, 2.9, 3.05, 2.95), metric="m", a="a", b="b"):
    """a's values = b's + diffs, per seed (b varies between seeds: pairing must remove it)."""
    bs = dict(enumerate(base[: len(diffs)]))
    return {a: {metric: {s: x + d for (s, x), d in zip(bs.items(), diffs)}}, b: {metric: bs}}


def _one(lesson, samples):
    (o,) = verdict(lesson, samples)
    return o


def test_tost_is_equivalent_when_the_interval_lies_within_the_margin_and_inconclusive_when_not():
    diffs = [0.004, -0.002, 0.001, 0.003, -0.001]  # a - b: small, tight
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, 0.02)), _samples(diffs))
    iv = o.interval
    assert -0.02 < iv.lo < iv.hi < 0.02 and o.paired
    assert (o.verdict, o.agrees) == (EQUIVALENT, True) and o.p < 0.05
    # the same values against a margin the interval crosses: not shown equivalent, and not a difference either
    narrow = iv.hi - 0.001
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, narrow)), _samples(diffs))
    assert o.interval.hi > narrow > o.interval.mean and (o.verdict, o.agrees) == (INCONCLUSIVE, None)
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, narrow)), _samples([-d for d in diffs]))  # the other end
    assert o.interval.lo < -narrow < o.interval.mean and o.verdict == INCONCLUSIVE
    # noisy seeds, mean inside the margin: a wide interval is inconclusive, never `disagrees`
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, 0.02)), _samples([0.05, -0.05, 0.01]))
    assert abs(o.interval.mean) < 0.02 < o.interval.hi and o.verdict == INCONCLUSIVE
    # wholly outside the margin: a difference, and the paper said there is none
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, 0.02)), _samples([0.1 + d for d in diffs]))
    assert o.interval.lo > 0.02 and (o.verdict, o.agrees) == (DISAGREES, False)


@settings(max_examples=200, deadline=None)
@given(
    diffs=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=6),
    margin=st.floats(0.01, 1.0),
)
def test_tost_reads_both_ends_of_the_90_percent_interval(diffs, margin):
    """With one test (no Holm), TOST at 5% is `equivalent` exactly when the 90% interval lies within the margin,
    and `disagrees` exactly when it lies wholly outside it."""
    o = _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, margin)), _samples(diffs, base=(0.0,) * 6))
    iv = o.interval
    assume(iv.lo is not None and min(abs(abs(iv.lo) - margin), abs(abs(iv.hi) - margin)) > 1e-9)
    inside = -margin < iv.lo and iv.hi < margin
    outside = iv.lo > margin or iv.hi < -margin
    assert (o.verdict == EQUIVALENT) == inside
    assert (o.verdict == DISAGREES) == outside


def test_holm_turns_a_borderline_agreement_inconclusive():
    """Alone, the first contrast's p (about 0.04) passes 0.05; in a lesson with a second test, Holm doubles it."""
    first = Contrast("a", "b", "m", SUPERIORITY, 0.02)
    second = Contrast("c", "d", "m", SUPERIORITY, 0.02)
    samples = {**_samples([-0.01, -0.02, -0.03]), **_samples([0.01, -0.01, 0.0], a="c", b="d")}  # a lower: better
    alone = _one(_lesson(first), samples)
    assert alone.p < 0.05 and alone.p_holm == alone.p and alone.verdict == AGREES
    both = {o.contrast: o for o in verdict(_lesson(first, second), samples)}
    o = both[first]
    assert o.p == pytest.approx(alone.p) and o.p_holm == pytest.approx(2 * o.p) and o.p_holm > 0.05
    assert o.verdict == INCONCLUSIVE and "Holm" in o.note
    # asking for one contrast does not shrink the family it was declared in
    (only,) = verdict(_lesson(first, second), samples, [first.name])
    assert only == o


def test_a_lesson_cannot_decide_a_contrast_it_did_not_declare():
    declared = Contrast("a", "b", "m", SUPERIORITY, 0.02)
    lesson = _lesson(declared)
    samples = _samples([-0.1, -0.2, -0.15])
    undeclared = Contrast("b", "a", "m", SUPERIORITY, 0.02)
    with pytest.raises(ConfigError, match="lesson 7 did not declare the contrast 'b vs a on m'"):
        verdict(lesson, samples, [undeclared])
    with pytest.raises(ConfigError, match="did not declare the contrast 'c vs d on m'"):
        verdict(lesson, samples, ["c vs d on m"])
    with pytest.raises(ConfigError, match="did not declare"):  # same pair, another test: still not declared
        verdict(lesson, samples, [Contrast("a", "b", "m", EQUIVALENCE, 0.02)])
    assert [o.contrast for o in verdict(lesson, samples, [declared.name])] == [declared]
    assert verdict(_lesson(), samples) == []  # nothing declared: nothing decided, whatever the data


@pytest.mark.parametrize("goal", ["min", "max"])
def test_superiority_and_non_inferiority_follow_the_metrics_goal(goal):
    better = -1.0 if goal == "min" else 1.0  # the sign of a - b when a is better
    clear = [better * d for d in (0.10, 0.12, 0.11)]
    sup = Contrast("a", "b", "m", SUPERIORITY, 0.02)
    assert _one(_lesson(sup, goal=goal), _samples(clear)).verdict == AGREES
    assert _one(_lesson(sup, goal=goal), _samples([-d for d in clear])).verdict == DISAGREES
    # a slightly worse than b, by less than the margin: non-inferior (agrees), yet not superior (disagrees)
    slightly_worse = [-better * d for d in (0.005, 0.006, 0.004, 0.005)]
    ni = Contrast("a", "b", "m", NON_INFERIORITY, 0.02)
    assert _one(_lesson(ni, goal=goal), _samples(slightly_worse)).verdict == AGREES
    assert _one(_lesson(sup, goal=goal), _samples(slightly_worse)).verdict == DISAGREES
    # worse by more than the margin: inferior
    much_worse = [-better * d for d in (0.05, 0.06, 0.055)]
    assert _one(_lesson(ni, goal=goal), _samples(much_worse)).verdict == DISAGREES


def test_one_seed_and_missing_metrics_give_no_verdict():
    c = Contrast("a", "b", "m", SUPERIORITY, 0.02)
    o = _one(_lesson(c), {"a": {"m": {1: 1.0}}, "b": {"m": {1: 100.0}}})
    assert (o.verdict, o.note, o.p) == (INCONCLUSIVE, ONE_SEED, None) and o.interval.lo is None
    assert _one(_lesson(c), {"a": {"m": 1.0}, "b": {"m": 100.0}}).note == ONE_SEED  # bare numbers: one seed
    o = _one(_lesson(c), {"a": {"m": {1: 1.0, 2: 2.0}}})
    assert o.verdict == NOT_MEASURED and "for b" in o.note
    # a contrast without a p-value stays out of the Holm family of the others
    other = Contrast("c", "d", "n", SUPERIORITY, 0.02)
    samples = _samples([-0.01, -0.02, -0.03], metric="n", a="c", b="d")
    o = {o.contrast: o for o in verdict(_lesson(c, other), samples)}[other]
    assert o.p_holm == o.p and o.verdict == AGREES


def test_pairing_by_seed_settles_noise_both_variants_share():
    # Seed-to-seed noise (+-1) swamps a 0.1 gap unpaired; paired by seed the gap is constant, hence real.
    c = Contrast("a", "b", "m", SUPERIORITY, 0.02)
    b = {1: 10.0, 2: 11.0, 3: 9.0}
    a = {s: x - 0.1 for s, x in b.items()}
    o = _one(_lesson(c), {"a": {"m": a}, "b": {"m": b}})
    assert (o.verdict, o.paired) == (AGREES, True)
    o = _one(_lesson(c), {"a": {"m": {s + 10: x for s, x in a.items()}}, "b": {"m": b}})  # no shared seed: Welch
    assert (o.verdict, o.paired) == (INCONCLUSIVE, False)


def test_identical_variants_are_equivalent_but_never_superior():
    same = {"a": {"m": {1: 2.5, 2: 2.6}}, "b": {"m": {1: 2.5, 2: 2.6}}}
    assert _one(_lesson(Contrast("a", "b", "m", EQUIVALENCE, 0.02)), same).verdict == EQUIVALENT
    assert _one(_lesson(Contrast("a", "b", "m", SUPERIORITY, 0.02)), same).verdict == INCONCLUSIVE


def test_the_committed_lessons_decide_their_declared_contrasts_only():
    les = LESSONS[4]
    samples = {v.name: {"eval/code_bpb": {1: 2.9, 2: 2.91}, "eval/nl_bpb": {1: 3.6, 2: 3.62}} for v in les.variants}
    out = verdict(les, samples)
    assert [o.contrast for o in out] == list(les.contrasts) and {o.verdict for o in out} == {EQUIVALENT}
