from __future__ import annotations

import random

import pytest

from cglab.eval import infill
from cglab.eval.humaneval import load_problems

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_task_counts_match_published(problems, mode):
    tasks = infill.derive_tasks(problems, mode)
    assert len(tasks) == infill.PUBLISHED_COUNTS[mode]
    assert len({t.task_id for t in tasks}) == len(tasks)


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_tasks_reassemble_the_canonical_program(problems, mode):
    for t in infill.derive_tasks(problems, mode):
        p = problems[t.problem_id]
        assert t.prefix + t.middle + t.suffix == p["prompt"] + p["canonical_solution"]
        assert t.middle.strip()
        if mode == "single":
            assert t.middle.count("\n") <= 1


def test_prompt_format_and_middle_extraction(problems):
    t = infill.derive_tasks(problems, "single")[0]
    prompt = infill.infill_prompt(t)
    assert prompt == t.prefix + "<mask_1>" + t.suffix + "<|endoftext|><sep><mask_1>"
    assert infill.extract_middle("    x = 1\n<eom>junk") == "    x = 1\n"
    assert infill.extract_middle("    y\n<|endoftext|>more") == "    y\n"
    assert infill.extract_middle("no end") == "no end"
    with pytest.raises(ValueError, match="single"):
        infill.derive_tasks(problems, "random-span")


@pytest.mark.slow
def test_canonical_middles_pass_and_wrong_middles_fail(problems):
    rng = random.Random(0)
    tasks = rng.sample(infill.derive_tasks(problems, "single"), 24) + rng.sample(
        infill.derive_tasks(problems, "multi"), 24
    )
    good = infill.score_middles(tasks, [[t.middle] for t in tasks], problems)
    assert good["pass@1"] == 1.0 and good["n_tasks"] == 48
    broken = infill.score_middles(tasks, [["    raise RuntimeError('wrong')\n"] for t in tasks], problems)
    assert broken["pass@1"] < 0.5


@pytest.mark.slow
def test_scores_report_status_counts_and_isolation(problems):
    from cglab.eval.sandbox import Limits, isolation_mode

    task = infill.derive_tasks({"HumanEval/0": problems["HumanEval/0"]}, "single")[0]
    indent = task.middle[: len(task.middle) - len(task.middle.lstrip())]
    loop = f"{indent}while True:\n{indent}    pass\n" + task.middle  # runs forever before the right line
    res = infill.score_middles(
        [task], [[task.middle, f"{indent}raise RuntimeError('wrong')\n", loop]], problems, limits=Limits(timeout_s=8)
    )
    assert res["pass@1"] == pytest.approx(1 / 3)
    assert res["statuses"] == {"passed": 1, "failed": 1, "timed_out": 1, "sandbox_error": 0}
    assert res["isolation"] == isolation_mode()


@pytest.mark.slow
def test_end_to_end_with_tiny_model(tiny_hf_dir):
    from cglab.eval.generate import load_generator

    gen = load_generator(tiny_hf_dir, batch_size=4)
    res = infill.evaluate(gen, "multi", limit=3, max_new_tokens=8)
    assert res["n_tasks"] == 3 and res["mode"] == "multi" and 0.0 <= res["pass@1"] <= 1.0


@pytest.mark.slow
def test_tokenizer_without_sentinels_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CodeGenConfig, CodeGenForCausalLM, PreTrainedTokenizerFast

    from cglab.eval.generate import HFGenerator

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["def f(): pass"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    model = CodeGenForCausalLM(
        CodeGenConfig(vocab_size=300, n_positions=64, n_embd=16, n_layer=1, n_head=2, rotary_dim=4)
    )
    with pytest.raises(ValueError, match="<mask_1>"):
        infill.evaluate(HFGenerator(model, fast), "single", limit=1)
