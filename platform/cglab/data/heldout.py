"""The held-out split: documents sampled from the prepared corpus across its files and sources, which the training
stream then skips at read time (issue 24).

A researcher's held-out split is a random sample of the corpus, not its last file: with `eval.holdout` set, each
kind (NL from pile sources, code from stack sources) holds out documents until `eval.heldout_tokens` tokens or
`eval.max_docs` documents, each counted up to `data.seq_length` tokens (one scoring context: what is scored is what
is counted), and never more than `eval.heldout_max_fraction` (default 10%) of the kind's documents: on a small corpus
the budget would take it all. `meta.json` says which bound ended each kind's draw. The sample is drawn with
`eval.heldout_seed` (not data.seed: every seed of a sweep is scored on, and trains without, the same split): the
kind's pieces in a seeded order, a few random documents from each, so it spreads over every file as far as the
budget allows.

Nothing about the prepared corpus changes. The split lives beside it, under `<prepared>/heldout-<fingerprint>/`
(prepared corpus, seed, sizes, sequence length):

    nl.jsonl, code.jsonl   {"text": ...} per held-out document (its first seq_length tokens, decoded): what
                           `cglab.eval` scores, every document of it unless eval.score_docs says otherwise
    exclude.parquet        key (readers.make_key), reason: `heldout` (the document itself) or `duplicate:heldout`
                           (a byte-identical copy of one elsewhere in the corpus); the stream skips these keys
    meta.json              per kind: documents, tokens, files touched, copies excluded
    COMPLETE               written last

Deduplicated against training at any size: with data.filters.dedup the prepared corpus holds one copy of each
content already; without it, one pass over the prepared corpus hashes every document's token ids (a Ray task per
file where a Ray is connected) and excludes the held-out documents' copies. Identical text tokenizes to identical
ids, so this is the same test as a hash of the text.

Left as a choice, not an n-gram rule: a held-out document drawn from the corpus shares boilerplate (licence headers,
`if __name__ == "__main__":`) with many training files, and excluding every file that shares a 13-gram with it would
remove a slice of the corpus chosen by the sample. The evaluation suites' problems are decontaminated by n-gram
(cglab.data.decontam); the held-out split by exact copies.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np

from cglab.data import artifacts, prepared, readers

VERSION = 1
EXCLUDE = "exclude.parquet"
HELDOUT, DUPLICATE = "heldout", "duplicate:heldout"
KINDS = (("pile", "nl"), ("stack", "code"))  # source kind -> the evaluation's name for its texts
_HELD_TAG = 0x68656C64  # "held": keeps the split's draws apart from any other use of the seed


@dataclass(frozen=True)
class HeldOut:
    path: str  # the split's directory
    texts: dict[str, str | None]  # "nl" / "code" -> jsonl of held-out texts; None: that kind has no documents
    counts: dict  # per kind: documents, tokens, files; and copies excluded ("duplicates")
    built: bool = False

    @property
    def nl_path(self) -> str | None:
        return self.texts["nl"]

    @property
    def code_path(self) -> str | None:
        return self.texts["code"]


def sample(
    idx: prepared.Index,
    kinds,
    kind: str,
    seed: int,
    tokens: int,
    max_docs: int,
    seq_len: int,
    read,
    max_fraction: float = 1.0,
):
    """The held-out documents of one kind: [(key, source, file, ids)], ids the whole document.

    `kinds[s]`: source s's kind; `read(piece)`: (keys, ids) of one piece. The kind's pieces are visited in a
    seeded order, taking `per_piece` random documents from each (enough to meet the budget in one pass over them,
    from the index's mean document length, so the sample spreads across files), until `tokens` tokens (each
    document counted up to `seq_len`), `max_docs` documents or `max_fraction` of the kind's documents (rounded
    down: a kind too small to spare one holds nothing out); more per piece only when one pass falls short.
    """
    rows = np.flatnonzero(np.isin(idx.source, [s for s, k in enumerate(kinds) if k == kind]))
    if not len(rows):
        return []
    max_docs = min(max_docs, math.floor(max_fraction * int(idx.documents[rows].sum())))
    if max_docs < 1:  # a kind too small to spare a document: nothing held out (the evaluation says so)
        return []
    rng = np.random.default_rng([seed, _HELD_TAG, [k for k, _ in KINDS].index(kind)])
    rows = rows[rng.permutation(len(rows))]
    mean = float(idx.tokens[rows].sum()) / max(1, int(idx.documents[rows].sum()))
    wanted = min(max_docs, math.ceil(tokens / max(1.0, min(mean, seq_len))))
    per_piece = max(1, math.ceil(wanted / len(rows)))
    orders = {}  # piece -> its documents in a seeded order, and how many are taken
    out, got, start = [], 0, 0
    while got < tokens and len(out) < max_docs:
        took = 0
        for r in rows.tolist():
            keys, ids = read(r)
            if r not in orders:
                orders[r] = rng.permutation(len(keys))
            for j in orders[r][start : start + per_piece].tolist():
                out.append((int(keys[j]), int(idx.source[r]), int(idx.file[r]), ids[j]))
                got += min(len(ids[j]), seq_len)
                took += 1
                if got >= tokens or len(out) >= max_docs:
                    return out
        if not took:  # every document of the kind is held out
            return out
        start += per_piece
    return out


def id_hash(ids: np.ndarray) -> bytes:
    """A document's identity by content: its token ids (equal texts tokenize to equal ids)."""
    return hashlib.blake2b(np.ascontiguousarray(ids, np.int32).tobytes(), digest_size=16).digest()


