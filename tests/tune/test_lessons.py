import pytest

from cglab.config import ConfigError
from cglab.tune.lessons import (
    AGREES,
    DESCRIPTIVE,
    DISAGREES,
    INCONCLUSIVE,
    LESSONS,
    NOT_MEASURED,
    ONE_SEED,
    Lesson,
    Metric,
    Variant,
    diff_ci,
    get_lesson,
    mean_ci,
    t975,
    verdict,
)
from cglab.tune.presets import PRESETS, base_config, max_concurrent, trial_resources


def _tokens(cfg):
    return cfg.train.train_steps * cfg.train.global_batch_size * cfg.data.seq_length


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("number", sorted(LESSONS))
def test_every_variant_validates_and_compute_is_equal(preset, number):
    lesson = get_lesson(number)
    base = base_config(preset)
    configs = lesson.configs(base, seeds=(1, 2))
    assert len(configs) == 2 * len(lesson.variants)
    assert lesson.experiment == f"codegen2/lesson-{number}-{lesson.slug}"
    tokens = {v: _tokens(c) for (v, _), c in configs.items()}
    if lesson.equal_compute:
        assert len(set(tokens.values())) == 1, tokens
    assert {c.train.seed for c in configs.values()} == {1, 2}


def test_variant_grids_match_the_design():
    assert [v.name for v in LESSONS[1].variants] == [
        "causal-codegen2",
        "causal-ul2",
        "prefix_lm-codegen2",
        "prefix_lm-ul2",
    ]
    base = base_config("laptop")
    c = LESSONS[1].config_for("prefix_lm-ul2", base)
    assert (c.model.architecture, c.objective.kind) == ("prefix_lm", "ul2")
    c = LESSONS[3].config_for("codegen2-sequence_level", base)
    assert (c.objective.kind, c.objective.causal_prob, c.objective.corruption) == ("codegen2", 0.5, "sequence_level")
    assert {LESSONS[4].config_for(v.name, base).data.mixture for v in LESSONS[4].variants} == {
        "pl_only",
        "nl_only",
        "mix",
    }
    assert get_lesson(2, infill_rate=0.25).config_for("infill-r0.25", base).objective.infill_rate == 0.25


def test_lesson5_spends_more_steps_on_the_same_unique_tokens():
    base = base_config("laptop")
    cfgs = {v.name: LESSONS[5].config_for(v.name, base) for v in LESSONS[5].variants}
    for e in (1, 2, 5):
        c = cfgs[f"epochs-{e}"]
        assert c.train.epochs == e
        assert c.train.train_steps == e * base.train.train_steps
        # unique tokens per epoch stay what the base budget holds
        assert c.train.train_steps // c.train.epochs == base.train.train_steps


def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match="lesson 9"):
        get_lesson(9)
    with pytest.raises(KeyError, match="choose one of"):
        LESSONS[2].variant("nope")
    with pytest.raises(ConfigError, match="preset 'huge'"):
        base_config("huge")
    broken = Lesson(9, "x", "?", (Variant("bad", ("parallel.tensor_model_parallel_size=3",)),), (), (), "")
    with pytest.raises(ConfigError, match="(?s)variant 'bad'.*tensor_model_parallel_size"):
        broken.config_for("bad", base_config("laptop"))


def _two_variant(goal="min", paper_best=("a",)):
    return Lesson(
        7,
        "t",
        "?",
        (Variant("a", ()), Variant("b", ()), Variant("c", ())),
        (),
        (Metric("m", goal, paper_best), Metric("missing", "min", ("a",))),
        "a wins",
    )


def _one(lesson, samples, key="m"):
    return {o.metric: o for o in verdict(lesson, samples)}[key]


def test_identical_values_are_inconclusive():
    o = _one(_two_variant(), {"a": {"m": {1: 5.0, 2: 5.0, 3: 5.0}}, "b": {"m": {1: 5.0, 2: 5.0, 3: 5.0}}})
    assert o.verdict == INCONCLUSIVE and o.agrees is None and o.diff.mean == 0 and o.diff.covers_zero()


