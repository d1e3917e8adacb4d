"""Exact dedup by SHA-256 of the content across the whole dataset, with a deterministic survivor.

Two passes, because a streaming pass cannot know whether a later block holds an earlier copy:
1. `find_survivors(ds)`: over (sha, key) of every kept document, a Ray Data groupby finds each hash seen more than
   once and the smallest record key among its copies. The result holds only duplicated hashes (small: a few percent
   of documents), so it is cheap to ship to every task.
2. `duplicate_mask(shas, keys, survivors)`: a document is a duplicate iff its hash is in the table and its key is
   not the survivor's. The survivor is the copy that comes first in (source, file, record) order, whatever the
   block layout or the number of workers. Training does not ship this table: data/artifacts.py turns it into a
   drop list of record keys, stored once per corpus, that each read task reads for its own files.
"""

from __future__ import annotations

import hashlib

import numpy as np

DUPLICATE = "duplicate"


def content_hashes(texts) -> list[str]:
    """Hex SHA-256 of each document's UTF-8 bytes."""
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


def duplicate_mask(shas, keys, survivors: dict[str, int]) -> np.ndarray:
    """True where a document is a later copy of one that survives."""
    if not survivors:
        return np.zeros(len(keys), bool)
    return np.fromiter((survivors.get(s, k) != k for s, k in zip(shas, keys)), bool, len(keys))


def find_survivors(ds, rows: int | None = None) -> dict[str, int]:
    """{sha: smallest key} for every hash that occurs more than once in `ds` (columns `sha`, `key`;
    sha "" = not a kept document).

    `rows` (when known, e.g. of a materialized scan) sizes the hash shuffle: about a million rows per partition
    instead of Ray's default 200 partitions, whose fixed cost dominates below a few million documents.
    """
    # Ray: kept off `cglab --help`'s path
    from ray.data.aggregate import Count, Min

    parts = None if rows is None else max(2, min(200, rows // 1_000_000 + 1))
    groups = ds.select_columns(["sha", "key"]).groupby("sha", num_partitions=parts).aggregate(Count(), Min("key"))
    out: dict[str, int] = {}
    for batch in groups.iter_batches(batch_size=65536, batch_format="numpy"):
        many = batch["count()"] > 1
        out.update(zip(batch["sha"][many].tolist(), batch["min(key)"][many].astype(np.int64).tolist()))
    out.pop("", None)  # skipped documents carry no hash
    return out
