"""The prepared corpus and its units of work at the real corpus shapes (issue 24, item 8), beside the code before it
(main 4bcc15a: units = `mix_specs`, a raw-text stream tokenizing on the fly).

(a) Balance, by simulation (no reading): a piece index with the Pile's shape and the Stack's Python subset's, cut
    into pieces of `data.chunk_tokens` (1M) tokens as `prepared._write_file` cuts them (full pieces, then the rest),
    run through the stream's own `pipeline.compose_units` and `pipeline.owners` at the default `data.unit_tokens`.
    For DP = 8, 64, 512 and the mixtures "stack only" and "pile+stack 50/50 by tokens": units of work, the lockstep
    fraction (the share of each epoch the rank with the least yield lets train: dp * min / sum of the ranks'
    yields) and the share of each source an epoch reads (as `cglab plan` computes it, train/plan.py::_epoch_reads).
    Beside it the old rule: unit t = the t-th contiguous slice of every active source's files, as many units as
    the active source with the fewest files has files, ranks balanced by compressed bytes, DP > units refused; the
    same token weights (the old stream weighed documents: kept out so the rows differ by the unit rule alone).
    Goal: every rank ends within one global batch of the others (lockstep ~1) and DP up to 512 runs.
    Assumed shapes (flags change them): the Pile as distributed, 30 shards `00..29.jsonl.zst` of ~14 GB each, ~300 B
    tokens in all (GPT-NeoX tokenizer; 825 GiB of text), so ~10 B tokens a shard, sizes +-5%; the Stack's Python
    subset (the-stack-dedup data/python) ~20 B tokens (~60 GB of text at ~3 bytes a token) in 200 parquet files,
    sizes +-30% (HF shards are cut by rows, and file lengths vary). Compressed bytes: tokens x a ratio per source
    with 2% jitter per file (compression varies with content).
(b) Tokens per CPU second on one process: the old stream's per-document work (readers + filters + tokenizer:
    `pipeline._kept_documents` + `pipeline.tokenized`) against the new one's (`prepared.read_piece` through the
    shuffle buffer `pipeline._piece_documents`), on a package corpus (`build_package_corpus`) prepared here. Both
    yield the same documents and tokens (checked). ABBA-interleaved, `--repeats` times; CPU = time.process_time
    (every thread of the process, so the tokenizer's own threads count); the median per side and the ratio.
    Neither applies a dedup drop list. Goal: the tokenized stream at least as fast per core as the raw one.
(c) Prepare: `prepared._write_file` for every file of that corpus in one fresh process: CPU seconds, documents and
    tokens, each file's peak RSS over the RSS before it (VmHWM, reset per file), per million documents and per
    billion tokens, extrapolated to the Pile (~210 M documents) + the Stack's Python subset (~13 M files): by
    documents and by tokens (the package corpus's documents are shorter: ~850 tokens against ~1,450).

`python benchmarks/data_prepared.py [--repeats 3] [--code-mb 30] [--nl-mb 6] [--corpus DIR]`
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

PILE = dict(files=30, tokens=300e9, spread=0.05, bytes_per_token=14e9 / 10e9, docs=210e6)
STACK = dict(files=200, tokens=20e9, spread=0.30, bytes_per_token=0.9, docs=13e6)


# ---------------------------------------------------------------------------------------------- (a) balance
def file_tokens(shape: dict, rng) -> np.ndarray:
    n = shape["files"]
    return shape["tokens"] / n * rng.uniform(1 - shape["spread"], 1 + shape["spread"], n)


def pieces(tokens: np.ndarray, chunk: int) -> np.ndarray:
    """Each file's full pieces of `chunk` tokens, then its rest (what `prepared._write_file` writes, give or take
    the document that would cross the boundary)."""
    out = []
    for t in tokens:
        full, rest = divmod(int(t), chunk)
        out += [chunk] * full + ([rest] if rest else [])
    return np.asarray(out, np.int64)


def lockstep(yields: np.ndarray, sizes, dp: int) -> float:
    from cglab.data.pipeline import owners

    owner = owners(list(sizes), dp)
    per_rank = np.bincount(owner, weights=yields, minlength=dp)
    return float(dp * per_rank.min() / per_rank.sum())


def new_rule(toks: dict, w: dict, dp: int, chunk: int, unit_tokens: int, seed: int = 0) -> dict:
    from cglab.data.pipeline import compose_units

    names = list(toks)
    per = [pieces(toks[n], chunk) for n in names]
    source = np.concatenate([np.full(len(p), i) for i, p in enumerate(per)])
    weights = np.array([w[n] for n in names])
    members, yields = compose_units(source, np.concatenate(per), weights, seed, 0, unit_tokens)
    out = dict(units=len(members), pieces={n: len(p) for n, p in zip(names, per)})
    if dp > len(members):
        return out | dict(refused=True)
    ls = lockstep(yields, yields.tolist(), dp)
    share = {n: float(yields.sum() * w[n] / toks[n].sum() * ls) for n in names if w[n] > 0}
    return out | dict(lockstep=ls, share=share, spread=float(yields.max() / yields.min()))


def old_rule(toks: dict, nbytes: dict, w: dict, dp: int) -> dict:
    """Main 4bcc15a's `mix_specs` + `assign_units`: contiguous file slices, balanced by bytes."""
    active = [n for n in toks if w[n] > 0]
    m = min(len(toks[n]) for n in active)
    sl = {n: np.array_split(np.arange(len(toks[n])), m) for n in active}
    unit_bytes = [sum(float(nbytes[n][sl[n][t]].sum()) for n in active) for t in range(m)]
    yields = np.array([min(toks[n][sl[n][t]].sum() / w[n] for n in active) for t in range(m)])
    if dp > m:
        return dict(units=m, refused=True)
    ls = lockstep(yields, unit_bytes, dp)
    share = {n: float(yields.sum() * w[n] / toks[n].sum() * ls) for n in active}
    return dict(units=m, lockstep=ls, share=share)