def test_one_seed_gives_no_verdict_however_large_the_gap():
    o = _one(_two_variant(), {"a": {"m": {1: 1.0}}, "b": {"m": {1: 100.0}}})
    assert (o.verdict, o.note) == (INCONCLUSIVE, ONE_SEED) and o.winner == "a" and o.diff.lo is None
    assert _one(_two_variant(), {"a": {"m": 1.0}, "b": {"m": 100.0}}).note == ONE_SEED  # bare numbers: one seed


@pytest.mark.parametrize("goal", ["min", "max"])
def test_clear_separation_over_three_seeds_agrees_or_disagrees_as_the_paper_says(goal):
    low = {1: 10.0, 2: 10.3, 3: 9.8}
    high = {1: 12.0, 2: 12.4, 3: 11.9}
    best, worst = (low, high) if goal == "min" else (high, low)
    o = _one(_two_variant(goal), {"a": {"m": best}, "b": {"m": worst}})
    assert (o.verdict, o.winner, o.runner_up, o.paired) == (AGREES, "a", "b", True) and o.agrees
    assert not o.diff.covers_zero() and o.intervals["a"].n == 3
    o = _one(_two_variant(goal), {"a": {"m": worst}, "b": {"m": best}})
    assert (o.verdict, o.winner) == (DISAGREES, "b") and o.agrees is False


def test_overlapping_seeds_are_inconclusive_and_pairing_by_seed_settles_shared_noise():
    # Seed-to-seed noise (+-1) swamps the 0.1 gap unpaired; paired by seed the gap is constant, hence real.
    a = {1: 10.0, 2: 11.0, 3: 9.0}
    b = {s: x + 0.1 for s, x in a.items()}
    assert _one(_two_variant(), {"a": {"m": a}, "b": {"m": b}}).verdict == AGREES
    shifted = {s + 10: x for s, x in b.items()}  # no shared seed: Welch, unpaired
    o = _one(_two_variant(), {"a": {"m": a}, "b": {"m": shifted}})
    assert (o.verdict, o.paired) == (INCONCLUSIVE, False) and o.diff.covers_zero()


def test_all_zero_pass_at_1_never_agrees():
    zeros = {1: 0.0, 2: 0.0, 3: 0.0}
    o = _one(_two_variant("max"), {"a": {"m": zeros}, "b": {"m": dict(zeros)}, "c": {"m": dict(zeros)}})
    assert o.verdict == INCONCLUSIVE and o.agrees is None


def test_the_comparison_crosses_the_papers_claim_and_missing_metrics_say_so():
    # a and b both on the paper's side: their gap decides nothing; a against c (the best other) does.
    lesson = _two_variant(paper_best=("a", "b"))
    o = _one(lesson, {"a": {"m": {1: 1.0, 2: 1.1}}, "b": {"m": {1: 2.0, 2: 2.1}}, "c": {"m": {1: 3.0, 2: 3.2}}})
    assert (o.winner, o.runner_up, o.verdict) == ("a", "c", AGREES)
    assert _one(lesson, {"a": {"m": {1: 1.0}}}, "missing").verdict == NOT_MEASURED
    only_paper_side = _one(lesson, {"a": {"m": {1: 1.0, 2: 1.1}}, "b": {"m": {1: 2.0, 2: 2.1}}})
    assert only_paper_side.verdict == INCONCLUSIVE and "other side" in only_paper_side.note


