"""The prepared corpus: every source's surviving documents tokenized once, in pieces of at most `data.chunk_tokens`
tokens, which the training stream reads instead of raw text (issue 24).

Stage one of the two-stage data path (Megatron-Core's, too: preprocess once into an indexed dataset, then every run
reads that). One Ray read task per source file reads it through the training readers, filters and the dedup drop
list, tokenizes what survives and writes it, under `<data.cache_path>/tokens-<fingerprint>/`:

    s<source>-f<file>.parquet  columns key (readers.make_key), ids (list<int32>, ending with <|endoftext|>);
                               one row group per piece of at most chunk_tokens tokens
    index.parquet              one row per piece: source, file, row_group, documents, tokens
    meta.json                  documents, tokens and skips by reason per source
    COMPLETE                   written last: a build cut off half-way is rebuilt, never read

The fingerprint covers every file (artifacts.fingerprint: path, size, mtime), the filters, the tokenizer, the dedup
drop list applied and chunk_tokens: any change rebuilds, anything else reuses. A local cache is built under a file
lock, so trials that start together wait for one build instead of each building it (an object-store cache has no
lock: concurrent builders write identical files, and the first COMPLETE wins).

Pieces are what the stream shuffles (cglab.data.pipeline.epoch_units): small pieces from every file make any 1% of
an epoch draw from all files. Every piece's token count is in the index, so units of work are balanced by what they
yield, not by compressed bytes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cglab.data import artifacts, readers

VERSION = 1
INDEX, META = "index.parquet", "meta.json"


@dataclass(frozen=True)
class Index:
    """One entry per piece, sorted by (source, file, row_group)."""

    path: str  # the prepared corpus's directory
    source: np.ndarray  # int32
    file: np.ndarray  # int32
    row_group: np.ndarray  # int32
    documents: np.ndarray  # int64
    tokens: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.source)


class _Tally:
    """Kept and skipped counts (the DataMetrics interface `pipeline._kept_documents` reports to)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def skipped_counts(self, c: Counter) -> None:
        self.counts.update(c)

    def kept(self, n: int) -> None:
        self.counts["kept"] += n


def piece_file(root: str, source: int, file: int) -> str:
    return artifacts._join(root, f"s{source}-f{file:06d}.parquet")


def _write_file(
    src, f: int, fcfg, tok_args: tuple, dedup_path: str, root: str, chunk_tokens: int, count_as: str | None = None
) -> dict:
    """Read, filter, drop duplicates, tokenize and write one source file; its pieces' counts and its skips.
    `tok_args`: (tokenizer json, sentinels, whitespace run), rebuilt once per worker process. `count_as` (an
    experiment name): export the skips per reason to Prometheus (DataMetrics; only inside Ray), once, as the corpus
    is prepared: the stream reads what survived."""
    # pyarrow: kept off `cglab --help`'s path; the pipeline imports this module
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cglab.data.pipeline import _kept_documents, _tokenizer, tokenized

    tok = _tokenizer(*tok_args)
    tally = _Tally()
    docs = _kept_documents(src, [f], fcfg, dedup_path, readers.max_record_bytes(fcfg.max_chars), tally)
    schema = pa.schema([("key", pa.int64()), ("ids", pa.large_list(pa.int32()))])
    writer = None
    pieces: list[tuple[int, int]] = []
    keys: list[int] = []
    ids: list[np.ndarray] = []
    n = 0
    with contextlib.ExitStack() as files:  # the output streams to storage piece by piece: memory is one piece

        def flush():
            nonlocal writer, keys, ids, n
            if not keys:
                return
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])])
            table = pa.table(
                {
                    "key": pa.array(keys, pa.int64()),
                    "ids": pa.LargeListArray.from_arrays(
                        pa.array(offsets, pa.int64()), pa.array(np.concatenate(ids), pa.int32())
                    ),
                },
                schema=schema,
            )
            if writer is None:  # a file none of whose documents survive writes nothing
                writer = pq.ParquetWriter(
                    files.enter_context(artifacts._writing(piece_file(root, src.index, f))), schema
                )
            writer.write_table(table, row_group_size=len(keys))  # one row group: one piece
            pieces.append((len(keys), int(offsets[-1])))
            keys, ids, n = [], [], 0

        for key, doc in tokenized(docs, tok):
            if n and n + len(doc) > chunk_tokens:
                flush()
            keys.append(key)
            ids.append(doc)
            n += len(doc)
        flush()
        if writer is not None:
            writer.close()
    if count_as is not None:
        import ray

        if ray.is_initialized():
            from cglab.track.metrics import DataMetrics

            DataMetrics(experiment=count_as, source=src.name).skipped_counts(
                {k: v for k, v in tally.counts.items() if k != "kept"}
            )
    return {"source": src.index, "file": f, "pieces": pieces, "skipped": dict(tally.counts)}


