"""Held-out documents for a sweep's evaluation: the last file of every multi-file source is set aside.

`split_sources(sources, out_dir)` returns the training sources (every file but the held-out ones, as explicit
paths, so the training stream never reads them) and writes (`out_dir` a local directory or a storage URI)
`out_dir/nl.jsonl` (from pile sources) and
`out_dir/code.jsonl` (from stack sources), `{"text": ...}` per line, readable by `cglab.eval.nl.read_texts` and
`cglab eval run --nl-file/--code-file`. Held-out documents go through the training readers and filters, and any
whose content is byte-identical to a training document is dropped (the stdlib has many identical files), so
the perplexities are really out-of-sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cglab import storage
from cglab.config import ConfigError, FilterConfig, SourceConfig
from cglab.data import readers
from cglab.data.dedup import content_hashes
from cglab.data.filters import filter_reasons

# Dedup against training only when the training files are this small: hashing a real Pile is a job of its own.
_MAX_DEDUP_BYTES = 512 << 20


@dataclass(frozen=True)
class HeldOut:
    nl_path: str | None  # jsonl, {"text"} per line; None when no pile source could spare a file
    code_path: str | None
    counts: dict[str, int]  # docs written per kind, and duplicates of training docs dropped


def _docs(src, files: list[int], fcfg: FilterConfig):
    """Texts of the files' documents that the training readers and filters keep."""
    max_bytes = readers.max_record_bytes(fcfg.max_chars)
    for f in files:
        for r in readers.read_file(src, f, max_bytes):
            if not r.reason and not filter_reasons([r.text], fcfg)[0]:
                yield r.text


def split_sources(
    sources: list[dict[str, Any]] | list[SourceConfig],
    out_dir: str | Path,
    *,
    filters: FilterConfig | None = None,
    max_docs: int = 64,
) -> tuple[list[dict], HeldOut]:
    """(training sources as dicts, held-out files). Raises ConfigError when no source has two files."""
    cfgs = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in sources]
    fcfg = filters or FilterConfig()
    resolved = readers.resolve_files(cfgs)
    train: list[dict] = []
    held: dict[str, list[tuple[readers.SourceFiles, int]]] = {"pile": [], "stack": []}
    for cfg, src in zip(cfgs, resolved):
        d = cfg.model_dump(mode="json")
        # Explicit files, local ones absolute: trials run in other working directories.
        d["paths"] = [storage.location(f) for f in src.files]
        if len(src.files) >= 2:
            d["paths"] = d["paths"][:-1]
            held[src.kind].append((src, len(src.files) - 1))
        train.append(d)
    if not held["pile"] and not held["stack"]:
        raise ConfigError("data.sources: no source has two or more files, so none can be held out for evaluation")

    train_srcs = readers.resolve_files([SourceConfig(**d) for d in train])
    files = [f for s in train_srcs for f in s.files]
    local = not any(storage.is_uri(f) for f in files)
    seen: set[str] = set()
    if local and sum(Path(f).stat().st_size for f in files) <= _MAX_DEDUP_BYTES:
        for s in train_srcs:
            for chunk in _chunked(_docs(s, list(range(len(s.files))), fcfg), 512):
                seen.update(content_hashes(chunk))
    paths: dict[str, str | None] = {}
    counts = {"duplicates_dropped": 0}
    for kind, name in (("pile", "nl"), ("stack", "code")):
        texts: list[str] = []
        for text in (t for src, f in held[kind] for t in _docs(src, [f], fcfg)):
            if content_hashes([text])[0] in seen:
                counts["duplicates_dropped"] += 1
                continue
            texts.append(text)
            if len(texts) >= max_docs:
                break
        counts[name] = len(texts)
        if not texts:
            paths[name] = None
            continue
        p = storage.join(storage.location(out_dir), f"{name}.jsonl")  # a URI: every node's evaluation reads it
        storage.write_bytes(p, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
        paths[name] = p
    return train, HeldOut(paths["nl"], paths["code"], counts)


def _chunked(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