def _copies_in_file(root: str, source: int, file: int, groups: int, hashes: frozenset, held: frozenset) -> list[int]:
    """Keys of the documents of one prepared file whose ids equal a held-out document's (the held-out ones
    themselves not included)."""
    opened: dict = {}
    found = []
    try:
        for g in range(groups):
            keys, ids = prepared.read_piece(opened, root, source, file, g)
            found += [k for k, x in zip(keys.tolist(), ids) if k not in held and id_hash(x) in hashes]
    finally:
        prepared.close(opened)
    return found


def copies(idx: prepared.Index, hashes: frozenset, held: frozenset) -> np.ndarray:
    """Sorted keys of every copy of a held-out document in the prepared corpus: one task per file (Ray when one
    is connected, else here, one file after another)."""
    import ray

    files = sorted({(int(s), int(f)) for s, f in zip(idx.source, idx.file)})
    groups = {sf: int(((idx.source == sf[0]) & (idx.file == sf[1])).sum()) for sf in files}
    if ray.is_initialized():
        task = ray.remote(num_cpus=1)(_copies_in_file)
        h, k = ray.put(hashes), ray.put(held)
        found = ray.get([task.remote(idx.path, s, f, groups[(s, f)], h, k) for s, f in files])
    else:
        found = [_copies_in_file(idx.path, s, f, groups[(s, f)], hashes, held) for s, f in files]
    return np.sort(np.asarray([k for part in found for k in part], np.int64))


