"""Corpus artifacts built once per corpus and reused by every run and trial: the drop list (dedup and
decontamination) and the trained tokenizer (issue 14).

Each artifact lives in `<data.cache_path>/<kind>-<fingerprint>/` (local or any pyarrow filesystem URL, e.g.
`s3://bucket/cglab-cache`). The fingerprint hashes every file of the sources it depends on (path, size,
modification time, as the filesystem reports them) and the settings that change it (filters; tokenizer size,
sample count, sentinels), so a changed, added or removed file, or another setting, gives a new directory and a
rebuild, and anything else finds the existing one. A directory counts only once its `COMPLETE` marker is written
(last), so a build cut off half-way is rebuilt, never read.

Dedup is stored as a drop list, not a survivor table: the int64 record keys (readers.make_key) of every kept
document that is a later copy of another, sorted, in one parquet file. A key holds (source, file, record), so a
read task fetches its own files' part with a key-range filter (parquet row-group statistics skip the rest) and
drops by key, without hashing at training time and without a Python dict shipped to every worker. On a
multi-node cluster data.cache_path must be storage every node reads (shared filesystem or object store): with
none set, a run or sweep whose storage is a URI keeps them in `<storage>/corpus` (`shared_cache`).

Decontamination (data/decontam.py) adds the keys of every document that shares an n-gram with an evaluation set
to the same list, so the stream drops them with the duplicates; its `reason` column says why each key is there
(`duplicate`, `contaminated:<suite>`). The list is keyed by the evaluation texts too (their content, not their
paths): another evaluation set, n-gram length or list of extra files rebuilds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter

import numpy as np

from cglab import storage
from cglab.data import decontam, readers
from cglab.data.dedup import DUPLICATE, duplicate_mask, find_survivors
from cglab.data.tokenizer import CGTokenizer, train_tokenizer

VERSION = 1
DROPS, MARKER, META = "drops.parquet", "COMPLETE", "meta.json"
_ROW_GROUP = 1 << 18  # keys per row group: a file's part is a few row groups at most


def cache_root(dcfg) -> str:
    """data.cache_path, or the user's cache directory (XDG_CACHE_HOME, else ~/.cache) + cglab/corpus."""
    if dcfg.cache_path:
        return dcfg.cache_path.rstrip("/")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cglab", "corpus")


def shared_cache(cfg, storage_path: str):
    """`cfg` with data.cache_path set to `<storage_path>/corpus` when the run's storage is a URI and no cache_path is
    given: the default cache (the user's cache directory) exists only on the driver's machine, while the prepare
    tasks that write the corpus and the workers that read it run on any node of the cluster. Unchanged otherwise (a
    local storage means one machine or a shared file system)."""
    if cfg.data.cache_path or not storage.is_uri(storage_path):
        return cfg
    data = cfg.data.model_copy(update={"cache_path": storage.join(storage_path, "corpus")})
    return cfg.model_copy(update={"data": data})


