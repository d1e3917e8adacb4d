"""Config: presets, overrides, and invalid configs failing with the field named."""

import pytest

from cglab.config import PRESETS, ConfigError, flatten, from_dict, load_config


def test_presets_match_released_shapes():
    m = from_dict({}, ["model.preset=codegen2-1B"]).model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.rotary_dim, m.vocab_size) == (2048, 16, 16, 64, 51200)
    m16 = from_dict({}, ["model.preset=codegen2-16B"]).model
    assert (m16.hidden_size, m16.num_layers, m16.num_attention_heads) == (6144, 34, 24)
    for name in PRESETS:
        from_dict({}, [f"model.preset={name}", "data.seq_length=128"])


def test_overrides_are_typed_and_win_over_presets():
    c = from_dict({}, ["model.preset=tiny", "model.num_layers=4", "train.lr=3e-4", "model.document_masking=false"])
    assert c.model.num_layers == 4 and c.train.lr == 3e-4 and c.model.document_masking is False


_FIRST, _LAST = "parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage"
_pp4 = ["parallel.pipeline_model_parallel_size=4"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
        (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size"),
        (["parallel.tensor_model_parallel_size=2", "parallel.world_size=3"], "parallel.world_size"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),  # TP=1
        (
            ["parallel.sequence_parallel=true", "parallel.tensor_model_parallel_size=2", "data.seq_length=63"],
            "parallel.sequence_parallel",
        ),
        (["data.seq_length=4096"], "data.seq_length"),
        (["model.rotary_dim=32"], "model.rotary_dim"),
        (["model.rotary_dim=7"], "model.rotary_dim"),
        (["data.num_sentinels=2"], "data.num_sentinels"),
        (["objective.max_spans=5"], "objective.max_spans"),
        (
            ["objective.kind=ul2", "objective.ul2_denoisers=[{name: R, prob: 1, ratio: [0.5, 0.2]}]"],
            "objective.ul2_denoisers.0",
        ),
        (["train.lr=-1"], "train.lr"),
        (["objective.kind=bogus"], "objective.kind"),
        (["model.preset=codegen9"], "model"),
        (["train.unknown_field=1"], "train.unknown_field"),
        (["train.global_batch_size=3"], "train.global_batch_size"),
        (["model.compile_fusions=true", "model.attention_backend=local"], "model.compile_fusions"),
        (["model.sdpa_kernel=cudnn", "model.attention_backend=local"], "model.sdpa_kernel"),
        (["model.sdpa_kernel=fa9"], "model.sdpa_kernel"),
        (["train.fold_grad_scale=true", "parallel.distributed_optimizer=true"], "train.fold_grad_scale"),
        (["train.fold_grad_scale=true", "train.fused_adam=false"], "train.fold_grad_scale"),
        # uneven pipeline stages whose middle stages do not split evenly, or that leave a stage empty
        (["model.num_layers=10", *_pp4, f"{_FIRST}=2"], _FIRST),
        (["model.num_layers=10", *_pp4, f"{_FIRST}=4", f"{_LAST}=3"], _FIRST),
        (["model.num_layers=10", "parallel.pipeline_model_parallel_size=2", f"{_LAST}=10"], _LAST),
        (["model.num_layers=10", f"{_LAST}=3"], _LAST),  # PP=1
        (["model.num_layers=10", *_pp4, f"{_FIRST}=auto"], _FIRST),  # auto on one end only
        (["model.num_layers=3", *_pp4, f"{_FIRST}=auto", f"{_LAST}=auto"], _FIRST),
        (["model.recompute=selective", "model.recompute_num_layers=2"], "model.recompute_num_layers"),
        (["model.recompute_method=block"], "model.recompute_method"),
        (["model.num_layers=3", "model.recompute=full", "model.recompute_num_layers=2"], "model.recompute_num_layers"),
        (["model.recompute=bogus"], "model.recompute"),
        (
            ["model.recompute=full", "model.attention_backend=flex", "parallel.use_gpu=true"],
            "model.attention_backend",
        ),
        (["train.stop_at=raw_tokens"], "train.token_budget"),  # a token stop needs its budget
        (["train.token_budget=1000000"], "train.token_budget"),  # a budget the step count would ignore
        (["train.stop_at=loss_tokens", "train.token_budget=102399"], "train.token_budget"),  # < 100 steps of 4 x 256
        (["train.stop_at=tokens", "train.token_budget=102400"], "train.stop_at"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        from_dict({}, ["model.preset=tiny", *overrides])
    assert field in str(err.value)


@pytest.mark.parametrize(
    "overrides, stages",
    [
        (["model.num_layers=8", *_pp4], (2, 2, 2, 2)),
        (["model.num_layers=10", *_pp4, f"{_FIRST}=2", f"{_LAST}=2"], (2, 3, 3, 2)),
        (["model.num_layers=10", *_pp4, f"{_FIRST}=1"], (1, 3, 3, 3)),  # the last is one of the even rest
        (["model.num_layers=10", *_pp4, f"{_LAST}=4"], (2, 2, 2, 4)),
        (["model.num_layers=10", "parallel.pipeline_model_parallel_size=2", f"{_LAST}=3"], (7, 3)),
        (["model.num_layers=10", *_pp4, f"{_FIRST}=auto", f"{_LAST}=auto"], (2, 3, 3, 2)),
        (["model.num_layers=8", *_pp4, f"{_FIRST}=auto", f"{_LAST}=auto"], (2, 2, 2, 2)),  # even when it divides
        (["model.num_layers=5", *_pp4, f"{_FIRST}=auto", f"{_LAST}=auto"], (1, 1, 1, 2)),
        (["model.num_layers=7", "parallel.pipeline_model_parallel_size=2", f"{_FIRST}=auto", f"{_LAST}=auto"], (3, 4)),
        (
            ["model.preset=codegen2-16B", *_pp4, f"{_FIRST}=auto", f"{_LAST}=auto", "data.num_sentinels=64"],
            (8, 9, 9, 8),
        ),
    ],
)
def test_pipeline_stages_even_uneven_and_auto(overrides, stages):
    """The layers on each stage, as Megatron-Core splits them from the first/last-stage counts (the stages between
    split the rest evenly); the parallel tests check Megatron builds these."""
    assert from_dict({}, ["model.preset=tiny", *overrides]).pipeline_stages == stages


def test_valid_defaults_do_not_raise():
    cfg = from_dict({}, ["model.preset=tiny"])
    assert cfg.world_size == 1 and cfg.model.head_dim == 16 and cfg.model.ffn_size == 256


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  preset: tiny\n  num_layers: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_validates():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].joinpath("jobs", "configs").glob("*.yaml"))
    assert files, "jobs/configs/ holds the shipped configs"
    for f in files:
        load_config(f)


def test_flatten_gives_dotted_scalars():
    flat = flatten(from_dict({}, ["model.preset=tiny"]))
    assert flat["model.hidden_size"] == 64 and "train.lr" in flat


def test_max_spans_is_refused_and_says_what_replaced_it(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("model: {preset: tiny}\nobjective: {max_spans: 32}\n")
    with pytest.raises(
        ConfigError,
        match=r"objective\.max_spans: removed; the number of spans now follows from "
        r"the drawn mask ratio",
    ):
        load_config(p)


@pytest.mark.parametrize(
    "overrides, k, label",
    [
        (["data.seq_length=2048"], 75, "span corruption"),  # ratio up to 0.35, mean span 8.5
        (["data.seq_length=2048", "objective.kind=ul2"], 227, "UL2 denoiser X_dense"),  # 50%, mean span 3
        (
            ["data.seq_length=2048", "objective.kind=ul2", "objective.ul2_denoisers=[{name: R, prob: 1}]"],
            89,
            "UL2 denoiser R",
        ),
    ],
)
def test_too_few_sentinels_name_the_field_and_the_spans_needed(overrides, k, label):
    base = ["model.preset=tiny", "model.max_position_embeddings=2048"]
    with pytest.raises(ConfigError) as err:
        from_dict({}, [*base, *overrides, f"data.num_sentinels={k - 1}"])
    assert (
        f"data.num_sentinels: {k - 1} sentinels cannot label the {k} spans {label} needs at data.seq_length=2048"
    ) in str(err.value)
    from_dict({}, [*base, *overrides, f"data.num_sentinels={k}"])  # exactly enough


def test_objectives_that_corrupt_nothing_need_no_sentinels():
    for kind in ("clm", "infill"):
        cfg = from_dict({}, ["model.preset=tiny", f"objective.kind={kind}", "data.num_sentinels=1"])
        assert cfg.objective.corrupting() == ()
    assert from_dict({}, ["model.preset=tiny", "objective.causal_prob=1.0", "data.num_sentinels=1"])


def test_spans_needed_is_the_largest_count_of_a_unit_that_fits():
    from cglab.config import span_count, spans_needed

    for ratio_max, span_len, seq in [
        (0.35, (1, 16), 2048),
        (0.5, (2, 4), 2048),
        (0.15, (24, 40), 8192),
        (0.9, (1, 1), 64),
    ]:
        k = spans_needed(ratio_max, span_len, seq)
        mean = sum(span_len) / 2
        sizes = [
            n for n in range(seq + 1) if n + 1 + 3 * span_count(round(ratio_max * n), mean) <= seq
        ]  # units that fit, plain Python
        assert k == max(span_count(round(ratio_max * n), mean) for n in sizes)


@pytest.mark.parametrize("preset", ["laptop", "study", "1gpu", "cluster"])
def test_every_lesson_variant_validates_at_every_preset(preset):
    from cglab.tune.lessons import LESSONS, get_lesson
    from cglab.tune.presets import base_config

    base = base_config(preset)
    for n in sorted(LESSONS):
        configs = get_lesson(n).configs(base)
        assert configs
        for cfg in configs.values():
            for cor in cfg.objective.corrupting():
                assert cfg.data.num_sentinels >= cor.spans_needed(cfg.data.seq_length)


def test_a_token_budget_of_100_full_steps_is_accepted():
    t = from_dict({}, ["model.preset=tiny", "train.stop_at=raw_tokens", "train.token_budget=102400"]).train
    assert (t.stop_at, t.token_budget, t.global_batch_size) == ("raw_tokens", 102400, 4)
