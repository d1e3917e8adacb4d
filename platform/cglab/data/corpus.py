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
import importlib.metadata as md
import json
import os
import re
import sysconfig
from collections import Counter
from pathlib import Path

from cglab.config import ConfigError, DataConfig, FilterConfig, SourceConfig, TokenizerConfig
from cglab.data.dedup import content_hashes
from cglab.data.tokenizer import train_tokenizer

try:
    from pydoc_data.topics import topics as HELP_TOPICS
except ImportError:  # some Python builds ship without pydoc_data: the docstrings alone then
    HELP_TOPICS = {}

LANGS = {
    ".py": "Python",
    ".c": "C",
    ".h": "C",
    ".sh": "Shell",
    ".json": "JSON",
    ".toml": "TOML",
    ".html": "HTML",
    ".css": "CSS",
    ".js": "JavaScript",
    ".f90": "FORTRAN",
}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for r, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out += [Path(r) / f for f in sorted(files) if Path(f).suffix in LANGS]
    return out


def _docstrings(source: str, module_set: str, def_set: str) -> list[tuple[str, str]]:
    """(pile_set_name, text) of a Python source's docstrings: the module's (over 80 characters) under
    `module_set`, each class's and function's (over 120, headed by its name) under `def_set`."""
    tree = ast.parse(source)
    docs = []
    mod = ast.get_docstring(tree)
    if mod and len(mod) > 80:
        docs.append((module_set, mod))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if d and len(d) > 120:
                docs.append((def_set, f"{node.name}\n\n{d}"))
    return docs


def _docs(files: list[Path], budget: int) -> list[tuple[str, str]]:
    """(pile_set_name, text) documents, at most `budget` characters in all."""
    docs: list[tuple[str, str]] = []
    for k in sorted(HELP_TOPICS):  # at most a third of the budget, so docstrings are always in the mix
        if sum(len(t) for _, t in docs) < budget // 3:
            docs.append(("Python Help Topics", HELP_TOPICS[k]))
    for f in files:
        if sum(len(t) for _, t in docs) >= budget:
            break
        if f.suffix != ".py":
            continue
        try:
            docs += _docstrings(f.read_text(encoding="utf-8"), "Python Module Docs", "Python Docstrings")
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
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
        rows.append(
            dict(
                content=text,
                lang=LANGS[f.suffix],
                max_stars_repo_path=f"cpython/Lib/{rel}",
                max_stars_repo_name="python/cpython",
                size=len(raw),
                ext=f.suffix.lstrip("."),
                hexsha=hashlib.sha1(raw).hexdigest(),
            )
        )
        total += len(raw)
    return rows


def build_corpus(out_dir: str | Path, nl_chars: int = 1_500_000, code_bytes: int = 3_000_000, shards: int = 4) -> dict:
    """Write `out_dir/pile/*.jsonl.zst` and `out_dir/stack/*.parquet`; return a summary (paths, counts)."""
    import pyarrow as pa  # pyarrow and zstandard: kept off `cglab --help`'s path
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
    return dict(
        out=str(out),
        pile=dict(files=pile_files, documents=len(docs)),
        stack=dict(files=stack_files, documents=len(rows)),
    )


def corpus_sources(corpus_dir: str | Path) -> list[dict]:
    """SourceConfig dicts for a built micro corpus (for configs, demos and tests)."""
    d = Path(corpus_dir)
    return [
        dict(name="pile", kind="pile", paths=[str(d / "pile")]),
        dict(name="stack", kind="stack", paths=[str(d / "stack")]),
    ]


def train_corpus_tokenizer(
    corpus_dir: str | Path,
    out_dir: str | Path,
    vocab_size: int = 1024,
    num_sentinels: int = 16,
    max_whitespace_run: int = 32,
    train_docs: int = 2000,
):
    """Train the byte-level BPE on a sample of a built micro corpus and save it to out_dir."""
    from cglab.data.pipeline import sample_texts  # pyarrow: kept off `cglab --help`'s path

    dcfg = DataConfig(
        sources=[SourceConfig(**s) for s in corpus_sources(corpus_dir)],
        tokenizer=TokenizerConfig(vocab_size=vocab_size, train_docs=train_docs, max_whitespace_run=max_whitespace_run),
        num_sentinels=num_sentinels,
    )
    tok = train_tokenizer(sample_texts(dcfg, train_docs), vocab_size, num_sentinels, max_whitespace_run)
    tok.save(out_dir)
    return tok


