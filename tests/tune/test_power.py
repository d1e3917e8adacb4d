"""cglab.tune.power: the seeds a declared contrast needs from a pilot's paired differences (pure)."""

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cglab.config import ConfigError
from cglab.tune.lessons import get_lesson
from cglab.tune.power import (
    MAX_SEEDS,
    family_level,
    half_width,
    paired_diffs,
    pilot_samples,
    plan_seeds,
    seeds_for_sd,
    seeds_needed,
)

CODE = "eval/code_bpb"
sds = st.floats(1e-4, 0.2)
margins = st.floats(0.005, 0.2)
levels = st.sampled_from([0.8, 0.9, 0.95, 0.975, 0.99])


def test_a_worked_case_by_hand():
    # differences 0.01, 0.02, 0.03: SD 0.01. Margin 0.02 at 90%: half-width t(0.95, n-1) * 0.01 / sqrt(n) <= 0.01,
    # i.e. t / sqrt(n) <= 1: n=4 gives 2.3534 / 2 = 1.177, n=5 gives 2.1318 / 2.2361 = 0.953 (textbook t table).
    r = seeds_needed([0.01, 0.02, 0.03], margin=0.02, level=0.90)
    assert (r.pilot_seeds, r.seeds, r.note) == (3, 5, "")
    assert r.sd == pytest.approx(0.01, rel=1e-12)
    assert half_width(0.01, 5, 0.90) == pytest.approx(2.131847 * 0.01 / math.sqrt(5), rel=1e-6)


def test_the_seeds_match_a_search_with_scipys_t():
    sp = pytest.importorskip("scipy.stats")
    np = pytest.importorskip("numpy")
    diffs = [-0.013, 0.004, 0.021, -0.002, 0.009]
    sd = float(np.std(diffs, ddof=1))
    for margin, level in ((0.02, 0.90), (0.02, 0.975), (0.05, 0.95), (0.004, 0.90)):
        want = next(n for n in range(2, 100_000) if sp.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n) <= margin / 2)
        r = seeds_needed(diffs, margin, level)
        assert (r.seeds, r.sd) == (want, pytest.approx(sd, rel=1e-12)), (margin, level)


def test_fewer_than_two_pilot_seeds_is_unknown_not_a_guess():
    for diffs in ([], [0.01]):
        r = seeds_needed(diffs, 0.02, 0.9)
        assert (r.seeds, r.sd, r.pilot_seeds) == (None, None, len(diffs))
        assert "needs at least 2" in r.note


def test_bad_inputs_are_refused():
    for kw in (dict(margin=0.0, level=0.9), dict(margin=0.02, level=1.0), dict(margin=-1, level=0.9)):
        with pytest.raises(ValueError):
            seeds_needed([0.1, 0.2], **kw)
    with pytest.raises(ValueError, match="finite"):
        seeds_needed([0.1, float("nan")], 0.02, 0.9)
    with pytest.raises(ValueError, match="sd"):
        seeds_for_sd(-1.0, 0.02, 0.9)


def test_no_spread_needs_two_and_too_much_noise_is_no_number():
    r = seeds_needed([0.01, 0.01, 0.01], 0.02, 0.9)
    assert r.seeds == 2 and "no spread" in r.note
    r = seeds_needed([0.0, 10.0], 0.001, 0.9)
    assert r.seeds is None and str(MAX_SEEDS) in r.note


@settings(max_examples=200, deadline=None)
@given(sds, sds, margins, margins, levels)
def test_more_noise_or_a_narrower_margin_never_needs_fewer_seeds(sd1, sd2, m1, m2, level):
    (lo, hi), (narrow, wide) = sorted((sd1, sd2)), sorted((m1, m2))
    base = seeds_for_sd(lo, wide, level)
    noisier, narrower = seeds_for_sd(hi, wide, level), seeds_for_sd(lo, narrow, level)
    assume(noisier is not None and narrower is not None)
    assert base <= noisier and base <= narrower


@settings(max_examples=150, deadline=None)
@given(sds, margins, levels)
def test_the_answer_is_the_least_n_that_meets_the_target(sd, margin, level):
    n = seeds_for_sd(sd, margin, level)
    assume(n is not None)
    assert half_width(sd, n, level) <= margin / 2
    assert n == 2 or half_width(sd, n - 1, level) > margin / 2


def test_the_level_is_holms_first_step_over_the_lessons_contrasts():
    assert family_level(get_lesson(5)) == pytest.approx(0.90)  # one contrast: the verdicts' 90% interval
    assert family_level(get_lesson(1)) == pytest.approx(1 - 0.1 / 4)  # four: 97.5%


def _samples(a: dict, b: dict, metric=CODE) -> dict:
    return {"clm": {metric: a}, "infill-r0.5": {metric: b}}


def test_paired_differences_use_only_the_seeds_both_variants_measured():
    c = get_lesson(2).contrast("clm vs infill-r0.5 on eval/code_bpb")
    s = _samples({1: 2.9, 2: 3.0, 3: 2.95, 4: float("nan")}, {2: 2.8, 3: 2.9, 4: 2.7, 5: 1.0})
    assert paired_diffs(s, c) == pytest.approx([0.2, 0.05])  # seed 1 and 5 one-sided, seed 4 NaN


def test_plan_seeds_sizes_each_declared_contrast_from_the_pilot():
    les = get_lesson(2)
    seeds = {1: 0.0, 2: 0.0, 3: 0.0}
    a = {s: 2.9 + d for s, d in zip(seeds, (0.01, 0.03, 0.02))}
    s = _samples(a, seeds)
    s["clm"]["eval/infill_bpb"] = {1: 3.3}  # one seed on the other contrast: unknown
    s["infill-r0.5"]["eval/infill_bpb"] = {1: 3.1}
    plan = plan_seeds(les, s, planned=3)
    code, fill = plan["contrasts"]
    want = seeds_for_sd(0.01, 0.02, family_level(les))
    assert (code["pilot_seeds"], code["sd"], code["seeds_needed"]) == (3, pytest.approx(0.01), want)
    assert (fill["pilot_seeds"], fill["seeds_needed"]) == (1, "unknown") and "at least 2" in fill["note"]
    assert (plan["most"], plan["planned"], plan["family"]) == (want, 3, 2)


def test_without_a_pilot_every_contrast_is_unknown_and_the_flag_is_named():
    plan = plan_seeds(get_lesson(1), None)
    assert plan["most"] == "unknown" and len(plan["contrasts"]) == 4
    assert all(r["seeds_needed"] == "unknown" and "--pilot" in r["note"] for r in plan["contrasts"])


def test_a_results_json_gives_the_lessons_samples_or_names_what_is_wrong():
    one = {"clm": {CODE: {"1": 2.9, "2": None}}}
    assert pilot_samples(one, 2) == {"clm": {CODE: {"1": 2.9}}}
    assert pilot_samples({"lessons": {"2": one, "3": {}}}, 2) == {"clm": {CODE: {"1": 2.9}}}
    with pytest.raises(ConfigError, match=r"study.json: no lesson 4 under 'lessons' \(it has \['2'\]\)"):
        pilot_samples({"lessons": {"2": one}}, 4, "study.json")
    with pytest.raises(ConfigError, match="x.json: expected variant -> metric -> seed -> value"):
        pilot_samples({"clm": [2.9]}, 2, "x.json")
    with pytest.raises(ConfigError, match="x.json: a value is not a number"):
        pilot_samples({"clm": {CODE: {"1": "high"}}}, 2, "x.json")