def balance_table(args) -> list[str]:
    rng = np.random.default_rng(args.seed)
    toks = {"pile": file_tokens(PILE, rng), "stack": file_tokens(STACK, rng)}
    nbytes = {
        n: toks[n] * shape["bytes_per_token"] * rng.normal(1, 0.02, len(toks[n]))
        for n, shape in (("pile", PILE), ("stack", STACK))
    }
    mixes = {"stack only": {"pile": 0.0, "stack": 1.0}, "pile+stack 50/50": {"pile": 0.5, "stack": 0.5}}
    head = f"{'mixture':<17} {'DP':>4} | {'old: units':>10} {'lockstep':>8} {'read':<22} | "
    head += f"{'new: units':>10} {'lockstep':>8} {'read':<22} {'yield max/min':>13}"
    lines = [head, "-" * len(head)]

    def cells(r):
        if r.get("refused"):
            return f"{r['units']:>10} {'refused':>8} {'DP > units':<22}"
        read = " ".join(f"{n} {v:.1%}" for n, v in r["share"].items())
        return f"{r['units']:>10} {r['lockstep']:>8.4f} {read:<22}"

    for name, w in mixes.items():
        for dp in args.dp:
            old = old_rule(toks, nbytes, w, dp)
            new = new_rule({n: toks[n] for n in toks if w[n] > 0}, w, dp, args.chunk_tokens, args.unit_tokens)
            spread = f"{new['spread']:>13.3f}" if "spread" in new else f"{'':>13}"
            lines.append(f"{name:<17} {dp:>4} | {cells(old)} | {cells(new)} {spread}")
    piece_counts = new_rule(toks, {"pile": 0.5, "stack": 0.5}, 1, args.chunk_tokens, args.unit_tokens)["pieces"]
    lines.append(
        f"pieces at chunk_tokens={args.chunk_tokens}: {piece_counts}; unit_tokens={args.unit_tokens}; "
        f"files: pile {PILE['files']} ({PILE['tokens'] / 1e9:.0f} B tokens), stack {STACK['files']} "
        f"({STACK['tokens'] / 1e9:.0f} B tokens)"
    )
    return lines


# ---------------------------------------------------------------------------------------------- (b), (c) corpus
def corpus(args):
    """(sources, filters, tokenizer) of the package corpus, built once under --corpus."""
    from cglab.config import from_dict
    from cglab.data import readers
    from cglab.data.corpus import build_package_corpus
    from cglab.data.pipeline import sample_texts
    from cglab.data.tokenizer import CGTokenizer, train_tokenizer

    root = Path(args.corpus)
    if not (root / "summary.json").exists():
        build_package_corpus(root, code_bytes=args.code_mb << 20, nl_chars=args.nl_mb << 20, shards=args.shards)
    cfg = from_dict(
        {
            "data": {
                "sources": [
                    {"name": "pile", "kind": "pile", "paths": [str(root / "pile")]},
                    {"name": "stack", "kind": "stack", "paths": [str(root / "stack")]},
                ]
            }
        }
    )
    tok_file = root / f"tokenizer-{args.vocab}.json"
    if not tok_file.exists():
        tok = train_tokenizer(sample_texts(cfg.data, 4000), args.vocab)
        tok_file.write_text(tok.to_str())
    tok = CGTokenizer.from_str(tok_file.read_text(), 16, 32)
    return readers.resolve_files(cfg.data.sources), cfg.data.filters, tok


def _rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(field + ":"))


