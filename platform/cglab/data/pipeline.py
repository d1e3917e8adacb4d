"""The training data stream over the prepared corpus: shuffle → mix → pack → corrupt, as one Ray Data pipeline.

    plan = prepare_data(cfg, run_dir)            # driver, once: paths checked, tokenizer, drop list, prepared corpus
    ds = build_dataset(cfg, epoch, plan)         # ray.data.Dataset of contract samples, in a fixed order
    for batch in iter_train_batches(cfg, epoch, dp_rank, dp_size, (k, offset), batch_size, plan): ...

Stage one (cglab.data.prepared, once per corpus) read, filtered, deduplicated, decontaminated and tokenized every
file into pieces of at most data.chunk_tokens tokens. This module is stage two, every run:
- units of work (`compose_units`, per epoch): each active source's pieces shuffled with (seed, epoch) and dealt into
  token-balanced units, each holding pieces of every source; a unit's size is its yield (the tokens its mix emits
  before its first source runs dry).
- read+shuffle+mix is one custom `Datasource` (`_read_specs("Mix", …)`), one read task per unit: its pieces of each
  source through a seeded shuffle buffer (`_piece_documents`), interleaved by the mixture weights
  (cglab.data.mixture: shares of tokens by default, of documents with data.mix_by=documents). Mixing inside the
  read keeps the ratio exact per unit (so per rank) and streaming (no barrier).
- pack, corrupt are `map_batches` stages with `batch_size=None` (one call per block) so that window boundaries
  depend only on the block, which the read task cuts deterministically. Ray fuses them with the read.
- `DataContext.execution_options.preserve_order = True`: the stream order is the order of the read tasks and of the
  blocks inside them, whatever finishes first. So (seed, epoch) fixes the whole sequence of samples.

Randomness: a window's corruption draws from `default_rng([seed, epoch, first_key, w])`, where `first_key` is the
record key of the first document of its block and `w` its window number in the block (`window_rng`): a stable
identity of the sample; its first draw picks the window's part of a mixed objective before packing (`pack_block`),
so the same (seed, epoch) gives the same samples and a new epoch re-samples the corruption (lesson 5) as
well as the order (the pieces and the buffers are shuffled with the epoch).

Sharding: `owners` gives each DP rank whole units, longest first onto the least-loaded rank, as a pure function of
(plan, epoch, dp_size). A rank's Ray Data dataset holds only its own units' read tasks, so it reads, packs and
corrupts only its share (no 1/dp filter on the whole stream). Every sample depends on its unit alone (blocks are
cut per read task, seeds use the unit and the block's first record key), so the ranks' samples are a partition of
the dp=1 stream whatever dp_size is. Not `streaming_split`: it hands blocks to whichever worker asks first, so the
split would change run to run and tensor-parallel peers (same DP rank, must see identical batches) would get
different data; here one rank per model-parallel group reads and broadcasts (train/feed.py DataFeed).

Sample identity and position: a sample is (unit, unit_index), its index inside its unit's output; the dp=1
stream is units 0, 1, ... in order. A rank's position is (k, offset): the next sample is number `offset` of its
k-th unit. Resuming builds the dataset from unit k on (earlier units are not read at all) and drops the first
`offset` samples of unit k: only the partial unit is re-read, whatever the position.

Ranks hold different yields (whole units each): the training feed steps in lockstep, so an epoch is what every rank
can fill and the longer ranks' tails are dropped (train/feed.py); `cglab plan` computes that share
(train/plan.py `_epoch_reads`) and refuses a run that needs more, or more ranks than units.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cglab.config import ConfigError
from cglab.data import artifacts, heldout, objectives, prepared, readers
from cglab.data.contract import SAMPLE_KEYS
from cglab.data.dedup import content_hashes
from cglab.data.filters import filter_reasons
from cglab.data.mixture import interleave, source_weights
from cglab.data.packing import pack_documents
from cglab.data.tokenizer import CGTokenizer, load_tokenizer
from cglab.track.metrics import DataMetrics

_MIX_TAG = 0x6D6978  # "mix": keeps the mixture's stream apart from any other use of the seed
_UNIT_TAG, _BUF_TAG = 0x756E6974, 0x627566  # "unit", "buf": the pieces' shuffle, the in-unit shuffle
_BLOCK_DOCS, _BLOCK_TOKENS, _CHUNK_DOCS = 2048, 1_000_000, 256


@dataclass
class DataPlan:
    """Everything a worker needs to rebuild the stream; small and picklable (goes into train_loop_config)."""

    sources: tuple[readers.SourceFiles, ...]
    weights: tuple[float, ...]
    tokenizer_json: str
    num_sentinels: int
    max_whitespace_run: int
    # the dedup drop list (data/artifacts.py: sorted record keys of later copies, parquet); "" = no dedup.
    # Each read task reads its own files' part of it.
    dedup_path: str = ""
    # tokens each source holds after filters (the run plan's count, by source index): passes per source
    tokens_available: tuple[float, ...] = ()
    artifacts: dict = field(default_factory=dict)  # what prepare_data reused or built (path, built, seconds)
    mix_by: str = "tokens"  # what a mixture weight is a share of (data.mix_by; cglab.data.mixture)
    prepared: str = ""  # the prepared corpus's directory (cglab.data.prepared), what the stream reads
    seed: int = 0  # data.seed: the pieces' shuffle, the in-unit shuffle and the mixture
    shuffle_docs: int = 1024  # data.shuffle_docs: the in-unit shuffle buffer, per source
    unit_tokens: int = 1 << 22  # data.unit_tokens: the size a unit of work aims at (compose_units)
    # the held-out split's directory (cglab.data.heldout, eval.holdout): its documents are skipped; "" = none
    heldout: str = ""

    def tokenizer(self):
        return _tokenizer(self.tokenizer_json, self.num_sentinels, self.max_whitespace_run)


# ---------------------------------------------------------------------------------------------- helpers
_TOK_CACHE: dict[str, object] = {}


def _tokenizer(tok_json: str, num_sentinels: int, max_ws: int):
    """One CGTokenizer per process per tokenizer (Ray tasks reuse their worker process)."""
    h = hashlib.sha256(tok_json.encode()).hexdigest()
    if h not in _TOK_CACHE:
        _TOK_CACHE.clear()
        _TOK_CACHE[h] = CGTokenizer.from_str(tok_json, num_sentinels, max_ws)
    return _TOK_CACHE[h]


def _chunks(it, n):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def _kept_documents(
    src: readers.SourceFiles, files, fcfg, dedup_path: str, max_bytes, metrics=None
) -> Iterator[tuple[int, str]]:
    """(key, text) of the documents of `files` that pass reading, filters and dedup (the drop list at
    `dedup_path`, "" = none), in record order.

    `metrics` (a cglab.track.metrics.DataMetrics) counts every record read as kept or skipped by reason.
    """
    for f in files:
        drops, why = artifacts.file_drop_reasons(dedup_path, src.index, f) if dedup_path else (None, None)
        for chunk in _chunks(readers.read_file(src, f, max_bytes), _CHUNK_DOCS):
            ok = [r for r in chunk if not r.reason]
            skipped = Counter(r.reason for r in chunk if r.reason)
            keep = np.zeros(0, bool)
            if ok:
                texts = [r.text for r in ok]
                reasons = filter_reasons(texts, fcfg)
                keep = reasons == ""
                skipped.update(reasons[~keep].tolist())
                if drops is not None and drops.size:
                    keys = np.fromiter((r.key for r in ok), np.int64, len(ok))
                    dup = keep & np.isin(keys, drops)
                    skipped.update(why[np.searchsorted(drops, keys[dup])].tolist())  # duplicate, contaminated:...
                    keep &= ~dup
            if metrics is not None:
                metrics.skipped_counts(skipped)
                metrics.kept(int(keep.sum()))
            for r, k in zip(ok, keep):
                if k:
                    yield r.key, r.text


def sample_texts(dcfg, n: int) -> list[str]:
    """Up to n filtered documents, spread evenly over the sources (tokenizer training; no Ray needed)."""
    srcs = readers.resolve_files(dcfg.sources)
    per = max(1, n // max(1, len(srcs)))
    max_bytes = readers.max_record_bytes(dcfg.filters.max_chars)
    out: list[str] = []
    for src in srcs:
        # Round robin over files so a source's sample is not one file's.
        streams = [_kept_documents(src, [f], dcfg.filters, "", max_bytes) for f in range(len(src.files))]
        taken = 0
        for doc in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
            if doc is None:
                continue
            out.append(doc[1])
            taken += 1
            if taken >= per:
                break
    return out


# ---------------------------------------------------------------------------------------------- datasources
def _ray_data():
    # Ray: kept off the paths that only read files (sample_texts: `cglab corpus build --tokenizer`)
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    return Datasource, ReadTask, BlockMetadata


def _size(path: str) -> int | None:
    try:
        fs, p = readers._filesystem(path)
        return fs.get_file_info(p).size
    except Exception:  # size is only a scheduling hint
        return None


def _read_specs(name: str, specs, fn, ids=None, paths_of=None):
    """A Dataset with one read task per spec, fn(id, spec) yielding its blocks (id: `ids[i]`, default i); Ray names
    the stage Read<name>. `paths_of(spec)`: the files a spec reads (Ray's metadata; default: a [(src, files)] spec)."""
    # Ray: kept off the paths that only read files (sample_texts: `cglab corpus build --tokenizer`)
    import ray

    Datasource, _, _ = _ray_data()

    class SpecDatasource(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return _make_read_tasks(specs, fn, ids, paths_of)

    # One output block stream per read task, never split: with fewer read tasks than Ray's target parallelism (a
    # DP rank's share, or a resumed tail) Ray would otherwise add SplitBlocks(k), and block boundaries, hence
    # packing windows and samples, would depend on how many units a dataset holds.
    return ray.data.read_datasource(SpecDatasource(), override_num_blocks=max(1, len(specs)))


def _make_read_tasks(specs, fn, ids=None, paths_of=None):
    _, ReadTask, BlockMetadata = _ray_data()
    tasks = []
    ids = list(range(len(specs))) if ids is None else list(ids)
    paths_of = paths_of or (lambda spec: [src.files[f] for src, files in spec for f in files])
    for uid, spec in zip(ids, specs):
        paths = paths_of(spec)
        size = sum(s or 0 for s in map(_size, paths)) or None
        meta = BlockMetadata(num_rows=None, size_bytes=size, exec_stats=None, input_files=paths)
        tasks.append(ReadTask(lambda t=uid, spec=spec: fn(t, spec), meta))
    return tasks


def scan_dataset(sources, fcfg):
    """Every record of every file (one read task per file) with `reason` from readers and filters, and `sha`.

    Columns: source int32, key int64, subset, reason ("" = kept), sha ("" unless kept), chars int64.
    The text itself is dropped after hashing: counting and dedup need only this projection.
    """
    max_bytes = readers.max_record_bytes(fcfg.max_chars)

    def read(task, spec):
        ((src, files),) = spec
        for chunk in _chunks(readers.read_file(src, files[0], max_bytes), 4096):
            reasons = np.array([r.reason for r in chunk], dtype=object)
            ok = np.flatnonzero(reasons == "")
            texts = [chunk[i].text for i in ok]
            reasons[ok] = filter_reasons(texts, fcfg)
            kept = ok[reasons[ok] == ""]
            sha = np.full(len(chunk), "", dtype=object)
            sha[kept] = content_hashes([chunk[i].text for i in kept])
            yield pa.table(
                {
                    "source": pa.array(np.full(len(chunk), src.index, np.int32)),
                    "key": pa.array(np.fromiter((r.key for r in chunk), np.int64, len(chunk))),
                    "subset": pa.array([r.subset for r in chunk], pa.string()),
                    "reason": pa.array(reasons.tolist(), pa.string()),
                    "sha": pa.array(sha.tolist(), pa.string()),
                    "chars": pa.array(np.fromiter((len(r.text) for r in chunk), np.int64, len(chunk))),
                }
            )

    specs = [[(src, [f])] for src in sources for f in range(len(src.files))]

    return _read_specs("Scan", specs, read)


MIN_UNITS = 64  # units of work an epoch has at least, where the pieces allow: DP up to 64 on any corpus


def compose_units(
    source: np.ndarray, tokens: np.ndarray, weights, seed: int, epoch: int, unit_tokens: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The epoch's units of work from pieces (`source` and `tokens` per piece): (each unit's piece ids, each unit's
    yield in tokens).

    U = max(MIN_UNITS, the active sources' tokens / `unit_tokens`), at most the pieces of the active source with
    the fewest (every unit needs a piece of every source); U does not depend on the DP size, so every DP layout
    reads the same units. Each active source's pieces are shuffled with (seed, epoch, source) and dealt in that
    order, each to the unit with the fewest of that source's tokens so far: every unit holds a random,
    token-balanced share of every source's pieces, and any stretch of the epoch draws from all files. A unit's
    yield is what its mixture emits before its first source runs dry (min over sources of tokens / weight), the
    measure DP ranks are balanced by. Pure: every process computes the same units without talking.
    """
    w = np.asarray(weights, np.float64)
    active = [s for s in range(len(w)) if w[s] > 0]
    order = []
    for s in active:
        rows = np.flatnonzero(source == s)
        order.append(rows[np.random.default_rng([seed, epoch, s, _UNIT_TAG]).permutation(len(rows))])
    total = sum(float(tokens[r].sum()) for r in order)
    n_units = min(min((len(r) for r in order), default=0), max(MIN_UNITS, math.ceil(total / unit_tokens)))
    members: list[list[int]] = [[] for _ in range(n_units)]
    have = np.zeros((n_units, len(w)), np.float64)
    for s, rows in zip(active, order):
        heap = [(0, u) for u in range(n_units)]  # (this source's tokens so far, unit): least loaded first
        for r in rows.tolist():
            load, u = heapq.heappop(heap)
            members[u].append(r)
            have[u, s] += tokens[r]
            heapq.heappush(heap, (load + int(tokens[r]), u))
    yields = (have[:, active] / w[active]).min(1) if n_units else np.zeros(0)
    return [np.asarray(m, np.int64) for m in members], yields


def epoch_units(plan: DataPlan, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`compose_units` over the plan's prepared corpus (cached per process: every rank and step asks again)."""
    return _epoch_units(plan.prepared, plan.weights, plan.seed, epoch, plan.unit_tokens)


@functools.lru_cache(maxsize=4)
def _epoch_units(path: str, weights: tuple, seed: int, epoch: int, unit_tokens: int):
    idx = prepared.load_index(path)
    return compose_units(idx.source, idx.tokens, weights, seed, epoch, unit_tokens)


def owners(sizes, dp_size: int) -> np.ndarray:
    """The DP rank that reads each unit: longest first onto the least-loaded rank (ties: the lower unit id first,
    then the lowest rank), with a heap of ranks, so every rank's share comes out of one O(units log dp) pass.
    Pure: every process computes the same partition without talking; ranks end within one unit's size."""
    if len(sizes) < dp_size:
        raise ConfigError(
            f"parallel.data_parallel_size={dp_size}: the data has only {len(sizes)} units of work "
            f"(data.unit_tokens, at most one per piece of the active source with the fewest pieces), each rank "
            f"needs one; lower data.unit_tokens, or data.chunk_tokens for more pieces"
        )
    heap, owner = [(0.0, r) for r in range(dp_size)], np.zeros(len(sizes), np.int64)
    for u in sorted(range(len(sizes)), key=lambda u: (-sizes[u], u)):
        load, r = heapq.heappop(heap)
        owner[u] = r
        heapq.heappush(heap, (load + float(sizes[u]), r))
    return owner


def balance(sizes, dp_rank: int, dp_size: int) -> list[int]:
    """The units (ids) DP rank `dp_rank` reads, in stream order (`owners`)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    return np.flatnonzero(owners(sizes, dp_size) == dp_rank).tolist()


def assign_units(plan: DataPlan, epoch: int, dp_rank: int, dp_size: int) -> list[int]:
    """The units of work (ids into `epoch_units`) DP rank `dp_rank` reads in `epoch`, balanced by their yield."""
    return balance(epoch_units(plan, epoch)[1].tolist(), dp_rank, dp_size)


def _piece_documents(plan: DataPlan, pieces: np.ndarray, rng: np.random.Generator, opened: dict):
    """(key, ids) of the documents of `pieces` (one source's, in the unit's shuffled order) through a shuffle
    buffer of plan.shuffle_docs documents: a bounded, seeded in-unit shuffle."""
    idx = prepared.load_index(plan.prepared)
    skip = heldout.excluded(plan.heldout) if plan.heldout else np.zeros(0, np.int64)
    buf: list[tuple[int, np.ndarray]] = []
    for r in pieces.tolist():
        keys, ids = prepared.read_piece(
            opened, plan.prepared, int(idx.source[r]), int(idx.file[r]), int(idx.row_group[r])
        )
        held = np.isin(keys, skip)  # held out for evaluation, or a copy of a held-out document
        for doc, out in zip(zip(keys.tolist(), ids), held.tolist()):
            if out:
                continue
            buf.append(doc)
            if len(buf) >= plan.shuffle_docs:
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
    for j in rng.permutation(len(buf)).tolist():
        yield buf[j]


def tokenized(docs: Iterator[tuple[int, str]], tok) -> Iterator[tuple[int, np.ndarray]]:
    """(key, token ids ending with <|endoftext|>) of each document, tokenized a chunk at a time (the Rust
    tokenizer's batch call), lazily."""
    for chunk in _chunks(docs, _CHUNK_DOCS):
        flat, offsets = tok.encode_batch([t for _, t in chunk])
        for (key, _), a, b in zip(chunk, offsets[:-1], offsets[1:]):
            yield key, flat[a:b]


def mix_dataset(
    plan: DataPlan,
    epoch: int,
    count_as: str | None = None,
    units: list[int] | None = None,
    trace_dir: str | None = None,
):
    """The epoch's documents of every source (key, source, ids, unit), unit by unit (`epoch_units`), each unit's
    sources shuffled in a bounded buffer and interleaved by the mixture weights (cglab.data.mixture).

    `units`: only these units of work, in this order; default all (the dp=1 stream). With `count_as` (an experiment
    name) the read tasks export the documents they stream per source to Prometheus (cglab.track.metrics.DataMetrics;
    what was skipped is counted once, when the corpus is prepared). `trace_dir`: each read task leaves a file
    `unit<id>-*` there when it starts (tests count which units were opened).
    """
    members, _ = epoch_units(plan, epoch)
    units = list(range(len(members))) if units is None else list(units)
    idx = prepared.load_index(plan.prepared)
    by_tokens = plan.mix_by == "tokens"

    def table(rows, unit, first):
        lens = np.fromiter((r[1][1].size for r in rows), np.int64, len(rows))
        offsets = np.concatenate([[0], np.cumsum(lens)])
        flat = np.concatenate([r[1][1] for r in rows]) if rows else np.zeros(0, np.int32)
        return pa.table(
            {
                "key": pa.array([r[1][0] for r in rows], pa.int64()),
                "source": pa.array([r[0] for r in rows], pa.int32()),
                "ids": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(flat, pa.int32())),
                "unit": pa.array(np.full(len(rows), unit, np.int32)),
                "doc": pa.array(np.arange(first, first + len(rows), dtype=np.int64)),  # place in the unit's stream
            }
        )

    def read(task, pieces):
        if trace_dir is not None:
            Path(trace_dir, f"unit{task}-{os.getpid()}-{uuid.uuid4().hex[:8]}").touch()
        index = prepared.load_index(plan.prepared)
        srcs = sorted(set(index.source[pieces].tolist()))
        opened: dict = {}
        streams = [
            _piece_documents(
                plan,
                pieces[index.source[pieces] == s],
                np.random.default_rng([plan.seed, epoch, task, s, _BUF_TAG]),
                opened,
            )
            for s in srcs
        ]
        try:
            w = np.array([plan.weights[s] for s in srcs])
            rng = np.random.default_rng([plan.seed, epoch, task, _MIX_TAG])  # the unit's identity: same on any rank
            size = (lambda doc: doc[1].size) if by_tokens else None
            rows, tokens, done = [], 0, 0
            for i, doc in interleave(streams, w, rng, size=size):
                rows.append((srcs[i], doc))
                tokens += doc[1].size
                if len(rows) >= _BLOCK_DOCS or tokens >= _BLOCK_TOKENS:
                    count(rows)
                    yield table(rows, task, done)
                    rows, tokens, done = [], 0, done + len(rows)
            if rows:
                count(rows)
                yield table(rows, task, done)
        finally:
            prepared.close(opened)

    def count(rows):
        """Export the documents of a block as it is handed on (not when the task ends: a run that has its steps
        stops reading mid-task, and what it read must still count)."""
        if count_as is not None:
            for s, n in Counter(r[0] for r in rows).items():
                DataMetrics(experiment=count_as, source=plan.sources[s].name).kept(n)

    def paths(pieces):
        return sorted({prepared.piece_file(plan.prepared, int(idx.source[r]), int(idx.file[r])) for r in pieces})

    return _read_specs("Mix", [members[u] for u in units], read, ids=units, paths_of=paths)


# ---------------------------------------------------------------------------------------------- stages
def window_rng(seed: int, epoch: int, block_key: int, window: int) -> np.random.Generator:
    """The generator of window `window` of the block whose first document has record key `block_key`."""
    return np.random.default_rng([seed, epoch, int(block_key), int(window)])


def pack_block(block, plan: DataPlan, seq_len: int, ocfg, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """All documents of the block into windows (the last one padded); window identity for the seeds.

    Each window's part of the objective's mix (a UL2 denoiser, codegen2's causal or span half) is drawn before it
    is packed, with the first draw of the generator `corrupt_block` gives it, so it is packed with that part's
    reserve only (objectives.part_reserves) and corrupt_block picks the same part from the same draw."""
    sp = plan.tokenizer().specials
    ids = block.column("ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    flat = ids.values.to_numpy()
    docs = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    first = block.column("key")[0].as_py() if block.num_rows else 0
    parts = objectives.part_reserves(ocfg)
    reserve_for = (
        (lambda w: parts[int(objectives.pick(ocfg, window_rng(seed, epoch, first, w).random()))])
        if len(set(parts)) > 1
        else None
    )
    tokens, segs = pack_documents(docs, seq_len, sp, parts[0], reserve_for=reserve_for)
    unit = block.column("unit")[0].as_py() if block.num_rows else -1
    window_len = (segs >= 0).sum(1)
    # the documents each window holds: the windows are consecutive slices of the block's token stream
    end = np.cumsum(window_len)
    doc = block.column("doc").to_numpy()
    lo = np.searchsorted(offsets, end - window_len, side="right") - 1
    hi = np.searchsorted(offsets, np.maximum(end - 1, 0), side="right") - 1
    return {
        "unit": np.full(len(tokens), unit, np.int32),
        "tokens": tokens,
        "segment_ids": segs,
        "source_tokens": _source_tokens(
            block.column("source").to_numpy(), np.diff(offsets), window_len, len(plan.sources)
        ),
        "block_key": np.full(len(tokens), first, np.int64),
        "window": np.arange(len(tokens), dtype=np.int64),
        "doc_first": doc[np.clip(lo, 0, max(0, len(doc) - 1))] if len(doc) else lo,
        "doc_last": doc[np.clip(hi, 0, max(0, len(doc) - 1))] if len(doc) else hi,
    }


def _source_tokens(doc_source: np.ndarray, doc_len: np.ndarray, window_len: np.ndarray, n_sources: int):
    """int64[W, n_sources]: tokens of each source in each window. The packer's windows are consecutive slices of
    the block's token stream, so window w holds stream positions [end_w - len_w, end_w)."""
    token_source = np.repeat(doc_source, doc_len)
    end = np.cumsum(window_len)
    if end.size and end[-1] != token_source.size:  # the packer skipped a document: the slices would not line up
        raise ValueError(f"pack_block: windows hold {end[-1]} tokens, the block's documents {token_source.size}")
    start = end - window_len
    out = np.zeros((len(window_len), n_sources), np.int64)
    for s in range(n_sources):
        c = np.concatenate([[0], np.cumsum(token_source == s)])
        out[:, s] = c[end] - c[start]
    return out


def corrupt_block(
    batch: dict[str, np.ndarray],
    plan: DataPlan,
    ocfg,
    seed: int,
    epoch: int,
    seq_len: int,
    architecture: str = "causal",
) -> dict[str, np.ndarray]:
    """Apply the objective to each window with its own (seed, epoch, identity) generator."""
    sp = plan.tokenizer().specials
    rngs = [window_rng(seed, epoch, k, w) for k, w in zip(batch["block_key"], batch["window"])]
    out = objectives.apply_objective_batch(batch["tokens"], batch["segment_ids"], ocfg, sp, rngs, seq_len, architecture)
    out = {k: np.asarray(out[k]) for k in SAMPLE_KEYS}
    out["block_key"], out["window"] = batch["block_key"], batch["window"]
    out["source_tokens"], out["unit"] = batch["source_tokens"], batch["unit"]
    out["doc_first"], out["doc_last"] = batch["doc_first"], batch["doc_last"]
    return out


# ---------------------------------------------------------------------------------------------- entry points
def prepare_data(cfg, run_dir: str | Path | None = None, tokenizer=None, dedup: bool | None = None) -> DataPlan:
    """Check every path, settle the tokenizer (load, or reuse/train the corpus's, saved under run_dir/tokenizer),
    settle the dedup drop list (reused from data.cache_path when this corpus was prepared before).

    Raises ConfigError naming the config field before any Ray work when a path or the tokenizer is wrong.
    `plan.artifacts` says which artifacts were reused and which built (`cglab corpus prepare` prints it).
    """
    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources: no sources configured (see `cglab corpus build`)")
    sources = readers.resolve_files(d.sources)
    weights = source_weights(d.mixture, [s.kind for s in d.sources], [s.weight for s in d.sources])
    root = artifacts.cache_root(d)
    built: dict[str, dict] = {}
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)  # data.tokenizer.path, else the tokenizer that came with model.init_from
        if tokenizer is None:
            tokenizer, built["tokenizer"] = artifacts.trained_tokenizer(d, sources, root)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer.vocab_size: the tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    if len(tokenizer.specials.masks) < d.num_sentinels:
        raise ConfigError(f"data.num_sentinels: tokenizer has only {len(tokenizer.specials.masks)} <mask_k> tokens")
    if run_dir is not None:
        tokenizer.save(Path(run_dir) / "tokenizer")
    plan = DataPlan(
        tuple(sources),
        tuple(float(w) for w in weights),
        tokenizer.to_str(),
        d.num_sentinels,
        tokenizer.max_whitespace_run,
        mix_by=d.mix_by,
        seed=d.seed,
        shuffle_docs=d.shuffle_docs,
        unit_tokens=d.unit_tokens,
    )
    # The drop list and the prepared corpus hold every source, weighted or not: one corpus, one key, so the
    # variants of a lesson that weigh its sources differently (lesson 4) share them and their held-out split.
    active = [s for s in sources if weights[s.index] > 0]
    fcfg = d.filters if dedup is None else d.filters.model_copy(update={"dedup": dedup})
    if fcfg.dedup or fcfg.decontaminate.enabled:  # one drop list: later copies, evaluation problems
        built["dedup"] = artifacts.dedup_drops(sources, fcfg, root)
        plan.dedup_path = built["dedup"]["path"]
    # the stream reads the prepared corpus: filtered, deduplicated and tokenized once (cglab.data.prepared)
    built["tokens"] = prepared.prepared_tokens(
        sources, fcfg, tokenizer, plan.dedup_path, root, d.chunk_tokens, count_as=cfg.track.experiment
    )
    plan.prepared = built["tokens"]["path"]
    if cfg.eval.holdout:  # sampled from the prepared corpus and skipped by the stream: the corpus's key stays
        held = heldout.settle(plan, cfg.eval, d.seq_length, dedup=fcfg.dedup)
        plan.heldout = held.path
        built["heldout"] = {"path": held.path, "built": held.built, "texts": held.texts, **held.counts}
    have = set(prepared.load_index(plan.prepared).source.tolist())
    empty = [s for s in active if s.index not in have]
    if empty:
        raise ConfigError(
            f"data.sources[{empty[0].index}]: no document of source {empty[0].name!r} survives the readers, "
            f"data.filters and dedup, so its weight cannot be met (`cglab data inspect` counts why)"
        )
    plan.artifacts = built
    return plan


def _ordered():
    # Ray: kept off the paths that only read files (sample_texts: `cglab corpus build --tokenizer`)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    return ctx


def build_dataset(
    cfg,
    epoch: int,
    plan: DataPlan | None = None,
    count_documents: bool = False,
    units: list[int] | None = None,
    trace_dir: str | None = None,
):
    """The epoch's samples as a ray.data.Dataset in a fixed order (contract columns + block_key, window, unit).

    `units`: only these units of work, in this order (default all: the dp=1 stream). `count_documents`: export
    the streamed document counts (tagged cfg.track.experiment) while reading.
    """
    plan = plan or prepare_data(cfg)
    _ordered()
    d, S = cfg.data, cfg.data.seq_length
    ds = mix_dataset(
        plan,
        epoch,
        count_as=cfg.track.experiment if count_documents else None,
        units=units,
        trace_dir=trace_dir,
    )
    ds = ds.map_batches(
        pack_block,
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs=dict(plan=plan, seq_len=S, ocfg=cfg.objective, seed=d.seed, epoch=epoch),
    )
    ds = ds.map_batches(
        corrupt_block,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs=dict(
            plan=plan, ocfg=cfg.objective, seed=d.seed, epoch=epoch, seq_len=S, architecture=cfg.model.architecture
        ),
    )
    return ds


def unit_indices(units: np.ndarray, current: int, count: int) -> tuple[np.ndarray, int, int]:
    """Each sample's index inside its unit, for a run of samples in stream order; (current unit, samples of it
    seen so far) carry over between calls."""
    out = np.empty(len(units), np.int64)
    for i, u in enumerate(units.tolist()):  # a few hundred samples per batch: a plain loop is fine
        if u != current:
            current, count = u, 0
        out[i] = count
        count += 1
    return out, current, count


def iter_train_batches(
    cfg,
    epoch: int,
    dp_rank: int,
    dp_size: int,
    start: tuple[int, int] = (0, 0),
    batch_size: int = 1,
    plan: DataPlan | None = None,
    drop_last: bool = True,
    trace_dir: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches of DP rank `dp_rank`'s samples: its units of work (`assign_units`) only, from `start` on.

    `start = (k, offset)`: begin at sample `offset` of the rank's k-th unit; units before k are not read, and of
    unit k only the samples before `offset` are re-read and dropped. Each batch also carries `unit` (unit id),
    `unit_index` (the sample's index in its unit: (unit, unit_index) is its identity in the epoch), `unit_ordinal`
    (k: the unit's place in this rank's list; the position to checkpoint is (k, unit_index + 1) of the last sample)
    and `sample_index` (how many samples this iterator yielded before this one: the rank-local index when start is
    (0, 0); a resumed iterator does not know how many samples the units it skipped hold, by design).
    """
    units = assign_units(plan or prepare_data(cfg), epoch, dp_rank, dp_size)
    k0, offset = (int(v) for v in start)
    if not 0 <= k0 <= len(units):
        raise ValueError(f"start unit {k0} outside this rank's {len(units)} units")
    ordinal = {u: k for k, u in enumerate(units)}
    # Each rank reads only its own documents, so each rank counts what it reads: each document once per epoch.
    ds = build_dataset(cfg, epoch, plan, count_documents=True, units=units[k0:], trace_dir=trace_dir)
    keys = SAMPLE_KEYS + ("source_tokens", "unit", "doc_first", "doc_last")
    extra = ("unit_index", "unit_ordinal", "sample_index")
    buf: dict[str, list[np.ndarray]] = {k: [] for k in keys + extra}
    have, base = 0, 0
    cur, count = -1, 0
    first = units[k0] if k0 < len(units) else -1
    for batch in ds.iter_batches(batch_size=max(batch_size, 64), batch_format="numpy", prefetch_batches=2):
        idx, cur, count = unit_indices(batch["unit"], cur, count)
        sel = (batch["unit"] != first) | (idx >= offset)  # the partial unit's samples before the position
        if not sel.any():
            continue
        n = int(sel.sum())
        for k in keys:
            buf[k].append(batch[k][sel])
        buf["unit_index"].append(idx[sel])
        buf["unit_ordinal"].append(np.array([ordinal[int(u)] for u in batch["unit"][sel]], np.int64))
        buf["sample_index"].append(np.arange(base, base + n, dtype=np.int64))
        base += n
        have += n
        while have >= batch_size:
            cat = {k: np.concatenate(v) for k, v in buf.items()}
            yield {k: v[:batch_size] for k, v in cat.items()}
            buf = {k: [v[batch_size:]] for k, v in cat.items()}
            have -= batch_size
    if have and not drop_last:
        yield {k: np.concatenate(v) for k, v in buf.items()}
