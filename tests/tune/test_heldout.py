"""The sweep's held-out inputs (cglab.tune.sweep.prepare_base): the split itself is cglab.data.heldout's
(tests/data/test_heldout.py); here, what a sweep refuses and what it falls back to, and that every variant of a
lesson shares one split."""

import json

import pytest

from cglab.config import ConfigError


def _only(sources, kinds):
    return [s for s in sources if s["kind"] in kinds]


def _base(sources, *overrides):
    from cglab.tune.presets import base_config

    return base_config("laptop", overrides=[f"data.sources={json.dumps(sources)}", *overrides])


def test_sweep_without_heldout_texts_refuses_before_any_work(micro_sources, tmp_path):
    from cglab.tune.sweep import prepare_base

    with pytest.raises(ConfigError, match=r"eval\.allow_builtin_texts: no held-out nl documents.*no pile source"):
        prepare_base(_base(_only(micro_sources, ("stack",))), tmp_path)
    assert not (tmp_path / "tokenizer").exists()  # refused before the tokenizer was trained
    with pytest.raises(ConfigError, match=r"eval\.allow_builtin_texts: no held-out nl or code .*holdout=False"):
        prepare_base(_base(micro_sources), tmp_path, holdout=False)


def test_builtin_texts_only_when_allowed_and_named(micro_sources, micro_tokenizer, tmp_path, caplog):
    from cglab.tune.evaluate import text_sources, text_tags
    from cglab.tune.sweep import prepare_base

    tok = f"data.tokenizer.path={json.dumps(str(micro_tokenizer.path))}"
    cache = f"data.cache_path={json.dumps(str(tmp_path / 'cache'))}"
    # code but no NL source: the NL part needs the flag, and the warning and tags say what fell back
    code_only = _base(_only(micro_sources, ("stack",)), "eval.allow_builtin_texts=true", tok, cache)
    with caplog.at_level("WARNING", logger="cglab.tune.sweep"):
        _, nl, code = prepare_base(code_only, tmp_path / "allowed")
    assert nl is None and code is not None
    assert "scoring nl on cglab.eval.nl.builtin_texts" in caplog.text
    assert text_tags(text_sources(nl, code, True)) == {
        "eval.texts": "partial",
        "eval.heldout": "nl:builtin,code:heldout",
    }
    assert text_tags(text_sources(None, None, True)) == {
        "eval.texts": "builtin",
        "eval.heldout": "nl:builtin,code:builtin",
    }
    assert text_tags(text_sources("nl.jsonl", "code.jsonl", False)) == {
        "eval.texts": "heldout",
        "eval.heldout": "nl:heldout,code:heldout",
    }


def test_every_variant_of_a_lesson_shares_the_sweeps_split(micro_sources, micro_tokenizer, tmp_path):
    """Lesson 4's variants weigh the sources differently (pl_only, nl_only, mix); the prepared corpus holds every
    source, so each variant's trial finds the split the sweep scored on and skips exactly it."""
    from cglab.data.pipeline import prepare_data
    from cglab.tune.lessons import get_lesson
    from cglab.tune.sweep import prepare_base

    tok = f"data.tokenizer.path={json.dumps(str(micro_tokenizer.path))}"
    cache = f"data.cache_path={json.dumps(str(tmp_path / 'cache'))}"
    base, nl, code = prepare_base(_base(micro_sources, tok, cache), tmp_path / "inputs")
    assert nl and code and base.eval.holdout
    lesson = get_lesson(4)
    splits = {prepare_data(lesson.config_for(v.name, base, 0)).heldout for v in lesson.variants}
    assert len(splits) == 1 and nl.startswith(splits.pop())