# ------------------------------------------------------------------------------------ the package corpus
# Real code no one here wrote: the Python sources of the distributions installed in this environment (torch,
# transformers, ray, mlflow, numpy, ...), in the Stack's parquet layout, and the prose their authors wrote (the
# long description on PyPI, Markdown/reStructuredText files they ship, docstrings) in the Pile's jsonl.zst
# layout. The micro corpus above stays the demo's default; this one is `cglab corpus build --source packages`.
DOC_EXTS = (".md", ".rst", ".txt")
TOKEN_RE = r"\w+|[^\w\s]"  # a GPT-2-like pre-tokenisation: words and single punctuation marks
OWN = ("cglab",)  # left out of the default package list
SUMMARY = "summary.json"  # the build's summary, written next to pile/ and stack/


def _license(meta) -> str:
    """SPDX expression, else the License field, else the OSI classifier; '' when the package says nothing."""
    expr = meta.get("License-Expression")
    if expr:
        return expr.strip()
    lic = (meta.get("License") or "").strip()
    if lic and "\n" not in lic and len(lic) <= 80:  # some packages paste the whole licence text here
        return lic
    classifiers = [c.split(" :: ")[-1] for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    return classifiers[0] if classifiers else ""


def installed_packages() -> dict[str, object]:
    """Normalised distribution name -> importlib.metadata Distribution, one per name, sorted."""
    out: dict[str, object] = {}
    for d in md.distributions():
        name = (d.metadata.get("Name") or "").lower().replace("_", "-")
        if name and name not in out:
            out[name] = d
    return dict(sorted(out.items()))


def default_packages(dists: dict[str, object] | None = None) -> list[str]:
    """Every installed distribution but this project's own (OWN): code no one here wrote."""
    return [d for d in (installed_packages() if dists is None else dists) if d not in OWN]


def _package_docs(dist, name: str) -> list[tuple[str, str]]:
    """(pile_set_name, text) prose of one distribution: its long description, shipped .md/.rst/.txt files,
    module and class/function docstrings."""
    docs = []
    desc = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    if len(desc) > 200:
        docs.append(("Package Descriptions", desc))
    for f in sorted(dist.files or [], key=str):
        path = Path(dist.locate_file(f))
        if f.suffix in DOC_EXTS and "LICENSE" not in f.name.upper() and ".dist-info" not in str(f):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if len(text) > 200:
                docs.append(("Package Docs", text))
        elif f.suffix == ".py":
            try:
                docs += _docstrings(path.read_text(encoding="utf-8"), "Package Docstrings", "Package Docstrings")
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
                continue
    return docs


def _package_code(dist, name: str, license_: str) -> list[dict]:
    rows = []
    for f in sorted(dist.files or [], key=str):
        if f.suffix != ".py":
            continue
        try:
            raw = Path(dist.locate_file(f)).read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rows.append(
            dict(
                content=text,
                lang="Python",
                max_stars_repo_path=f"{name}/{f.as_posix()}",
                max_stars_repo_name=name,
                size=len(raw),
                ext="py",
                hexsha=hashlib.sha1(raw).hexdigest(),
                package=name,
                license=license_,
            )
        )
    return rows


def is_heldout_package(name: str, fraction: float = 0.1) -> bool:
    """Deterministic by name alone, so the split does not move when the budget or the environment changes."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def build_package_corpus(
    out_dir: str | Path,
    packages: list[str] | None = None,
    *,
    heldout: list[str] | None = None,
    heldout_fraction: float = 0.1,
    code_bytes: int = 200 << 20,
    nl_chars: int = 50 << 20,
    shards: int = 8,
    filters=None,
) -> dict:
    """Write `out_dir/stack/NN.parquet` (one row per .py file; columns as the micro Stack plus `package` and
    `license`) and `out_dir/pile/NN.jsonl.zst` (meta: pile_set_name and package) from installed distributions.

    Held out by package: the last shard of each side holds only the held-out packages (`heldout`, else those
    `is_heldout_package` picks), the other shards only the rest: no package on both sides of that split (which a
    run selects by its paths; a sweep samples its own, cglab.data.heldout). The CodeGen filters apply to every
    document (`filters`: a FilterConfig, default CodeGen's), then decontamination (`filters.decontaminate`: a
    document sharing an n-gram with an evaluation set is dropped, `<kind>:contaminated:<suite>`), then exact dedup by
    SHA-256: a training copy survives once; a held-out document whose content also occurs in training is
    dropped. Budgets fill package by package in name order (held-out packages take at most a tenth of each).
    Returns a summary with documents, bytes and pre-tokens (TOKEN_RE pieces) per source and split, and documents
    dropped by reason (also written to `out_dir/summary.json`)."""
    import pyarrow as pa  # pyarrow and zstandard: kept off `cglab --help`'s path
    import pyarrow.parquet as pq
    import zstandard

    from cglab.data.decontam import load_index
    from cglab.data.filters import filter_reasons

    if shards < 2:
        raise ConfigError("corpus: the package corpus needs shards >= 2 (the last one is the held-out split)")
    fcfg = filters or FilterConfig()
    index = load_index(fcfg.decontaminate)
    dists = installed_packages()
    names = [p.lower().replace("_", "-") for p in packages] if packages else default_packages(dists)
    missing = [p for p in names if p not in dists]
    if missing:
        raise ConfigError(f"corpus: packages not installed here: {missing}")
    held = (
        {p.lower().replace("_", "-") for p in heldout}
        if heldout is not None
        else {p for p in names if is_heldout_package(p, heldout_fraction)}
    )
    if not held & set(names) or not set(names) - held:
        raise ConfigError(f"corpus: need packages on both sides of the held-out split (held out: {sorted(held)})")
    dropped: Counter = Counter()
    seen: set[str] = set()  # content hashes kept so far (code); training first, then held out
    seen_nl: set[str] = set()
    splits = {"train": {"code": [], "nl": []}, "heldout": {"code": [], "nl": []}}
    budgets = {
        "train": {"code": code_bytes, "nl": nl_chars},
        "heldout": {"code": code_bytes // 10, "nl": nl_chars // 10},
    }
    # Training packages first, so a held-out document can be checked against every training hash.
    for split, pkgs in (("train", [p for p in names if p not in held]), ("heldout", [p for p in names if p in held])):
        for name in pkgs:
            dist = dists[name]
            # Lazily: once a budget is spent, the remaining packages are not read (or parsed) for it.
            for kind, read, key, seen_set in (
                ("code", lambda: _package_code(dist, name, _license(dist.metadata)), "content", seen),
                (
                    "nl",
                    lambda: [
                        dict(text=t, meta=dict(pile_set_name=s, package=name)) for s, t in _package_docs(dist, name)
                    ],
                    "text",
                    seen_nl,
                ),
            ):
                left = budgets[split][kind] - sum(len(x[key]) for x in splits[split][kind])
                if left <= 0:
                    continue
                items = read()
                if not items:
                    continue
                reasons = filter_reasons([x[key] for x in items], fcfg)
                if index is not None:
                    ok = reasons == ""
                    reasons[ok] = index.reasons([x[key] for x, k in zip(items, ok) if k])
                for item, reason, sha in zip(items, reasons, content_hashes([x[key] for x in items])):
                    if reason:
                        dropped[f"{kind}:{reason}"] += 1
                    elif sha in seen_set:
                        dropped[f"{kind}:{'duplicate' if split == 'train' else 'duplicate_of_training'}"] += 1
                    elif left > 0:
                        splits[split][kind].append(item)
                        left -= len(item[key])
                        seen_set.add(sha)  # held-out hashes too: a copy within the held-out side goes as well

    out = Path(out_dir)
    (out / "pile").mkdir(parents=True, exist_ok=True)
    (out / "stack").mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=3)
    files: dict[str, list[str]] = {"pile": [], "stack": []}
    for s in range(shards):
        split = "heldout" if s == shards - 1 else "train"
        part_of = (lambda xs: xs[s :: shards - 1]) if split == "train" else (lambda xs: xs)
        docs = part_of(splits[split]["nl"])
        p = out / "pile" / f"{s:02d}.jsonl.zst"
        p.write_bytes(cctx.compress("".join(json.dumps(d) + "\n" for d in docs).encode("utf-8")))
        files["pile"].append(str(p))
        rows = part_of(splits[split]["code"])
        table = pa.Table.from_pylist(rows) if rows else pa.table({"content": pa.array([], pa.string())})
        p = out / "stack" / f"{s:02d}.parquet"
        pq.write_table(table, p, row_group_size=256)
        files["stack"].append(str(p))

    tok = re.compile(TOKEN_RE)

    def stats(xs, key):
        return dict(
            documents=len(xs),
            bytes=sum(len(x[key].encode("utf-8")) for x in xs),
            pretokens=sum(len(tok.findall(x[key])) for x in xs),
        )

    summary = dict(
        out=str(out),
        source="packages",
        packages=dict(train=[p for p in names if p not in held], heldout=sorted(held & set(names))),
        pile=dict(
            files=files["pile"],
            documents=sum(len(splits[k]["nl"]) for k in splits),
            **{k: stats(splits[k]["nl"], "text") for k in splits},
        ),
        stack=dict(
            files=files["stack"],
            documents=sum(len(splits[k]["code"]) for k in splits),
            **{k: stats(splits[k]["code"], "content") for k in splits},
        ),
        dropped=dict(sorted(dropped.items())),
    )
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))  # what the corpus holds, kept with it
    return summary