def _reset_peak() -> None:
    """Restart VmHWM at the current RSS (Linux clear_refs): getrusage's ru_maxrss cannot be reset, so the imports'
    and the tokenizer's peak would hide the prepare's."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def prepare_child(args, q) -> None:
    """(c) in a fresh process: every file's `_write_file`, one after the other; CPU, and each file's peak RSS over
    the RSS before it."""
    from cglab.data import prepared

    srcs, fcfg, tok = corpus(args)
    tok_args = (tok.to_str(), tok.num_sentinels, tok.max_whitespace_run)
    root = str(Path(args.corpus) / f"prepared-{args.chunk_small}")
    c0, rows, per_file = time.process_time(), [], []
    for src in srcs:
        for f in range(len(src.files)):
            before = _rss("VmRSS")
            _reset_peak()
            rows.append(prepared._write_file(src, f, fcfg, tok_args, "", root, args.chunk_small))
            out = os.path.getsize(prepared.piece_file(root, src.index, f))
            per_file.append((out, _rss("VmHWM") - before))
    cpu = time.process_time() - c0
    meta = prepared.write_index(srcs, rows, root, args.chunk_small)
    read = sum(sum(r["skipped"].values()) for r in rows)  # kept + every skip reason: every record read
    text = sum(os.path.getsize(p) for s in srcs for p in s.files)
    tokens = sum(s["tokens"] for s in meta["sources"].values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    big = big_file(args, fcfg, tok_args) if args.big > 0 else None
    q.put(
        dict(cpu=cpu, read=read, meta=meta, root=root, text=text, tokens=tokens, per_file=per_file, maxrss=rss, big=big)
    )


def big_file(args, fcfg, tok_args) -> dict:
    """How one file's peak RSS grows with what it writes: every Stack row of the corpus `--big` times in one parquet
    file (row groups of 1,000 rows, so the reader holds little), through `_write_file`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cglab.config import SourceConfig
    from cglab.data import prepared, readers

    src_dir = Path(args.corpus) / f"big-{args.big}" / "stack"
    src_dir.mkdir(parents=True, exist_ok=True)
    path = src_dir / "00.parquet"
    if not path.exists():
        t = pa.concat_tables(
            pq.read_table(p, columns=["content"]) for p in sorted(Path(args.corpus, "stack").iterdir())
        )
        pq.write_table(pa.concat_tables([t] * args.big), path, row_group_size=1000)
    (src,) = readers.resolve_files([SourceConfig(name="stack", kind="stack", paths=[str(src_dir)])])
    root = str(src_dir.parent / "prepared")
    before = _rss("VmRSS")
    _reset_peak()
    res = prepared._write_file(src, 0, fcfg, tok_args, "", root, args.chunk_small)
    peak = _rss("VmHWM") - before
    tokens = sum(t for _, t in res["pieces"])
    return dict(
        text=path.stat().st_size, tokens=tokens, out=os.path.getsize(prepared.piece_file(root, 0, 0)), peak=peak
    )


def raw_pass(srcs, fcfg, tok) -> int:
    from cglab.data import readers
    from cglab.data.pipeline import _kept_documents, tokenized

    max_bytes, n = readers.max_record_bytes(fcfg.max_chars), 0
    for src in srcs:
        for f in range(len(src.files)):
            for _, ids in tokenized(_kept_documents(src, [f], fcfg, "", max_bytes), tok):
                n += len(ids)
    return n


def prepared_pass(plan, seed: int) -> int:
    from cglab.data import prepared
    from cglab.data.pipeline import _piece_documents

    idx, n, opened = prepared.load_index(plan.prepared), 0, {}
    rng = np.random.default_rng(seed)
    for s in sorted(set(idx.source.tolist())):
        rows = np.flatnonzero(idx.source == s)
        for _, ids in _piece_documents(plan, rng.permutation(rows), rng, opened):
            n += len(ids)
    return n


def throughput(args, prep: dict) -> tuple[list[str], dict]:
    from cglab.data.pipeline import DataPlan

    srcs, fcfg, tok = corpus(args)
    plan = DataPlan(
        tuple(srcs), (0.5, 0.5), tok.to_str(), tok.num_sentinels, tok.max_whitespace_run, prepared=prep["root"]
    )
    sides = {"A raw": lambda: raw_pass(srcs, fcfg, tok), "B prepared": lambda r=[0]: prepared_pass(plan, r[0])}
    raw_pass(srcs, fcfg, tok), prepared_pass(plan, 0)  # warm: page cache, imports, the tokenizer's thread pool
    rates: dict[str, list[float]] = {k: [] for k in sides}
    loads, tokens = [], set()
    for _ in range(args.repeats):
        for name in ("A raw", "B prepared", "B prepared", "A raw"):
            loads.append(os.getloadavg()[0])
            c0 = time.process_time()
            n = sides[name]()
            rates[name].append(n / (time.process_time() - c0))
            tokens.add(n)
    assert len(tokens) == 1, tokens  # both streams yield the same documents and tokens
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"{'stream (one process)':<34} {'tokens/CPU s (median)':>22}  all runs (M tokens/CPU s)"]
    for k, v in rates.items():
        lines.append(f"{k:<34} {med[k] / 1e6:>20.2f} M  {' '.join(f'{x / 1e6:.2f}' for x in v)}")
    lines.append(f"ratio prepared / raw: {med['B prepared'] / med['A raw']:.1f}x; {tokens.pop():,} tokens a pass")
    return lines, dict(load=(min(loads), max(loads)))


