"""The embedded micro corpus: a few MB of Pile-shaped NL and Stack-shaped code, built from the local Python install.

- micro Pile: `pile/NN.jsonl.zst`, rows `{"text", "meta": {"pile_set_name"}}`. Text is English prose from the
  interpreter itself: pydoc's help topics ("Python Help Topics") and module/class/function docstrings
  ("Python Module Docs", "Python Docstrings").
- micro Stack: `stack/NN.parquet`, columns `content`, `lang`, `max_stars_repo_path`, `size`, `ext`, `hexsha`,
  from the standard library's own sources (Python, plus whatever C/shell/JSON/TOML files ship with it).

Deterministic: the same interpreter gives byte-identical files (sorted walks, no timestamps).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from pathlib import Path

LANGS = {".py": "Python", ".c": "C", ".h": "C", ".sh": "Shell", ".json": "JSON", ".toml": "TOML",
         ".html": "HTML", ".css": "CSS", ".js": "JavaScript", ".f90": "FORTRAN"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for r, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [Path(r) / f for f in sorted(files) if Path(f).suffix in LANGS]
    return out


def _docs(files: list[Path], budget: int) -> list[tuple[str, str]]:
    """(pile_set_name, text) documents, at most `budget` characters in all."""
    docs: list[tuple[str, str]] = []
    try:
        from pydoc_data.topics import topics
        for k in sorted(topics):  # at most a third of the budget, so docstrings are always in the mix
            if sum(len(t) for _, t in docs) < budget // 3:
                docs.append(("Python Help Topics", topics[k]))
    except ImportError:
        pass
    for f in files:
        if sum(len(t) for _, t in docs) >= budget:
            break
        if f.suffix != ".py":
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = ast.get_docstring(tree)
        if mod and len(mod) > 80:
            docs.append(("Python Module Docs", mod))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 120:
                    docs.append(("Python Docstrings", f"{node.name}\n\n{d}"))
    out, total = [], 0
    for d in docs:
        if total >= budget:
            break
        out.append(d)
        total += len(d[1])
    return out


def _code(files: list[Path], budget: int) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rows, total = [], 0
    # Interleave by language so every shard holds some of each, then fill the budget.
    for f in files:
        if total >= budget:
            break
        try:
            raw = f.read_bytes()
        except OSError:
            continue
        if len(raw) > 24_000:  # many small files: the Stack has far more documents than bytes suggest
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        rel = f.relative_to(root).as_posix()
        rows.append(dict(content=text, lang=LANGS[f.suffix], max_stars_repo_path=f"cpython/Lib/{rel}",
                         max_stars_repo_name="python/cpython", size=len(raw), ext=f.suffix.lstrip("."),
                         hexsha=hashlib.sha1(raw).hexdigest()))
        total += len(raw)
    return rows


def build_corpus(out_dir: str | Path, nl_chars: int = 1_500_000, code_bytes: int = 3_000_000,
                 shards: int = 4) -> dict:
    """Write `out_dir/pile/*.jsonl.zst` and `out_dir/stack/*.parquet`; return a summary (paths, counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    out = Path(out_dir)
    (out / "pile").mkdir(parents=True, exist_ok=True)
    (out / "stack").mkdir(parents=True, exist_ok=True)
    files = _stdlib_files()
    py = [f for f in files if f.suffix == ".py"]
    other = [f for f in files if f.suffix != ".py"]
    docs = _docs(py, nl_chars)
    rows = _code(py, int(code_bytes * 0.85)) + _code(other, int(code_bytes * 0.15))

    cctx = zstandard.ZstdCompressor(level=3)
    pile_files = []
    for s in range(shards):
        part = docs[s::shards]  # round robin: each shard mixes every pile_set_name
        payload = "".join(json.dumps({"text": t, "meta": {"pile_set_name": n}}) + "\n" for n, t in part)
        p = out / "pile" / f"{s:02d}.jsonl.zst"
        p.write_bytes(cctx.compress(payload.encode("utf-8")))
        pile_files.append(str(p))
    stack_files = []
    for s in range(shards):
        part = rows[s::shards]
        table = pa.Table.from_pylist(part) if part else pa.table({"content": pa.array([], pa.string())})
        p = out / "stack" / f"{s:02d}.parquet"
        pq.write_table(table, p, row_group_size=256)
        stack_files.append(str(p))
    return dict(out=str(out), pile=dict(files=pile_files, documents=len(docs)),
                stack=dict(files=stack_files, documents=len(rows)))


def corpus_sources(corpus_dir: str | Path) -> list[dict]:
    """SourceConfig dicts for a built micro corpus (for configs, demos and tests)."""
    d = Path(corpus_dir)
    return [dict(name="pile", kind="pile", paths=[str(d / "pile")]),
            dict(name="stack", kind="stack", paths=[str(d / "stack")])]


def train_corpus_tokenizer(corpus_dir: str | Path, out_dir: str | Path, vocab_size: int = 1024,
                           num_sentinels: int = 16, max_whitespace_run: int = 32, train_docs: int = 2000):
    """Train the byte-level BPE on a sample of a built micro corpus and save it to out_dir."""
    from cglab.config import DataConfig, SourceConfig, TokenizerConfig
    from cglab.data.pipeline import sample_texts
    from cglab.data.tokenizer import train_tokenizer

    dcfg = DataConfig(sources=[SourceConfig(**s) for s in corpus_sources(corpus_dir)],
                      tokenizer=TokenizerConfig(vocab_size=vocab_size, train_docs=train_docs,
                                                max_whitespace_run=max_whitespace_run),
                      num_sentinels=num_sentinels)
    tok = train_tokenizer(sample_texts(dcfg, train_docs), vocab_size, num_sentinels, max_whitespace_run)
    tok.save(out_dir)
    return tok