def fingerprint(sources, settings: dict) -> str:
    """Hash of every file's (source index, kind, subsets, path, size, mtime) and of `settings`."""
    files = []
    for src in sources:
        for path in src.files:
            fs, p = readers._filesystem(path)
            info = fs.get_file_info(p)
            mtime = info.mtime_ns if info.mtime_ns is not None else None
            files.append([src.index, src.kind, list(src.subsets or ()), path, info.size, mtime])
    doc = json.dumps({"v": VERSION, "files": files, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _complete(d: str) -> bool:
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.fs as pafs

    fs, p = readers._filesystem(_join(d, MARKER))
    return fs.get_file_info(p).type == pafs.FileType.File


# one implementation of storage I/O for every artifact (cglab.storage): local paths and URIs alike
_writing, _write, _read = storage.writing, storage.write_bytes, storage.read_bytes


# ---------------------------------------------------------------------------------------------- dedup
def build_drops(sources, fcfg) -> np.ndarray:
    """Sorted int64 keys of every kept document whose content occurred earlier in (source, file, record) order.

    One scan of every file (Ray Data, one task per file) keeps only (sha, key); the groupby of dedup.find_survivors
    finds each repeated hash's first key; a map over the same materialized projection lists the other copies.
    """
    # pyarrow (cglab.data.pipeline): kept off `cglab --help`'s path; and the pipeline imports this module
    from cglab.data.pipeline import scan_dataset

    scan = scan_dataset(sources, fcfg).select_columns(["sha", "key"]).materialize()
    survivors = find_survivors(scan, rows=scan.count())
    if not survivors:
        return np.zeros(0, np.int64)

    def later_copies(batch, survivors):
        dup = (batch["sha"] != "") & duplicate_mask(batch["sha"].tolist(), batch["key"].tolist(), survivors)
        return {"key": batch["key"][dup].astype(np.int64)}

    keys = [
        b["key"]
        for b in scan.map_batches(later_copies, batch_format="numpy", fn_kwargs=dict(survivors=survivors)).iter_batches(
            batch_size=None, batch_format="numpy"
        )
        if len(b["key"])
    ]
    return np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.int64)


def drops_dir(sources, fcfg, root: str):
    """(where the drop list of these sources under these filters lives, built or not; the decontamination index)."""
    index = decontam.load_index(fcfg.decontaminate)  # ConfigError naming the field when an eval file is missing
    settings = {
        "kind": "drops",
        "filters": fcfg.model_dump(mode="json", exclude={"decontaminate"}),
        "decontaminate": index.fingerprint if index else None,
    }
    return _join(root, f"drops-{fingerprint(sources, settings)}"), index


def dedup_drops(sources, fcfg, root: str) -> dict:
    """The drop list of these sources under these filters (`fcfg.dedup`: later copies; `fcfg.decontaminate`:
    documents sharing an n-gram with an evaluation set): reused when built before, else built and stored.

    Returns {"path": .../drops.parquet, "built": bool, "seconds": float, "documents_dropped": int,
    "dropped": {reason: documents}}.
    """
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow as pa
    import pyarrow.parquet as pq

    d, index = drops_dir(sources, fcfg, root)
    if _complete(d):
        meta = json.loads(_read(_join(d, META)))
        return {"path": _join(d, DROPS), "built": False, "seconds": 0.0, **_counts(meta["dropped"])}
    t0 = time.perf_counter()
    keys = build_drops(sources, fcfg) if fcfg.dedup else np.zeros(0, np.int64)
    reasons = np.full(len(keys), DUPLICATE, object)
    if index is not None:
        ckeys, creasons = decontam.contaminated(sources, fcfg, index)
        dup = ~np.isin(keys, ckeys)  # a contaminated later copy is counted once, as contaminated
        keys, reasons = np.concatenate([keys[dup], ckeys]), np.concatenate([reasons[dup], creasons])
        order = np.argsort(keys, kind="stable")
        keys, reasons = keys[order], reasons[order]
    buf = io.BytesIO()
    table = pa.table({"key": pa.array(keys, pa.int64()), "reason": pa.array(reasons.tolist(), pa.string())})
    pq.write_table(table, buf, row_group_size=_ROW_GROUP)
    _write(_join(d, DROPS), buf.getvalue())
    seconds = time.perf_counter() - t0
    dropped = dict(sorted(Counter(reasons.tolist()).items()))
    meta = {
        "dropped": dropped,
        "build_seconds": seconds,
        "sources": [s.name for s in sources],
        "files": sum(len(s.files) for s in sources),
        "decontaminate": {"suites": list(index.suites), "texts": index.texts, "ngram": index.n} if index else None,
    }
    _write(_join(d, META), json.dumps(meta, indent=1).encode())
    _write(_join(d, MARKER), b"")
    return {"path": _join(d, DROPS), "built": True, "seconds": seconds, **_counts(dropped)}


def _counts(dropped: dict) -> dict:
    return {"documents_dropped": sum(dropped.values()), "dropped": dropped}


def file_drops(path: str, source: int, file: int) -> np.ndarray:
    """Sorted keys to drop from one file: its key range of the drop list (row groups outside it are not read)."""
    return file_drop_reasons(path, source, file)[0]


def file_drop_reasons(path: str, source: int, file: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, their reasons: `duplicate` or `contaminated:<suite>`) to drop from one file."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.parquet as pq

    lo, hi = readers.make_key(source, file, 0), readers.make_key(source, file, 0) + (1 << readers._RECORD_BITS)
    fs, p = readers._filesystem(path)
    t = pq.read_table(p, filesystem=fs, filters=[("key", ">=", lo), ("key", "<", hi)])
    keys = t.column("key").to_numpy()
    reasons = np.asarray(t.column("reason").to_pylist() if "reason" in t.column_names else ["duplicate"] * len(keys))
    order = np.argsort(keys, kind="stable")
    return keys[order], reasons[order].astype(object)


# ---------------------------------------------------------------------------------------------- tokenizer
def trained_tokenizer(dcfg, sources, root: str):
    """(CGTokenizer, info) for data.tokenizer with no path: the stored one of this corpus and these settings, or
    one trained now (on `pipeline.sample_texts`) and stored."""
    # pyarrow (cglab.data.pipeline): kept off `cglab --help`'s path; and the pipeline imports this module
    from cglab.data.pipeline import sample_texts

    tc = dcfg.tokenizer
    settings = {
        "kind": "tokenizer",
        "tokenizer": tc.model_dump(mode="json", exclude={"path"}),
        "num_sentinels": dcfg.num_sentinels,
        "filters": dcfg.filters.model_dump(mode="json", exclude={"decontaminate"}),
    }
    d = _join(root, f"tokenizer-{fingerprint(sources, settings)}")
    path = _join(d, "tokenizer.json")
    if _complete(d):
        tok = CGTokenizer.from_str(_read(path).decode(), dcfg.num_sentinels, tc.max_whitespace_run)
        return tok, {"path": path, "built": False, "seconds": 0.0}
    t0 = time.perf_counter()
    tok = train_tokenizer(sample_texts(dcfg, tc.train_docs), tc.vocab_size, dcfg.num_sentinels, tc.max_whitespace_run)
    _write(path, tok.to_str().encode())
    _write(_join(d, MARKER), b"")
    return tok, {"path": path, "built": True, "seconds": time.perf_counter() - t0}
