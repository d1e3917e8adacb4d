from __future__ import annotations

import json

import pytest

from cglab.eval.generate import cut_at_stop, load_generator

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)
PROMPTS = ["def add(a, b):\n", "import os\n", "x"]


@pytest.fixture(scope="module")
def gen(tiny_hf_dir):
    return load_generator(tiny_hf_dir, batch_size=4)


def test_cut_at_stop():
    assert cut_at_stop("a\nb\ndef c", ["\ndef", "\nb"]) == ("a", True)
    assert cut_at_stop("abc", ["\n"]) == ("abc", False)


def test_batched_greedy_equals_one_at_a_time(gen):
    batched = gen.generate(PROMPTS, n=2, max_new_tokens=12)
    single = [gen.generate([p], max_new_tokens=12)[0][0] for p in PROMPTS]
    assert [len(o) for o in batched] == [2, 2, 2]
    assert [o[0] for o in batched] == single and [o[1] for o in batched] == single


def test_stop_strings_cut_decoded_text(gen):
    full = gen.generate(PROMPTS[:1], max_new_tokens=16)[0][0]
    assert len(full) > 6
    stop = full[3:6]
    cut = gen.generate(PROMPTS[:1], max_new_tokens=16, stop=[stop])[0][0]
    assert cut == full[: full.find(stop)]


def test_sampling_count_and_token_budget(gen):
    outs = gen.generate(PROMPTS, n=3, temperature=0.8, top_p=0.95, max_new_tokens=5)
    assert [len(o) for o in outs] == [3, 3, 3]
    short = gen.generate(PROMPTS, max_new_tokens=4)
    long = gen.generate(PROMPTS, max_new_tokens=12)
    for s, lo in zip(short, long):
        assert lo[0].startswith(s[0]) and len(s[0]) < len(lo[0])


def test_load_generator_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "missing")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"not": "hf"}))
    with pytest.raises(ValueError, match="neither an HF model directory"):
        load_generator(tmp_path / "ckpt")


def test_cli_run_all_suites(tiny_hf_dir, tmp_path, capsys):
    from cglab.cli import main

    out = tmp_path / "run.json"
    rc = main(
        [
            "eval",
            "run",
            "--checkpoint",
            str(tiny_hf_dir),
            "--suite",
            "humaneval,infill,nl",
            "--limit",
            "2",
            "--mtpb-subset",  # the tests' 3-problem file, not the published 115
            "--max-new-tokens",
            "6",
            "--infill-modes",
            "single",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res == json.loads(capsys.readouterr().out)
    assert res["humaneval"]["by_temperature"]["0.0"]["n_tasks"] == 2
    assert res["infill"]["single"]["n_tasks"] == 2
    # every pass@k in the output carries its conditions: sandbox mode and a count for every program status
    from cglab.eval.sandbox import isolation_mode

    for scored in (
        res["humaneval"]["by_temperature"]["0.0"],
        res["humaneval"]["best"]["pass@1"],
        res["infill"]["single"],
    ):
        assert scored["isolation"] == isolation_mode()
        assert set(scored["statuses"]) == {"passed", "failed", "timed_out", "sandbox_error"}
        assert sum(scored["statuses"].values()) == 2
    assert res["nl"]["nl"]["docs"] == 2 and res["nl"]["code"]["bits_per_byte"] > 0
    assert main(["eval", "run", "--checkpoint", str(tiny_hf_dir), "--suite", "humaneval,mbpp"]) == 2


def test_cli_run_mbpp_and_mtpb(tiny_hf_dir, tmp_path, capsys):
    import shutil
    from pathlib import Path

    from cglab.cli import main
    from cglab.eval.sandbox import isolation_mode

    data = Path(__file__).with_name("data")  # small files in the published MBPP / MTPB formats
    out = tmp_path / "run.json"
    rc = main(
        [
            "eval",
            "run",
            "--checkpoint",
            str(tiny_hf_dir),
            "--suite",
            "mbpp,mtpb",
            "--data-dir",
            str(data),
            "--limit",
            "2",
            "--mtpb-subset",  # the tests' 3-problem file, not the published 115
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    mbpp, mtpb = res["mbpp"]["by_temperature"]["0.0"], res["mtpb"]["by_temperature"]["0.0"]
    assert mbpp["n_tasks"] == 2 and list(mbpp["tasks"]) == ["11", "12"]
    assert mtpb["n_problems"] == 2 and mtpb["n_samples"] == 4  # two test cases each, one sample per case
    for scored, n in ((mbpp, 2), (mtpb, 4), (res["mbpp"]["best"]["pass@1"], 2), (res["mtpb"]["best"]["pass@1"], 4)):
        assert scored["isolation"] == isolation_mode()
        assert sum(scored["statuses"].values()) == n
    capsys.readouterr()
    # Missing and malformed data files fail before the model loads, naming the file (and line).
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "run", "--checkpoint", str(tiny_hf_dir), "--suite", "mtpb", "--data-dir", str(empty)]) == 2
    assert f"expected {empty / 'mtpb.jsonl'}" in capsys.readouterr().err
    assert main(["eval", "run", "--checkpoint", str(tiny_hf_dir), "--suite", "mbpp"]) == 2
    assert "--suite mbpp needs --data-dir DIR holding mbpp.jsonl" in capsys.readouterr().err
    shutil.copy(data / "mbpp.jsonl", empty / "mbpp.jsonl")
    lines = (data / "mtpb.jsonl").read_text().splitlines()
    (empty / "mtpb.jsonl").write_text("\n".join([lines[0], lines[1].replace('"inputs"', '"inputz"')]) + "\n")
    assert (
        main(["eval", "run", "--checkpoint", str(tiny_hf_dir), "--suite", "mbpp,mtpb", "--data-dir", str(empty)]) == 2
    )
    assert f"{empty / 'mtpb.jsonl'}:2: MTPB record has no 'inputs' field" in capsys.readouterr().err
