"""Throughput of packing and of every objective, against a plain-Python span corruption, on one core.

Synthetic documents (lognormal lengths, median ~300 tokens, GPT-2-sized vocabulary) stand in for tokenized code,
so this measures only the data transforms. Tokens/s counts the raw document tokens that go in.
`python benchmarks/bench_objectives.py [--seq-len 2048] [--tokens 2000000]`
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cglab.config import ObjectiveConfig, spans_needed
from cglab.data import objectives as O
from cglab.data.packing import Packer, pack_documents
from cglab.data.specials import Specials


def _docs(n_tokens: int, seed: int, sp: Specials) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(min(rng.lognormal(np.log(300), 1.0), 20_000))
        docs.append(np.append(rng.integers(0, 50_000, n, dtype=np.int32), np.int32(sp.eot)))
        total += n + 1
    return docs


def _best(fn, repeat: int, setup=None) -> tuple[float, object]:
    """Best wall time of fn(setup()) (setup untimed: fresh generators per run), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        out = fn(arg) if setup else fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _row(name: str, tokens: int, seconds: float) -> dict:
    return dict(name=name, tokens=int(tokens), seconds=seconds, tokens_per_s=tokens / seconds)


def run_objective_bench(
    seq_len: int = 2048,
    n_tokens: int = 2_000_000,
    seed: int = 0,
    repeat: int = 3,
    reference_windows: int = 64,
    batch_docs: int = 256,
) -> list[dict]:
    """Rows {name, tokens, seconds, tokens_per_s} (best of `repeat`), all measured in this process."""
    # as many sentinels as UL2's X_dense (50%, mean span 3) can need at this length: the span count follows the ratio
    sp = Specials.contiguous(50_257, max(16, spans_needed(0.5, (2, 4), seq_len)))
    docs = _docs(n_tokens, seed, sp)
    raw = sum(d.size for d in docs)
    rows = []

    def stream_pack(reserve):
        packer = Packer(seq_len, sp, reserve)
        parts = [packer.add(docs[i : i + batch_docs]) for i in range(0, len(docs), batch_docs)]
        parts.append(packer.flush())
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    cfgs = {
        "clm": ObjectiveConfig(kind="clm"),
        "span_corruption (file_level)": ObjectiveConfig(kind="span_corruption"),
        "span_corruption (sequence_level)": ObjectiveConfig(kind="span_corruption", corruption="sequence_level"),
        "codegen2 (p=0.5)": ObjectiveConfig(kind="codegen2"),
        "infill (r=0.5)": ObjectiveConfig(kind="infill"),
        "ul2": ObjectiveConfig(kind="ul2"),
    }
    sec, _ = _best(lambda: stream_pack(O.packing_reserve(cfgs["clm"])), repeat)
    rows.append(_row("pack (clm, no reserve)", raw, sec))
    res = O.packing_reserve(cfgs["span_corruption (file_level)"])
    sec, _ = _best(lambda: stream_pack(res), repeat)
    rows.append(_row(f"pack (file-level reserve {res.per_doc}/doc + {res.per_token:.3f}/token)", raw, sec))

    for name, cfg in cfgs.items():
        tokens, segs = pack_documents(docs, seq_len, sp, O.packing_reserve(cfg))
        n_in = int((segs >= 0).sum())
        rngs = lambda: [O.sample_rng(seed, 0, i) for i in range(len(tokens))]  # noqa: E731
        if name == "clm":
            sec, _ = _best(rngs, repeat)
            rows.append(_row(f"sample_rng per window ({len(tokens)} windows)", n_in, sec))
        sec, _ = _best(lambda r: O.apply_objective_batch(tokens, segs, cfg, sp, r, seq_len), repeat, rngs)
        rows.append(_row(f"objective {name}", n_in, sec))
        if name == "codegen2 (p=0.5)":

            def end_to_end():
                t, s = stream_pack(O.packing_reserve(cfg))
                return O.apply_objective_batch(
                    t, s, cfg, sp, [O.sample_rng(seed, 0, i) for i in range(len(t))], seq_len
                )

            sec, _ = _best(end_to_end, repeat)
            rows.append(_row("pack + codegen2 + rngs (end to end)", raw, sec))

    cfg = cfgs["span_corruption (file_level)"]
    tokens, segs = pack_documents(docs, seq_len, sp, O.packing_reserve(cfg))
    tokens, segs = tokens[:reference_windows], segs[:reference_windows]
    n_in = int((segs >= 0).sum())
    kw = dict(ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max), span_len=(cfg.span_len_min, cfg.span_len_max))
    rngs = lambda: [O.sample_rng(seed, 0, i) for i in range(len(tokens))]  # noqa: E731
    sec, vec = _best(lambda r: O.span_corruption(tokens, segs, sp, r, seq_len, **kw), repeat, rngs)
    rows.append(_row(f"span_corruption vectorised ({len(tokens)} windows)", n_in, sec))
    tl, sl = tokens.tolist(), segs.tolist()
    sec, ref = _best(lambda r: O.span_corruption_reference(tl, sl, sp, r, seq_len, **kw), repeat, rngs)
    rows.append(_row(f"span_corruption plain Python ({len(tokens)} windows)", n_in, sec))
    if not np.array_equal(vec["tokens"], np.array(ref, np.int32)):
        raise AssertionError("vectorised and reference span corruption disagree")
    return rows


def format_table(rows: list[dict]) -> str:
    w = max(len(r["name"]) for r in rows)
    lines = [f"{'step':<{w}}  {'tokens':>10}  {'seconds':>8}  {'Mtok/s':>8}", "-" * (w + 32)]
    lines += [
        f"{r['name']:<{w}}  {r['tokens']:>10}  {r['seconds']:>8.3f}  {r['tokens_per_s'] / 1e6:>8.2f}" for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"seq_len={args.seq_len}, ~{args.tokens} document tokens, 1 core, best of {args.repeat}")
    print(format_table(run_objective_bench(args.seq_len, args.tokens, repeat=args.repeat)))