def split_dir(prepared_path: str, ecfg, seq_len: int, dedup: bool) -> str:
    """Where the split of this prepared corpus under these settings lives, drawn or not."""
    settings = {
        "v": VERSION,
        "seed": ecfg.heldout_seed,
        "tokens": ecfg.heldout_tokens,
        "max_docs": ecfg.max_docs,
        "max_fraction": ecfg.heldout_max_fraction,
        "seq_len": seq_len,
        "dedup": dedup,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return artifacts._join(prepared_path, f"heldout-{key}")


def find(prepared_path: str, ecfg, seq_len: int, dedup: bool) -> HeldOut | None:
    """The split when it was drawn before, else None; draws nothing (`cglab plan` lists it when it is there)."""
    d = split_dir(prepared_path, ecfg, seq_len, dedup)
    return _loaded(d, False) if artifacts._complete(d) else None


def settle(plan, ecfg, seq_len: int, dedup: bool) -> HeldOut:
    """The held-out split of the plan's prepared corpus under eval.heldout_tokens / max_docs / heldout_seed and
    this sequence length: reused when built before, else drawn, deduplicated and stored. `dedup`: the prepared
    corpus is deduplicated already (data.filters.dedup), so the held-out documents have no copies to find."""
    d = split_dir(plan.prepared, ecfg, seq_len, dedup)
    if artifacts._complete(d):
        return _loaded(d, False)
    with prepared._lock(d):
        if artifacts._complete(d):
            return _loaded(d, False)
        _build(plan, ecfg, seq_len, dedup, d)
        return _loaded(d, True)


def _build(plan, ecfg, seq_len: int, dedup: bool, d: str) -> None:
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = prepared.load_index(plan.prepared)
    kinds = [s.kind for s in plan.sources]
    tok = plan.tokenizer()
    opened: dict = {}

    def read(r):  # a piece visited again (a second pass) is read again: memory stays one piece
        return prepared.read_piece(opened, plan.prepared, int(idx.source[r]), int(idx.file[r]), int(idx.row_group[r]))

    try:
        drawn = {
            name: sample(
                idx,
                kinds,
                kind,
                ecfg.heldout_seed,
                ecfg.heldout_tokens,
                ecfg.max_docs,
                seq_len,
                read,
                ecfg.heldout_max_fraction,
            )
            for kind, name in KINDS
        }
    finally:
        prepared.close(opened)
    held = frozenset(k for docs in drawn.values() for k, *_ in docs)
    dups = (
        np.zeros(0, np.int64)
        if dedup
        else copies(idx, frozenset(id_hash(x) for docs in drawn.values() for *_, x in docs), held)
    )
    meta: dict = {
        "settings": {
            "tokens": ecfg.heldout_tokens,
            "max_docs": ecfg.max_docs,
            "max_fraction": ecfg.heldout_max_fraction,
            "seq_len": seq_len,
        }
    }
    for (kind, name), docs in zip(KINDS, drawn.values()):
        scored = [x[:seq_len] for *_, x in docs]
        n_tok = int(sum(len(x) for x in scored))
        of_kind = int(idx.documents[np.isin(idx.source, [s for s, k in enumerate(kinds) if k == kind])].sum())
        meta[name] = {
            "documents": len(docs),
            "tokens": n_tok,
            # what ended the draw: the token budget, max_docs, the share of the kind, or the kind ran out
            "bound": (
                "tokens"
                if n_tok >= ecfg.heldout_tokens
                else "max_docs"
                if len(docs) >= ecfg.max_docs
                else "max_fraction"
                if docs and len(docs) < of_kind
                else "kind"
            ),
            "of_documents": of_kind,
            "files": len({(s, f) for _, s, f, _ in docs}),
            "sources": sorted({plan.sources[s].name for _, s, _, _ in docs}),
        }
        if docs:
            lines = (json.dumps({"text": tok.decode(x, skip_special_tokens=True)}) + "\n" for x in scored)
            artifacts._write(artifacts._join(d, f"{name}.jsonl"), "".join(lines).encode())
    meta["duplicates"] = len(dups)
    keys = np.concatenate([np.fromiter(held, np.int64, len(held)), dups])
    reasons = [HELDOUT] * len(held) + [DUPLICATE] * len(dups)
    order = np.argsort(keys, kind="stable")
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"key": pa.array(keys[order], pa.int64()), "reason": pa.array(np.asarray(reasons, object)[order])}),
        buf,
    )
    artifacts._write(artifacts._join(d, EXCLUDE), buf.getvalue())
    artifacts._write(artifacts._join(d, artifacts.META), json.dumps(meta, indent=1).encode())
    artifacts._write(artifacts._join(d, artifacts.MARKER), b"")


def _loaded(d: str, built: bool) -> HeldOut:
    meta = json.loads(artifacts._read(artifacts._join(d, artifacts.META)))
    texts = {name: artifacts._join(d, f"{name}.jsonl") if meta[name]["documents"] else None for _, name in KINDS}
    counts = {name: meta[name] for _, name in KINDS} | {"duplicates": meta["duplicates"]}
    return HeldOut(d, texts, counts, built)


@functools.lru_cache(maxsize=4)
def excluded(d: str) -> np.ndarray:
    """Sorted keys the training stream skips (the held-out documents and their copies); read once per process."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.parquet as pq

    fs, p = readers._filesystem(artifacts._join(d, EXCLUDE))
    return np.sort(pq.read_table(p, filesystem=fs).column("key").to_numpy())
