"""Tokens/s of every data stage and of the whole Ray Data pipeline on this machine, in one table.

Stages run in this process on one core over the micro corpus (read, filters, dedup hashing, tokenize, pack,
corrupt); beside them the raw HF `tokenizers` batch encode and, from benchmarks/bench_objectives.py, the packing /
objective rows including the plain-Python span-corruption reference. Then the whole pipeline
(read → filter → dedup → mix → tokenize → pack → corrupt) streamed by Ray Data on a private local cluster.
Every row counts document tokens (the tokenizer's output for the documents that survive), so rows compare.
Targets: corruption + packing >= 5M tokens/s per core; whole pipeline >= 250k tokens/s on 2 cores.

`python benchmarks/data_pipeline.py [--seq-len 2048] [--vocab 4096] [--cpus 2]`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _best(fn, repeat=2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def row(name, tokens, seconds, note=""):
    return dict(name=name, tokens=int(tokens), seconds=seconds, tokens_per_s=tokens / seconds, note=note)


def stage_rows(corpus: dict, tok, cfg, seq_len: int) -> list[dict]:
    from cglab.config import FilterConfig, SourceConfig
    from cglab.data import objectives as O
    from cglab.data import readers
    from cglab.data.dedup import content_hashes
    from cglab.data.filters import filter_reasons
    from cglab.data.packing import pack_documents

    srcs = readers.resolve_files(
        [SourceConfig(name=k, kind=k, paths=[f"{corpus['out']}/{k}"]) for k in ("pile", "stack")]
    )
    max_bytes = readers.max_record_bytes(FilterConfig().max_chars)

    def read():
        return [
            r.text
            for s in srcs
            for f in range(len(s.files))
            for r in readers.read_file(s, f, max_bytes)
            if not r.reason
        ]

    t_read, texts = _best(read)
    flat, offsets = tok.encode_batch(texts)
    n_tok = int(flat.size)
    rows = [row("read (zstd JSONL + parquet, per-line parse)", n_tok, t_read, f"{len(texts)} docs")]
    t, reasons = _best(lambda: filter_reasons(texts, cfg.data.filters))
    rows.append(row("filters (avg/max line, digit fraction)", n_tok, t))
    t, _ = _best(lambda: content_hashes(texts))
    rows.append(row("dedup: SHA-256 of content", n_tok, t))
    t, _ = _best(lambda: tok.encode_batch(texts))
    rows.append(row("tokenize (CGTokenizer.encode_batch -> int32)", n_tok, t, f"vocab {tok.vocab_size}"))
    t, _ = _best(lambda: tok.tok.encode_batch_fast(texts, add_special_tokens=False))
    rows.append(row("raw tokenizers encode_batch_fast", n_tok, t, f"rayon threads: {os.cpu_count()} cores"))
    docs = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    reserve = O.packing_reserve(cfg.objective)
    t_pack, (wt, ws) = _best(lambda: pack_documents(docs, seq_len, tok.specials, reserve))
    rows.append(row("pack (codegen2 reserve)", n_tok, t_pack, f"{len(wt)} windows"))

    def corrupt():
        rngs = [np.random.default_rng([1234, 0, i]) for i in range(len(wt))]
        return O.apply_objective_batch(wt, ws, cfg.objective, tok.specials, rngs, seq_len)

    t_cor, _ = _best(corrupt)
    rows.append(row("corrupt (codegen2: clm | span, rng per window)", n_tok, t_cor))
    rows.append(row("pack + corrupt (target >= 5M/s per core)", n_tok, t_pack + t_cor))
    return rows


def pipeline_rows(cfg, plan, cpus: int) -> list[dict]:
    from cglab.data import pipeline

    def run():
        n = 0
        for b in pipeline.build_dataset(cfg, 0, plan).iter_batches(batch_size=256, batch_format="numpy"):
            n += int((b["segment_ids"] >= 0).sum())  # document tokens (+ the few specials corruption adds)
        return n

    t_cold, n = _best(run, repeat=1)
    t_warm, n = _best(run, repeat=1)
    return [
        row(f"whole pipeline, Ray Data, {cpus} CPUs, first run", n, t_cold, "includes worker start-up"),
        row(f"whole pipeline, Ray Data, {cpus} CPUs (target >= 250k/s)", n, t_warm, "warm workers"),
    ]


def format_table(rows: list[dict]) -> str:
    w = max(len(r["name"]) for r in rows)
    out = [f"{'stage':<{w}}  {'tokens':>10}  {'seconds':>8}  {'Mtok/s':>8}  note", "-" * (w + 48)]
    out += [
        f"{r['name']:<{w}}  {r['tokens']:>10}  {r['seconds']:>8.3f}  {r['tokens_per_s'] / 1e6:>8.3f}  "
        f"{r.get('note', '')}"
        for r in rows
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--corpus", help="an existing `cglab corpus build` dir (default: build one in a temp dir)")
    args = ap.parse_args()

    import ray

    from cglab.config import from_dict, spans_needed
    from cglab.data.corpus import build_corpus, corpus_sources
    from cglab.data.pipeline import prepare_data, sample_texts
    from cglab.data.tokenizer import train_tokenizer

    tmp = tempfile.mkdtemp(prefix="cglab_bench_")
    t0 = time.perf_counter()
    corpus = build_corpus(args.corpus or tmp) if not args.corpus else dict(out=args.corpus)
    t_build = time.perf_counter() - t0
    cfg = from_dict(
        {
            "model": {"vocab_size": args.vocab, "max_position_embeddings": args.seq_len},
            "data": {
                "sources": corpus_sources(corpus["out"]),
                "seq_length": args.seq_len,
                "mixture": "weights",
                "tokenizer": {"vocab_size": args.vocab},
                # codegen2's span count follows its ratio: up to 75 spans at 2048 tokens
                "num_sentinels": max(16, spans_needed(0.35, (1, 16), args.seq_len)),
            },
        }
    )
    t0 = time.perf_counter()
    tok = train_tokenizer(sample_texts(cfg.data, cfg.data.tokenizer.train_docs), args.vocab, cfg.data.num_sentinels, 32)
    t_tok = time.perf_counter() - t0

    rows = stage_rows(corpus, tok, cfg, args.seq_len)
    try:
        from bench_objectives import run_objective_bench

        ref = [
            r
            for r in run_objective_bench(args.seq_len, 1_000_000, repeat=2)
            if "plain Python" in r["name"] or "vectorised" in r["name"] or "end to end" in r["name"]
        ]
        rows += [dict(r, name=f"bench_objectives: {r['name']}", note="synthetic docs") for r in ref]
    except ImportError as err:
        print(f"(bench_objectives unavailable: {err})")

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    plan = prepare_data(cfg, tokenizer=tok)
    t_prep = time.perf_counter() - t0
    rows += pipeline_rows(cfg, plan, args.cpus)
    ray.shutdown()

    print(
        f"seq_len={args.seq_len}, vocab={tok.vocab_size}, corpus build {t_build:.1f}s, tokenizer training "
        f"{t_tok:.1f}s, prepare_data (paths + dedup pass on Ray) {t_prep:.1f}s; stages: 1 core, best of 2"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
