"""Readers: the micro corpus reads cleanly; every kind of bad input is skipped and counted under its reason."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cglab.config import ConfigError, SourceConfig
from cglab.data import readers as R


def _src(kind, path, subsets=None):
    return R.resolve_files([SourceConfig(name="s", kind=kind, paths=[str(path)], subsets=subsets)])[0]


def _read_all(src, max_bytes=1 << 20):
    return [r for f in range(len(src.files)) for r in R.read_file(src, f, max_bytes)]


def test_micro_corpus_reads_every_document(micro_corpus):
    for kind in ("pile", "stack"):
        src = _src(kind, f"{micro_corpus['out']}/{kind}")
        recs = _read_all(src)
        assert len(src.files) == 2
        assert len(recs) == micro_corpus[kind]["documents"]
        assert all(r.reason == "" and r.text for r in recs)
        keys = [r.key for r in recs]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
    pile = _read_all(_src("pile", f"{micro_corpus['out']}/pile"))
    assert {r.subset for r in pile} >= {"Python Docstrings", "Python Help Topics"}


def test_key_round_trip():
    k = R.make_key(3, 12345, 987654)
    assert R.split_key(k) == (3, 12345, 987654)
    assert R.make_key(0, 0, 1) < R.make_key(0, 1, 0) < R.make_key(1, 0, 0)


def _pile_lines():
    good = lambda t, n="Github": json.dumps({"text": t, "meta": {"pile_set_name": n}}).encode()  # noqa: E731
    return [
        good("first document"),
        b'{"text": "unterminated',  # malformed_json
        b'{"text": "bad \xff\xfe bytes", "meta": {}}',  # invalid_utf8
        b'{"meta": {"pile_set_name": "Github"}}',  # missing_field
        b'["a", "list"]',  # missing_field
        b'{"text": "lone \\ud800 surrogate"}',  # invalid_utf8 (after JSON decoding)
        b"",  # blank line: not a record
        good("x" * 5000),  # line_too_long at max_bytes=4096
        good("arxiv doc", "ArXiv"),
        good("last document"),
    ]


def test_pile_bad_lines_are_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(_pile_lines()) + b"\n")
    recs = _read_all(_src("pile", tmp_path / "a.jsonl"), max_bytes=4096)
    assert [r.text for r in recs if not r.reason] == ["first document", "arxiv doc", "last document"]
    assert Counter(r.reason for r in recs if r.reason) == {
        R.MALFORMED_JSON: 1,
        R.INVALID_UTF8: 2,
        R.MISSING_FIELD: 2,
        R.LINE_TOO_LONG: 1,
    }


def test_pile_subsets_select_by_set_name(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(_pile_lines()))  # no final newline: last line still read
    recs = _read_all(_src("pile", tmp_path / "a.jsonl", subsets=["ArXiv"]), max_bytes=4096)
    assert [r.text for r in recs if not r.reason] == ["arxiv doc"]
    assert Counter(r.reason for r in recs)[R.NOT_SELECTED] == 2


def test_truncated_zst_keeps_what_was_read_and_counts_the_rest(tmp_path):
    lines = b"".join(json.dumps({"text": f"doc {i} " + "y" * 200}).encode() + b"\n" for i in range(2000))
    blob = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "t.jsonl.zst").write_bytes(blob[: len(blob) // 2])
    recs = _read_all(_src("pile", tmp_path / "t.jsonl.zst"))
    ok = [r for r in recs if not r.reason]
    assert 0 < len(ok) < 2000 and ok[0].text.startswith("doc 0 ")
    assert [r.reason for r in recs if r.reason] == [R.TRUNCATED_FILE]


def test_multi_frame_zst_reads_all_frames(tmp_path):
    c = zstandard.ZstdCompressor()
    frames = [c.compress(json.dumps({"text": f"frame {i}"}).encode() + b"\n") for i in range(3)]
    (tmp_path / "m.jsonl.zst").write_bytes(b"".join(frames))
    assert [r.text for r in _read_all(_src("pile", tmp_path / "m.jsonl.zst"))] == ["frame 0", "frame 1", "frame 2"]


def test_not_zstd_at_all_is_a_corrupt_file(tmp_path):
    (tmp_path / "g.jsonl.zst").write_bytes(b"this is not zstd" * 100)
    assert [r.reason for r in _read_all(_src("pile", tmp_path / "g.jsonl.zst"))] == [R.CORRUPT_FILE]


def test_stack_bad_rows_and_files_are_counted(tmp_path):
    d = tmp_path / "stack"
    d.mkdir()
    pq.write_table(
        pa.table(
            {
                "content": pa.array([b"print(1)\n", b"bad \xff utf8", None, b"int main() {}\n"], pa.binary()),
                "lang": ["Python", "Python", "Python", "C"],
                "max_stars_repo_path": ["a.py", "b.py", "c.py", "d.c"],
            }
        ),
        d / "00.parquet",
    )
    pq.write_table(pa.table({"text": ["no content column"] * 3, "lang": ["Python"] * 3}), d / "01.parquet")
    good = d / "02.parquet"
    pq.write_table(pa.table({"content": ["x = 1\n"] * 50, "lang": ["Python"] * 50}), good)
    (d / "03.parquet").write_bytes(good.read_bytes()[:200])  # truncated
    (d / "04.parquet").write_bytes(b"")  # empty file

    recs = _read_all(_src("stack", d))
    assert Counter(r.reason for r in recs) == {
        "": 52,
        R.INVALID_UTF8: 1,
        R.MISSING_FIELD: 1,
        R.MISSING_COLUMN: 3,
        R.CORRUPT_FILE: 2,
    }
    only_c = _read_all(_src("stack", d, subsets=["C"]))
    assert [r.text for r in only_c if not r.reason] == ["int main() {}\n"]


def test_stack_missing_lang_column_only_matters_when_selecting(tmp_path):
    pq.write_table(pa.table({"content": ["a = 1\n", "b = 2\n"]}), tmp_path / "x.parquet")
    assert [r.reason for r in _read_all(_src("stack", tmp_path))] == ["", ""]
    assert [r.reason for r in _read_all(_src("stack", tmp_path, ["Python"]))] == [R.MISSING_COLUMN] * 2


def test_missing_path_names_the_config_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.paths\[0\].*nowhere"):
        R.resolve_files(
            [
                SourceConfig(name="ok", kind="pile", paths=[str(tmp_path)]),
                SourceConfig(name="bad", kind="pile", paths=[str(tmp_path / "nowhere")]),
            ]
        )
    with pytest.raises(ConfigError, match=r"paths\[0\].*\*\.parquet"):
        R.resolve_files([SourceConfig(name="g", kind="stack", paths=[str(tmp_path / "*.parquet")])])


def test_globs_and_dirs_expand_sorted_and_deduplicated(tmp_path):
    for n in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / n).write_text('{"text": "x"}\n')
    src = R.resolve_files([SourceConfig(name="g", kind="pile", paths=[str(tmp_path / "*.jsonl"), str(tmp_path)])])[0]
    assert [p.rsplit("/", 1)[1] for p in src.files] == ["a.jsonl", "b.jsonl"]
