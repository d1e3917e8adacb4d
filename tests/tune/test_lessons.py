import pytest

from cglab.config import ConfigError
from cglab.tune.lessons import (
    CODE_BPB,
    EQUIVALENCE,
    FLOPS,
    INFILL_BPB,
    LESSONS,
    LOSS_TOKENS,
    NL_BPB,
    NON_INFERIORITY,
    RAW_TOKENS,
    SUPERIORITY,
    UNIQUE_TOKENS,
    Contrast,
    Lesson,
    Metric,
    Variant,
    get_lesson,
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


def test_each_lesson_declares_the_papers_claims_as_fixed_contrasts():
    """The contrasts are declared in code (before any run), name variants of their lesson and decide on bits
    per byte with a positive margin; each paper claim has its test."""
    for lesson in LESSONS.values():
        names = {v.name for v in lesson.variants}
        assert lesson.contrasts, lesson.number
        for c in lesson.contrasts:
            assert {c.a, c.b} <= names and c.metric.endswith("_bpb") and c.margin > 0 and c.claim, c
            assert lesson.metric(c.metric).goal == "min"
        assert lesson.held_equal in (RAW_TOKENS, LOSS_TOKENS, FLOPS, UNIQUE_TOKENS)
    tests = {n: {(c.a, c.b, c.metric, c.test) for c in les.contrasts} for n, les in LESSONS.items()}
    for obj in ("codegen2", "ul2"):  # "no consistent gain": equivalence, per objective, code and infill
        assert (f"prefix_lm-{obj}", f"causal-{obj}", CODE_BPB, EQUIVALENCE) in tests[1]
        assert (f"prefix_lm-{obj}", f"causal-{obj}", INFILL_BPB, EQUIVALENCE) in tests[1]
    assert ("clm", "infill-r0.5", CODE_BPB, SUPERIORITY) in tests[2]  # not a free lunch
    assert ("codegen2-file_level", "clm", CODE_BPB, NON_INFERIORITY) in tests[3]
    assert tests[4] == {("mix", "pl_only", CODE_BPB, EQUIVALENCE), ("mix", "nl_only", NL_BPB, EQUIVALENCE)}
    assert tests[5] == {("epochs-5", "epochs-1", CODE_BPB, SUPERIORITY)}
    assert not LESSONS[5].equal_compute and LESSONS[5].held_equal == UNIQUE_TOKENS
    assert get_lesson(2, infill_rate=0.25).contrasts[0].b == "infill-r0.25"


@pytest.mark.parametrize(
    "contrast, match",
    [
        (Contrast("a", "z", "m", SUPERIORITY, 0.1), "no variant 'z'"),
        (Contrast("a", "a", "m", SUPERIORITY, 0.1), "itself"),
        (Contrast("a", "b", "other", SUPERIORITY, 0.1), "metric 'other'"),
        (Contrast("a", "b", "m", "better", 0.1), "test 'better'"),
        (Contrast("a", "b", "m", EQUIVALENCE, 0.0), "margin 0.0"),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_contrast(contrast, match):
    with pytest.raises(ConfigError, match=f"lesson 7 contrast '{contrast.name}'.*{match}"):
        Lesson(7, "t", "?", (Variant("a", ()), Variant("b", ())), (), (Metric("m", "min"),), "", contrasts=(contrast,))


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
    # every study trial: its default seeds (at least 3), and lesson 5's five epochs repeat its base run's unique tokens
    study = base_config("study")
    assert len(PRESETS["study"].seeds) >= 3
    assert get_lesson(5).config_for("epochs-5", study).train.train_steps == 5 * study.train.train_steps