def build(sources, fcfg, tok, dedup_path: str, root: str, chunk_tokens: int, count_as: str | None = None) -> dict:
    """Write every file's pieces, then the index and meta; returns meta. One Ray task per file on the Ray this
    process is connected to; with none, the files one after another here (a command that plans or prepares
    without a cluster must not start a Ray of its own that outlives it)."""
    import ray

    args = (tok.to_str(), tok.num_sentinels, tok.max_whitespace_run)
    files = [(src, f) for src in sources for f in range(len(src.files))]
    if not ray.is_initialized():
        rows = [_write_file(src, f, fcfg, args, dedup_path, root, chunk_tokens, count_as) for src, f in files]
        return write_index(sources, rows, root, chunk_tokens)
    write = ray.remote(num_cpus=1)(_write_file)
    tok_args = ray.put(args)
    refs = [write.remote(src, f, fcfg, tok_args, dedup_path, root, chunk_tokens, count_as) for src, f in files]
    return write_index(sources, ray.get(refs), root, chunk_tokens)


def write_index(sources, rows: list[dict], root: str, chunk_tokens: int) -> dict:
    """The index and meta of the files `_write_file` wrote (its results, any order); returns meta."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: (r["source"], r["file"]))
    by_index = {s.index: s for s in sources}
    cols: dict[str, list[int]] = {k: [] for k in ("source", "file", "row_group", "documents", "tokens")}
    per_source: dict[str, dict] = {}
    for r in rows:
        for g, (docs, toks) in enumerate(r["pieces"]):
            for k, v in zip(cols, (r["source"], r["file"], g, docs, toks)):
                cols[k].append(v)
        s = per_source.setdefault(by_index[r["source"]].name, {"documents": 0, "tokens": 0, "skipped": Counter()})
        s["documents"] += sum(d for d, _ in r["pieces"])
        s["tokens"] += sum(t for _, t in r["pieces"])
        s["skipped"].update({k: v for k, v in r["skipped"].items() if k != "kept"})
    buf = io.BytesIO()
    types = (pa.int32(), pa.int32(), pa.int32(), pa.int64(), pa.int64())
    pq.write_table(pa.table({k: pa.array(v, t) for (k, v), t in zip(cols.items(), types)}), buf)
    artifacts._write(artifacts._join(root, INDEX), buf.getvalue())
    meta = {
        "version": VERSION,
        "chunk_tokens": chunk_tokens,
        "pieces": len(cols["source"]),
        "sources": {k: v | {"skipped": dict(sorted(v["skipped"].items()))} for k, v in per_source.items()},
    }
    artifacts._write(artifacts._join(root, META), json.dumps(meta, indent=1).encode())
    return meta


def tokens_dir(sources, fcfg, tok, dedup_path: str, root: str, chunk_tokens: int) -> str:
    """Where the prepared corpus of these sources and settings lives, built or not."""
    settings = {
        "kind": "tokens",
        "version": VERSION,
        "filters": fcfg.model_dump(mode="json", exclude={"dedup"}),
        "tokenizer": tok.fingerprint(),
        "dedup": dedup_path.rsplit("/", 2)[-2] if dedup_path else "",  # the drop list's own fingerprinted dir
        "chunk_tokens": chunk_tokens,
    }
    return artifacts._join(root, f"tokens-{artifacts.fingerprint(sources, settings)}")


def find(sources, fcfg, tok, root: str, chunk_tokens: int) -> str | None:
    """The prepared corpus of these sources and settings when it was built before (`cglab corpus prepare`, or any
    run over them), else None; builds nothing (`cglab plan` reads its exact counts when it is there)."""
    dedup_path = ""
    if fcfg.dedup or fcfg.decontaminate.enabled:
        drops, _ = artifacts.drops_dir(sources, fcfg, root)
        if not artifacts._complete(drops):
            return None
        dedup_path = artifacts._join(drops, artifacts.DROPS)
    d = tokens_dir(sources, fcfg, tok, dedup_path, root, chunk_tokens)
    return d if artifacts._complete(d) else None


def read_meta(path: str) -> dict:
    return json.loads(artifacts._read(artifacts._join(path, META)))


def prepared_tokens(
    sources, fcfg, tok, dedup_path: str, root: str, chunk_tokens: int, count_as: str | None = None
) -> dict:
    """The prepared corpus of these sources, filters, tokenizer, drop list and chunk size: reused when built before,
    else built (under a lock for a local cache) and stored. Returns {"path", "built", "seconds", "pieces",
    "tokens"}."""
    d = tokens_dir(sources, fcfg, tok, dedup_path, root, chunk_tokens)

    def done(built: bool, seconds: float) -> dict:
        meta = read_meta(d)
        tokens = sum(s["tokens"] for s in meta["sources"].values())
        return {"path": d, "built": built, "seconds": seconds, "pieces": meta["pieces"], "tokens": tokens}

    if artifacts._complete(d):
        return done(False, 0.0)
    with _lock(d):
        if artifacts._complete(d):  # another process built it while this one waited
            return done(False, 0.0)
        t0 = time.perf_counter()
        build(sources, fcfg, tok, dedup_path, d, chunk_tokens, count_as)
        artifacts._write(artifacts._join(d, artifacts.MARKER), b"")
        return done(True, time.perf_counter() - t0)


def _lock(d: str):
    """An exclusive file lock beside a local artifact directory; none for an object store (see the module doc)."""
    if readers._is_url(d):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = os.path.abspath(d.removeprefix("file://")) + ".lock"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return FileLock(path)


@functools.lru_cache(maxsize=4)
def load_index(path: str) -> Index:
    """The prepared corpus's piece index (read once per process)."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.parquet as pq

    fs, p = readers._filesystem(artifacts._join(path, INDEX))
    t = pq.read_table(p, filesystem=fs)
    return Index(path, *(t.column(k).to_numpy() for k in ("source", "file", "row_group", "documents", "tokens")))


def read_piece(opened: dict, root: str, source: int, file: int, row_group: int) -> tuple[np.ndarray, list]:
    """(keys, token-id arrays) of one piece; `opened` keeps each file open for the caller (`close`)."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.parquet as pq

    path = piece_file(root, source, file)
    if path not in opened:
        fs, p = readers._filesystem(path)
        handle = fs.open_input_file(p)
        opened[path] = (pq.ParquetFile(handle), handle)
    t = opened[path][0].read_row_group(row_group)
    ids = t.column("ids").combine_chunks()
    offsets, flat = ids.offsets.to_numpy(), ids.values.to_numpy()
    return t.column("key").to_numpy(), [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def close(opened: dict) -> None:
    """Close the files `read_piece` opened."""
    for _, handle in opened.values():
        handle.close()
    opened.clear()