def test_no_decision_metric_names_every_variant_as_the_papers_best():
    """A claim every variant satisfies cannot disagree: such a metric must be descriptive (lesson 1's infill)."""
    for lesson in LESSONS.values():
        names = {v.name for v in lesson.variants}
        for m in lesson.metrics:
            assert set(m.paper_best) <= names, (lesson.number, m.key)
            assert not m.decides or set(m.paper_best) != names, (lesson.number, m.key)
    infill = {m.key: m for m in LESSONS[1].metrics}["eval/infill_ppl"]
    ivs = {v.name: {"eval/infill_ppl": {1: 3.0 + i, 2: 3.1 + i}} for i, v in enumerate(LESSONS[1].variants)}
    o = {o.metric: o for o in verdict(LESSONS[1], ivs)}[infill.key]
    assert o.verdict == DESCRIPTIVE and o.agrees is None and o.winner == "causal-codegen2"


def test_t_interval_matches_the_textbook():
    assert t975(2) == pytest.approx(4.3027) and t975(60) == pytest.approx(2.0003, abs=2e-4)
    iv = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: half width t(0.975, 2) / sqrt(3)
    assert (iv.mean, iv.half) == (2.0, pytest.approx(4.3027 / 3**0.5, rel=1e-4))
    d, paired = diff_ci({1: 1.0, 2: 2.0}, {3: 1.0, 4: 2.0})
    assert not paired and d.mean == 0 and d.covers_zero()


def test_concurrency_follows_the_scarcest_resource():
    cluster = base_config("cluster")
    need = trial_resources(cluster, PRESETS["cluster"].driver_cpus)
    assert need["GPU"] == 8
    assert max_concurrent(need, {"CPU": 1024, "GPU": 16}, n_trials=4) == 2
    assert max_concurrent(need, {"CPU": 1024, "GPU": 64}, n_trials=4) == 4  # never more than trials
    with pytest.raises(ConfigError, match="needs 8 GPU"):
        max_concurrent(need, {"CPU": 1024, "GPU": 4}, n_trials=4)
    lp = PRESETS["laptop"]
    laptop = trial_resources(base_config("laptop"), lp.driver_cpus, lp.data_cpus)
    # Tune driver 0.5 + Train worker 1 + headroom for its Ray Data tasks + the eval.every task's eval.task_cpus
    assert laptop == {"CPU": 3.0}
    assert max_concurrent(laptop, {"CPU": 3.0}, n_trials=2) == 1
    assert max_concurrent(laptop, {"CPU": 6.0}, n_trials=2) == 2
    with pytest.raises(ConfigError, match="needs 3 CPU"):
        max_concurrent(laptop, {"CPU": 2.5}, n_trials=2)  # would wait forever for its own data tasks
    off = base_config("laptop", overrides=["eval.every=0"])
    assert trial_resources(off, lp.driver_cpus, lp.data_cpus) == {"CPU": 2.5}  # no task, no CPUs for it


def test_presets_name_the_corpus_they_fall_back_to(monkeypatch):
    """Without data.sources, `cglab ablate` trains the laptop preset on the micro corpus and the study preset on
    the installed packages' corpus (built under .cglab/pkgcorpus with the study budgets); the GPU presets on
    nothing: the config must name its data."""
    from cglab.tune import presets

    built = []
    monkeypatch.setattr(presets, "build_package_corpus", lambda root, **kw: built.append((root, kw)))
    monkeypatch.setattr(presets, "corpus_sources", lambda root: [{"paths": [str(root)]}])
    assert presets.preset_corpus_sources(PRESETS["1gpu"]) == [] and PRESETS["cluster"].corpus is None
    assert PRESETS["laptop"].corpus == "micro"
    out = presets.preset_corpus_sources(PRESETS["study"])
    assert out[0]["paths"][0].endswith(".cglab/pkgcorpus") and built[0][1] == presets.STUDY_CORPUS
    # every study trial: 3 default seeds, and lesson 5's five epochs repeat its base run's unique tokens
    study = base_config("study")
    assert len(PRESETS["study"].seeds) >= 3
    assert get_lesson(5).config_for("epochs-5", study).train.train_steps == 5 * study.train.train_steps
