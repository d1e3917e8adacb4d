"""How the data pipeline's cost grows (issue 14): with the DP size, with the resume position, with the corpus.

Synthetic sources in the real formats (Pile `*.jsonl` records `{"text", "meta": {"pile_set_name"}}`, Stack
`*.parquet` with `content`, `lang`, ...), N documents in all, half each, about 30% exact copies of an earlier
document, `--files` files per source (the units of work). On a private local Ray cluster of `--cpus` CPUs:

(a) CPU seconds of one epoch at DP = 1, 2, 4, 8: every rank's stream (`iter_train_batches`) run to its end, one
    rank after the other; CPU = user+system of the driver and every process under it (Ray's GCS, raylet and
    workers), before and after. Goal: flat in DP (within 10%): each rank reads only its own units.
(b) time to the first batch after resuming at 10%, 50%, 90% of DP rank 0's epoch (dp=1), against a fresh start.
    The position is (unit, offset); only the partial unit is re-read. Goal: flat in the position, within 2x fresh.
    Each position `--repeats` times, interleaved in rotating order. The wall column is the median over the
    measurements during which Ray started no worker process; the note lists the others (a new worker pays its
    imports before the first batch, at any position: see run_size).
(c) dedup: time and peak memory (RSS of the driver and everything under it, sampled every 50 ms) of building the
    drop list, per million documents, and the time for a second prepare to find and reuse it.

`python benchmarks/data_scale.py --docs 10000 100000 [--files 16] [--cpus 2] [--seq-len 256]`
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WORDS = (
    "def return self import class for in if else while yield lambda with as try except value index items "
    "data result count total print list dict range len the of and to a is that it was"
).split()


def synth_corpus(out: Path, n_docs: int, files: int, dup: float = 0.3, seed: int = 0) -> dict:
    """n_docs documents (~400 chars each), a `dup` share of them exact copies of an earlier one, round robin
    over `files` Pile and `files` Stack files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    half = n_docs // 2
    stats = {}
    for kind in ("pile", "stack"):
        docs: list[str] = []
        words = np.array(WORDS)
        for i in range(half):
            if docs and rng.random() < dup:
                docs.append(docs[int(rng.integers(len(docs)))])
                continue
            lines = [
                " ".join(words[rng.integers(len(words), size=int(rng.integers(3, 10)))])
                for _ in range(int(rng.integers(4, 14)))
            ]
            docs.append(
                f"# doc {kind} {i}\n" + "\n".join(("    " if j % 2 else "") + ln for j, ln in enumerate(lines)) + "\n"
            )
        d = out / kind
        d.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            part = docs[f::files]
            if kind == "pile":
                with open(d / f"{f:04d}.jsonl", "w") as fh:
                    for t in part:
                        fh.write(json.dumps({"text": t, "meta": {"pile_set_name": "Github"}}) + "\n")
            else:
                pq.write_table(
                    pa.table(
                        {
                            "content": part,
                            "lang": ["Python"] * len(part),
                            "max_stars_repo_path": [f"r/{i}.py" for i in range(len(part))],
                            "size": [len(t) for t in part],
                        }
                    ),
                    d / f"{f:04d}.parquet",
                )
        stats[kind] = dict(docs=len(docs), unique=len(set(docs)), chars=sum(map(len, docs)))
    return stats


def _procs():
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def _ray_workers() -> set[int]:
    """PIDs of the Ray worker processes (task and actor workers) under this driver."""
    out = set()
    for p in _procs()[1:]:
        try:
            cmd = " ".join(p.cmdline())
            if cmd.startswith("ray::") or "default_worker.py" in cmd:
                out.add(p.pid)
        except Exception:  # a process that just ended
            pass
    return out


def _wait_idle(timeout_s: float = 120.0) -> None:
    """Until every CPU of the local cluster is free again. A closed iterator's read tasks run on to the end of their
    block; measured right after, the next first batch would wait for them or start new worker processes (seconds
    of imports), and the resume rows would time the previous row's leftovers instead of the resume."""
    import ray

    total, deadline = ray.cluster_resources().get("CPU", 0), time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.05)


def cpu_seconds() -> float:
    total = 0.0
    for p in _procs():
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except Exception:  # a process that just ended
            pass
    return total


