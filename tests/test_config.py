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


@pytest.mark.parametrize("overrides, field", [
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=3"], "parallel.pipeline_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=2", "parallel.world_size=3"], "parallel.world_size"),
    (["data.seq_length=4096"], "data.seq_length"),
    (["model.rotary_dim=32"], "model.rotary_dim"),
    (["model.rotary_dim=7"], "model.rotary_dim"),
    (["data.num_sentinels=2", "objective.max_spans=5"], "data.num_sentinels"),
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
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        from_dict({}, ["model.preset=tiny", *overrides])
    assert field in str(err.value)


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
