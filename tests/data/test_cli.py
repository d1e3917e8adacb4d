"""`cglab corpus build` and `cglab data inspect` through the real console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cglab.cli import main


def test_corpus_build_writes_pile_and_stack(tmp_path, capsys, monkeypatch):
    import cglab.data.corpus as corpus

    small = corpus.build_corpus
    monkeypatch.setattr(corpus, "build_corpus", lambda out, shards: small(out, 60_000, 80_000, shards))
    assert main(["corpus", "build", "--out", str(tmp_path), "--shards", "2", "--tokenizer"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["pile"]["files"]) == len(summary["stack"]["files"]) == 2
    assert all(f.endswith(".jsonl.zst") for f in summary["pile"]["files"])
    t = pq.read_table(summary["stack"]["files"][0])
    assert {"content", "lang", "max_stars_repo_path", "size"} <= set(t.column_names)
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file() and summary["tokenizer"]["vocab_size"] == 1024


def test_inspect_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "inspect", f"pile:{tmp_path}/nothing"]) == 2
    assert "SOURCE[0].paths[0]" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_counts_by_reason(tmp_path):
    """In a process of its own: the command starts a private Ray (none is running there), and the process exits 0
    after its shutdown (tests/data's shared Ray may be up in this one, and the command would borrow it)."""
    (tmp_path / "p.jsonl").write_bytes(
        b'{"text": "ok doc\\n"}\n{"text": broken\n{"text": ""}\n{"text": "ok doc\\n"}\n{"text": "\xff"}\n'
    )
    pq.write_table(pa.table({"content": ["x = 1\n", "y" * 2000], "lang": ["Python", "Python"]}), tmp_path / "s.parquet")
    cmd = [sys.executable, "-m", "cglab.cli", "data", "inspect", str(tmp_path / "p.jsonl"), str(tmp_path / "s.parquet")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    pile, stack = report["sources"].values()
    assert pile["read"] == 5 and pile["kept"] == 1
    assert pile["skipped"] == {"duplicate": 1, "empty": 1, "invalid_utf8": 1, "malformed_json": 1}
    assert stack["skipped"] == {"avg_line_length": 1} and stack["subsets"] == {"Python": 1}
    assert report["total"]["read"] == 7 and report["total"]["kept"] == 2