class PeakRSS:
    """Peak of the summed RSS of the driver and everything under it, sampled in a thread."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()

        def run():
            while not self._stop.is_set():
                tot = 0
                for p in _procs():
                    try:
                        tot += p.memory_info().rss
                    except Exception:
                        pass
                self.peak = max(self.peak, tot)
                time.sleep(0.05)

        self.base = sum(p.memory_info().rss for p in _procs())
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_size(n_docs: int, args, tok) -> list[dict]:
    from cglab.config import from_dict
    from cglab.data import artifacts, pipeline, readers

    work = Path(tempfile.mkdtemp(prefix=f"cglab_scale_{n_docs}_"))
    t0 = time.perf_counter()
    stats = synth_corpus(work / "data", n_docs, args.files)
    t_synth = time.perf_counter() - t0
    sources = [
        {"name": "pile", "kind": "pile", "paths": [str(work / "data" / "pile")]},
        {"name": "stack", "kind": "stack", "paths": [str(work / "data" / "stack")]},
    ]
    cfg = from_dict(
        {
            "model": {"vocab_size": 2048, "max_position_embeddings": args.seq_len},
            "data": {
                "sources": sources,
                "seq_length": args.seq_len,
                "mixture": "mix",
                "cache_path": str(work / "cache"),
            },
        }
    )
    rows = []
    # (c) dedup build, then reuse
    srcs = readers.resolve_files(cfg.data.sources)
    with PeakRSS() as mem:
        c0, t0 = cpu_seconds(), time.perf_counter()
        built = artifacts.dedup_drops(srcs, cfg.data.filters, str(work / "cache"))
        t_build, c_build = time.perf_counter() - t0, cpu_seconds() - c0
    t0 = time.perf_counter()
    again = artifacts.dedup_drops(srcs, cfg.data.filters, str(work / "cache"))
    t_reuse = time.perf_counter() - t0
    assert built["built"] and not again["built"]
    per_m = 1e6 / n_docs
    rows.append(
        dict(
            docs=n_docs,
            what="dedup build",
            wall_s=t_build,
            cpu_s=c_build,
            per_million=f"{t_build * per_m:.0f} s wall, {c_build * per_m:.0f} CPU s",
            note=f"peak RSS {mem.peak / 2**30:.2f} GiB (baseline {mem.base / 2**30:.2f}); "
            f"dropped {built['documents_dropped']} of {n_docs} "
            f"(generated copies: {n_docs - stats['pile']['unique'] - stats['stack']['unique']})",
        )
    )
    rows.append(
        dict(
            docs=n_docs,
            what="dedup reuse (second prepare)",
            wall_s=t_reuse,
            cpu_s=None,
            per_million="",
            note="fingerprint (one stat per file) + marker lookup",
        )
    )
    plan = pipeline.prepare_data(cfg, tokenizer=tok)
    # (a) CPU seconds of one epoch at each DP size, after one first batch has warmed the workers (imports,
    # tokenizer) so that DP=1, measured first, does not also pay for the cold start
    warm = pipeline.iter_train_batches(cfg, 0, 0, 1, batch_size=8, plan=plan)
    next(warm)
    warm.close()
    ref_samples = None
    # --abba runs the DP sizes forward then backward (1 2 4 8 8 4 2 1): on a shared machine a load that drifts
    # over the measurement then weighs on every DP size alike (read the mean of each size's two rows)
    for dp in args.dp + args.dp[::-1] if args.abba else args.dp:
        c0, t0, n = cpu_seconds(), time.perf_counter(), 0
        for r in range(dp):
            for b in pipeline.iter_train_batches(cfg, 0, r, dp, batch_size=64, plan=plan, drop_last=False):
                n += len(b["tokens"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        ref_samples = ref_samples or n
        assert n == ref_samples, (dp, n, ref_samples)  # the ranks together are the whole epoch, once
        rows.append(
            dict(
                docs=n_docs,
                what=f"epoch, DP={dp} (all ranks)",
                wall_s=wall,
                cpu_s=cpu,
                per_million="",
                note=f"{n} samples of {args.seq_len} tokens",
            )
        )
    if args.no_resume:
        print(f"synthetic corpus of {n_docs} docs ({stats}) written in {t_synth:.1f}s", flush=True)
        return rows
    # (b) resume at 10/50/90% of the epoch (dp=1)
    full = [
        (int(k), int(i))
        for b in pipeline.iter_train_batches(cfg, 0, 0, 1, batch_size=256, plan=plan, drop_last=False)
        for k, i in zip(b["unit_ordinal"], b["unit_index"])
    ]

    def first_batch(start) -> tuple[float, int]:
        """Seconds to the first batch from `start`, and how many Ray worker processes were started meanwhile."""
        before = _ray_workers()
        t0 = time.perf_counter()
        it = pipeline.iter_train_batches(cfg, 0, 0, 1, start=start, batch_size=8, plan=plan)
        next(it)
        dt = time.perf_counter() - t0
        started = len(_ray_workers() - before)
        it.close()
        _wait_idle()
        return dt, started

    first_batch((0, 0))  # warm the workers (imports, tokenizer) once for every row alike
    points = {"fresh start": (0, 0)}
    for frac in (0.1, 0.5, 0.9):
        points[f"resumed at {frac:.0%}"] = full[int(frac * len(full))]
    # Interleaved, rotating the order each round: a load that drifts over the measurement, or the state one
    # measurement leaves (idle workers, object store), weighs on every position alike.
    times: dict[str, list[tuple[float, int]]] = {k: [] for k in points}
    names = list(points)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(first_batch(points[name]))

    # The wall column is the median over the measurements that started no Ray worker process: Ray Data cancels a
    # closed stream's running read tasks, the worker that ran one exits, and the next stream's first task then waits
    # for a new worker's imports (seconds) - at any position, by timing alone. The note gives every measurement.
    def warm_median(name: str) -> float:
        warm = [t for t, n in times[name] if n == 0]
        return float(np.median(warm or [t for t, _ in times[name]]))

    fresh = warm_median("fresh start")
    for name, (k, i) in points.items():
        ts = [t for t, _ in times[name]]
        cold = [t for t, n in times[name] if n > 0]
        med = warm_median(name)
        where = "" if name == "fresh start" else f"unit {k} of {args.files}, offset {i}; "
        rows.append(
            dict(
                docs=n_docs,
                what=f"first batch, {name}",
                wall_s=med,
                cpu_s=None,
                per_million="",
                note=f"{where}{med / fresh:.2f}x fresh; {len(ts) - len(cold)} of {len(ts)} with warm workers, "
                f"min {min(ts):.2f} max {max(ts):.2f}"
                + (f"; {len(cold)} started Ray workers: {', '.join(f'{t:.2f}' for t in cold)}" if cold else ""),
            )
        )
    print(f"synthetic corpus of {n_docs} docs ({stats}) written in {t_synth:.1f}s", flush=True)
    return rows


def fmt(rows) -> str:
    out = [f"{'docs':>8}  {'measure':<32} {'wall s':>8} {'CPU s':>8}  {'per 1M docs':<26} note"]
    for r in rows:
        cpu = f"{r['cpu_s']:.1f}" if r["cpu_s"] is not None else "-"
        out.append(f"{r['docs']:>8}  {r['what']:<32} {r['wall_s']:>8.2f} {cpu:>8}  {r['per_million']:<26} {r['note']}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--abba", action="store_true", help="each DP size twice, in the order 1 2 4 8 8 4 2 1")
    ap.add_argument("--no-resume", action="store_true", help="skip (b), the first-batch-after-resume rows")
    ap.add_argument("--repeats", type=int, default=5, help="(b): first batches per position, interleaved")
    args = ap.parse_args()

    import ray

    from cglab.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(1)
    tok = train_tokenizer([" ".join(rng.choice(WORDS, 200)) + "\n    x = 1\n" for _ in range(300)], 1024, 16, 32)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    rows = []
    for n in args.docs:
        rows += run_size(n, args, tok)
        print(fmt(rows), flush=True)
    ray.shutdown()
    print(f"\n{os.cpu_count()} cores, --cpus {args.cpus}, --files {args.files} per source, seq_len {args.seq_len}")


if __name__ == "__main__":
    main()
