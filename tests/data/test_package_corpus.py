"""`cglab corpus build --source packages`: real installed code and docs, held out by package, filtered, deduped.

pip vendors idna and rich byte for byte (pip/_vendor/...), which gives real duplicates: rich's vendored copies in
training, idna's held-out files that also sit in training."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import zstandard

from cglab.cli import main
from cglab.config import FilterConfig
from cglab.data.corpus import build_package_corpus, corpus_sources
from cglab.data.filters import filter_reasons

PACKAGES = "pip,rich,iniconfig,idna,pluggy"
HELD = {"idna", "pluggy"}


def _stack(path):
    return pq.read_table(path).to_pylist()


def _pile(path):
    raw = zstandard.ZstdDecompressor().decompress(open(path, "rb").read(), max_output_size=1 << 30)
    return [json.loads(line) for line in raw.decode().splitlines()]


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def test_package_corpus_holds_out_whole_packages_filtered_and_deduplicated(tmp_path, capsys):
    from cglab.tune.heldout import split_sources

    assert (
        main(
            [
                "corpus",
                "build",
                "--out",
                str(tmp_path),
                "--source",
                "packages",
                "--packages",
                PACKAGES,
                "--heldout-packages",
                ",".join(sorted(HELD)),
                "--shards",
                "3",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary  # kept with the corpus (the study reads it)
    assert summary["packages"] == {"train": ["pip", "rich", "iniconfig"], "heldout": ["idna", "pluggy"]}
    stack = [_stack(f) for f in summary["stack"]["files"]]
    pile = [_pile(f) for f in summary["pile"]["files"]]
    train_code = [r for shard in stack[:-1] for r in shard]
    # held out by package: the last shard has only held-out packages, the others none of them
    assert {r["package"] for r in stack[-1]} == {"pluggy"}  # idna's files all duplicate pip's vendored copies
    assert {r["package"] for r in train_code} == {"pip", "rich", "iniconfig"}
    assert {d["meta"]["package"] for d in pile[-1]} <= HELD and pile[-1]
    assert not {d["meta"]["package"] for shard in pile[:-1] for d in shard} & HELD
    # the Stack's columns, with package, path and licence
    r = stack[-1][0]
    assert r["lang"] == "Python" and r["max_stars_repo_path"].startswith("pluggy/") and r["license"] == "MIT"
    # exact dedup: no content twice in training, none on both sides; the counts say what went
    hashes = [_sha(r["content"]) for r in train_code]
    assert len(hashes) == len(set(hashes)) and not set(hashes) & {_sha(r["content"]) for r in stack[-1]}
    assert summary["dropped"]["code:duplicate"] >= 40  # rich's files vendored in pip
    assert summary["dropped"]["code:duplicate_of_training"] >= 10  # idna's, vendored in pip
    assert summary["stack"]["train"]["documents"] == len(train_code) and summary["stack"]["train"]["pretokens"] > 0
    # the CodeGen filters held for every kept document
    assert not any(filter_reasons([r["content"] for r in train_code + stack[-1]], FilterConfig()))
    # the sweep's held-out split (the last file of each source) is exactly the held-out packages
    _, held = split_sources(corpus_sources(tmp_path), tmp_path / "held", max_docs=10_000)
    code = [json.loads(line)["text"] for line in open(held.code_path)]
    assert code and {_sha(t) for t in code} <= {_sha(r["content"]) for r in stack[-1]}


def test_filters_drop_and_count(tmp_path):
    strict = FilterConfig(max_line_length=60)
    s = build_package_corpus(tmp_path, ["iniconfig", "pluggy"], heldout=["pluggy"], shards=2, filters=strict)
    assert s["dropped"]["code:max_line_length"] > 0
    kept = _stack(s["stack"]["files"][0]) + _stack(s["stack"]["files"][1])
    assert kept and max(len(line) for r in kept for line in r["content"].splitlines()) <= 60


def test_the_default_package_list_leaves_this_project_out():
    """`--source packages` with no list reads every installed distribution but cglab itself (installed editable
    here): the corpus is code no one here wrote."""
    from cglab.data.corpus import default_packages, installed_packages

    assert "cglab" in installed_packages() and "torch" in installed_packages()
    names = default_packages()
    assert "cglab" not in names and "torch" in names and len(names) == len(installed_packages()) - 1
