"""Global exact dedup: copies in different files/blocks/sources are found; the first in record order survives."""

from __future__ import annotations

import json

import pytest

from cglab.config import FilterConfig, SourceConfig
from cglab.data import readers
from cglab.data.dedup import DUPLICATE, content_hashes, duplicate_mask, find_survivors
from cglab.data.inspect import inspect_sources
from cglab.data.pipeline import scan_dataset

pytestmark = pytest.mark.slow

DUP = "def shared():\n    return 'the same file everywhere'\n"


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "Github"}}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("dedup")
    # a.jsonl: the dup at record 3; b.jsonl: at record 0 and 2 (later file); c.jsonl in another source.
    _write(d / "a.jsonl", ["unique a0\n", "unique a1\n", "unique a2\n", DUP, "another a4\n"])
    _write(d / "b.jsonl", [DUP, "unique b1\n", DUP, "another a4\n"])
    (d / "other").mkdir()
    _write(d / "other" / "c.jsonl", [DUP, "unique c1\n"])
    cfgs = [
        SourceConfig(name="first", kind="pile", paths=[str(d / "*.jsonl")]),
        SourceConfig(name="second", kind="pile", paths=[str(d / "other")]),
    ]
    return readers.resolve_files(cfgs)


def test_survivor_is_the_first_copy_across_files_and_sources(ray_local, sources):
    survivors = find_survivors(scan_dataset(sources, FilterConfig()))
    sha = content_hashes([DUP, "another a4\n"])
    assert survivors == {sha[0]: readers.make_key(0, 0, 3), sha[1]: readers.make_key(0, 0, 4)}
    # Same answer when the sources are scanned in the other order: the key decides, not arrival.
    assert find_survivors(scan_dataset(sources[::-1], FilterConfig())) == survivors


def test_duplicate_mask():
    s = {"h": 5}
    assert duplicate_mask(["h", "h", "x"], [5, 9, 1], s).tolist() == [False, True, False]
    assert duplicate_mask(["h"], [9], {}).tolist() == [False]


def test_inspect_counts_duplicates_per_source(ray_local, sources):
    report = inspect_sources(sources, FilterConfig())
    first, second = report["sources"]["first"], report["sources"]["second"]
    assert (first["read"], first["kept"], first["skipped"]) == (9, 6, {DUPLICATE: 3})
    assert (second["read"], second["kept"], second["skipped"]) == (2, 1, {DUPLICATE: 1})
    assert report["total"] == {"read": 11, "kept": 7, "skipped": {DUPLICATE: 4}}
    assert inspect_sources(sources, FilterConfig(), dedup=False)["total"]["kept"] == 11
