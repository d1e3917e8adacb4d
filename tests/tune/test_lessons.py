import pytest

from cglab.config import ConfigError
from cglab.tune.lessons import LESSONS, Lesson, Metric, Variant, get_lesson, verdict
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
        "causal-codegen2", "causal-ul2", "prefix_lm-codegen2", "prefix_lm-ul2"]
    base = base_config("laptop")
    c = LESSONS[1].config_for("prefix_lm-ul2", base)
    assert (c.model.architecture, c.objective.kind) == ("prefix_lm", "ul2")
    c = LESSONS[3].config_for("codegen2-sequence_level", base)
    assert (c.objective.kind, c.objective.causal_prob, c.objective.corruption) == (
        "codegen2", 0.5, "sequence_level")
    assert {LESSONS[4].config_for(v.name, base).data.mixture for v in LESSONS[4].variants} == {
        "pl_only", "nl_only", "mix"}
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


def test_verdict_picks_winner_margin_and_agreement():
    lesson = Lesson(7, "t", "?", (Variant("a", ()), Variant("b", ())), (),
                    (Metric("ppl", "min", ("a",)), Metric("acc", "max", ("a",), tie_rel=0.05),
                     Metric("missing", "min", ("a",))), "a wins")
    out = {o.metric: o for o in verdict(lesson, {"a": {"ppl": 10.0, "acc": 0.50},
                                                 "b": {"ppl": 12.0, "acc": 0.52}})}
    assert out["ppl"].winner == "a" and out["ppl"].agrees
    assert out["ppl"].margin_rel == pytest.approx(2 / 12)
    assert out["acc"].winner == "b" and out["acc"].agrees and "tie" in out["acc"].note
    assert out["missing"].agrees is None
    out = {o.metric: o for o in verdict(lesson, {"a": {"ppl": 13.0}, "b": {"ppl": 12.0}})}
    assert out["ppl"].winner == "b" and out["ppl"].agrees is False


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
    assert laptop == {"CPU": 2.5}  # Tune driver 0.5 + Train worker 1 + headroom for its Ray Data tasks
    assert max_concurrent(laptop, {"CPU": 3.0}, n_trials=2) == 1
    assert max_concurrent(laptop, {"CPU": 5.0}, n_trials=2) == 2
    with pytest.raises(ConfigError, match="needs 2.5 CPU"):
        max_concurrent(laptop, {"CPU": 2.0}, n_trials=2)  # would wait forever for its own data tasks
