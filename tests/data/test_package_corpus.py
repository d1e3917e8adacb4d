"""`cglab corpus build --source packages`: real installed code and docs, held out by package, filtered, deduped.

The test installs its own distributions (a `*.dist-info` with METADATA and RECORD beside the modules, on
`sys.path`), so the duplicates it counts are the ones it planted, whatever versions the registry serves today:
`alpha` vendors `bravo` (duplicates within training) and `delta` (held-out files that also sit in training)
byte for byte, as pip vendors rich and idna."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zstandard

from cglab.cli import main
from cglab.config import FilterConfig
from cglab.data.corpus import build_package_corpus
from cglab.data.filters import filter_reasons

TRAIN = ["alpha", "bravo", "charlie"]
HELD = ["delta", "echo"]
DESCRIPTION = "A package made by the test. " * 12  # > 200 characters: kept as a Package Descriptions document


def _module(pkg: str, i: int) -> str:
    """A small module whose text is unique to (pkg, i), every line under 60 characters (filter-clean at any
    max_line_length the tests use), with module and function docstrings long enough to be Pile documents."""
    return (
        f'"""Module {i} of the {pkg} package.\n\n'
        "It adds numbers and says so, for the corpus test.\n"
        '"""\n\n\n'
        f"def add_{i}(a, b):\n"
        f'    """Return a + b + {i}, as the {pkg} package does.\n\n'
        "    The docstring runs past one hundred and twenty\n"
        "    characters, so it is a Package Docstrings one.\n"
        '    """\n'
        f"    return a + b + {i}\n"
    )


def _install(site: Path, name: str, files: dict[str, str], license_: str = "MIT") -> None:
    """Write files under site/ and a dist-info that importlib.metadata reads as an installed distribution."""
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nLicense-Expression: {license_}\n\n{DESCRIPTION}\n"
    )
    record = [f"{rel},," for rel in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


N_BRAVO, N_DELTA, N_OWN = 5, 4, 3  # bravo's and delta's modules (alpha vendors all of them); each one's own


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """alpha, bravo, charlie (training) and delta, echo (held out), installed on sys.path for this test only."""
    site = tmp_path / "site"
    bravo = {f"bravo/m{i}.py": _module("bravo", i) for i in range(N_BRAVO)}
    delta = {f"delta/m{i}.py": _module("delta", i) for i in range(N_DELTA)}
    alpha = {f"alpha/m{i}.py": _module("alpha", i) for i in range(N_OWN)}
    alpha |= {f"alpha/_vendor/{k}": v for k, v in bravo.items() | delta.items()}
    _install(site, "alpha", alpha)
    _install(site, "bravo", bravo)
    _install(site, "charlie", {f"charlie/m{i}.py": _module("charlie", i) for i in range(N_OWN)})
    _install(site, "delta", delta)
    _install(site, "echo", {f"echo/m{i}.py": _module("echo", i) for i in range(N_OWN)})
    # a line of 200 characters: kept by CodeGen's filters, dropped by a max_line_length of 60
    _install(site, "foxtrot", {"foxtrot/long.py": _module("foxtrot", 0) + f"X = {'1 + ' * 49}1\n"})
    monkeypatch.syspath_prepend(str(site))
    return site


def _stack(path):
    return pq.read_table(path).to_pylist()


def _pile(path):
    raw = zstandard.ZstdDecompressor().decompress(open(path, "rb").read(), max_output_size=1 << 30)
    return [json.loads(line) for line in raw.decode().splitlines()]


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def test_package_corpus_holds_out_whole_packages_filtered_and_deduplicated(packages, tmp_path, capsys):
    out = tmp_path / "corpus"
    argv = ["corpus", "build", "--out", str(out), "--source", "packages", "--packages", ",".join(TRAIN + HELD)]
    assert main(argv + ["--heldout-packages", ",".join(HELD), "--shards", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((out / "summary.json").read_text()) == summary  # kept with the corpus (the study reads it)
    assert summary["packages"] == {"train": TRAIN, "heldout": HELD}
    stack = [_stack(f) for f in summary["stack"]["files"]]
    pile = [_pile(f) for f in summary["pile"]["files"]]
    train_code = [r for shard in stack[:-1] for r in shard]
    # held out by package: the last shard has only held-out packages, the others none of them
    assert {r["package"] for r in stack[-1]} == {"echo"}  # delta's files all duplicate alpha's vendored copies
    assert {r["package"] for r in train_code} == {"alpha", "charlie"}  # bravo's likewise, alpha read first
    assert {d["meta"]["package"] for d in pile[-1]} <= set(HELD) and pile[-1]
    assert not {d["meta"]["package"] for shard in pile[:-1] for d in shard} & set(HELD)
    # the Stack's columns, with package, path and licence
    r = stack[-1][0]
    assert r["lang"] == "Python" and r["max_stars_repo_path"].startswith("echo/") and r["license"] == "MIT"
    # exact dedup: no content twice in training, none on both sides; the counts say exactly what went
    hashes = [_sha(r["content"]) for r in train_code]
    assert len(hashes) == len(set(hashes)) and not set(hashes) & {_sha(r["content"]) for r in stack[-1]}
    assert len(train_code) == N_OWN + N_BRAVO + N_DELTA + N_OWN and len(stack[-1]) == N_OWN
    assert summary["dropped"]["code:duplicate"] == N_BRAVO  # bravo's modules, vendored in alpha
    assert summary["dropped"]["code:duplicate_of_training"] == N_DELTA  # delta's, vendored in alpha
    assert summary["stack"]["train"]["documents"] == len(train_code) and summary["stack"]["train"]["pretokens"] > 0
    # the CodeGen filters held for every kept document
    assert not any(filter_reasons([r["content"] for r in train_code + stack[-1]], FilterConfig()))


def test_filters_drop_and_count(packages, tmp_path):
    strict = FilterConfig(max_line_length=60)
    s = build_package_corpus(tmp_path / "c", ["charlie", "foxtrot", "echo"], heldout=["echo"], shards=2, filters=strict)
    assert s["dropped"]["code:max_line_length"] == 1  # foxtrot's one long line
    kept = _stack(s["stack"]["files"][0]) + _stack(s["stack"]["files"][1])
    assert {r["package"] for r in kept} == {"charlie", "echo"}
    assert max(len(line) for r in kept for line in r["content"].splitlines()) <= 60


def test_the_default_package_list_leaves_this_project_out():
    """`--source packages` with no list reads every installed distribution but cglab itself (installed editable
    here): the corpus is code no one here wrote."""
    from cglab.data.corpus import default_packages, installed_packages

    assert "cglab" in installed_packages() and "torch" in installed_packages()
    names = default_packages()
    assert "cglab" not in names and "torch" in names and len(names) == len(installed_packages()) - 1