def prepare_lines(args, prep: dict) -> list[str]:
    cpu_m, cpu_bt = prep["cpu"] * 1e6 / prep["read"], prep["cpu"] * 1e9 / prep["tokens"]
    docs = sum(s["documents"] for s in prep["meta"]["sources"].values())
    out = sum(o for o, _ in prep["per_file"])
    growth = max(g for _, g in prep["per_file"])
    big = prep["big"]
    total_docs, total_tokens = PILE["docs"] + STACK["docs"], PILE["tokens"] + STACK["tokens"]
    pile_file_out = PILE["tokens"] / PILE["files"] * out / prep["tokens"]
    return [
        f"read {prep['read']:,} documents ({docs:,} kept), {prep['tokens'] / 1e6:.1f} M tokens, "
        f"{prep['text'] / 1e6:.1f} MB of files, {prep['meta']['pieces']} pieces, {out / 1e6:.1f} MB written",
        f"CPU {prep['cpu']:.1f} s: {cpu_m:,.0f} CPU s per million documents, {cpu_bt:,.0f} CPU s per billion tokens",
        f"RSS: the largest peak of a corpus file {growth / 2**20:.0f} MiB over the RSS before it (the first file of "
        f"a source pays the imports and the tokenizer); the process's ru_maxrss {prep['maxrss'] / 2**20:.0f} MiB",
        f"one big file (the Stack rows x {args.big}): {big['tokens'] / 1e6:.0f} M tokens, writes "
        f"{big['out'] / 1e6:.0f} MB, peak {big['peak'] / 2**20:.0f} MiB over the RSS before it (pieces stream to "
        f"storage: the peak does not follow the file's size; compare --big 12)"
        if big
        else "no big file (--big 0)",
        f"Pile + Stack-Python ({total_docs / 1e6:.0f} M documents, {total_tokens / 1e9:.0f} B tokens): "
        f"{cpu_m * total_docs / 1e6 / 3600:,.0f} CPU hours by documents, "
        f"{cpu_bt * total_tokens / 1e9 / 3600:,.0f} by tokens; one Pile shard "
        f"({PILE['tokens'] / PILE['files'] / 1e9:.0f} B tokens) writes ~{pile_file_out / 1e9:.0f} GB",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--chunk-tokens", type=int, default=1 << 20, help="(a) data.chunk_tokens")
    ap.add_argument("--unit-tokens", type=int, default=1 << 22, help="(a) data.unit_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="(b) ABBA rounds")
    ap.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "cglab_data_prepared"))
    ap.add_argument("--code-mb", type=int, default=30)
    ap.add_argument("--nl-mb", type=int, default=6)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--chunk-small", type=int, default=1 << 18, help="(b, c) chunk_tokens of the small corpus")
    ap.add_argument("--big", type=int, default=4, help="(c) one file of the Stack rows this many times; 0: none")
    ap.add_argument("--skip-measure", action="store_true", help="(a) only")
    args = ap.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"benchmarks/data_prepared.py at commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {cpu or platform.machine()}")
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("(a) units of work at the real shapes (simulated piece index; old = main 4bcc15a's mix_specs)")
    print("\n".join(balance_table(args)), flush=True)
    if args.skip_measure:
        return
    corpus(args)  # build the package corpus and its tokenizer once, before anything is timed
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=prepare_child, args=(args, q))
    p.start()
    prep = q.get()
    p.join()
    lines, info = throughput(args, prep)
    print(f"\n(b) one process, ABBA x {args.repeats}, load average {info['load'][0]:.1f}-{info['load'][1]:.1f}")
    print("\n".join(lines))
    print(f"\n(c) prepare: `prepared._write_file` on every file, one fresh process, chunk_tokens={args.chunk_small}")
    print("\n".join(prepare_lines(args, prep)))
    print(f"\nload average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(json.dumps({"prepare": {k: v for k, v in prep.items() if k != "meta"}}, default=str))


if __name__ == "__main__":
    main()
