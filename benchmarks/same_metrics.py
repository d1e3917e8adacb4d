"""Whether two lesson sweeps gave the same numbers: the final `eval/*` metrics and `loss` of every (variant, seed) in
two MLflow SQL stores (e.g. benchmarks/trial_overhead.py's WORKDIR/mlflow/mlflow.db before and after a change).

    python benchmarks/same_metrics.py A/mlflow.db B/mlflow.db [--rtol 1e-6]

Prints how many metrics both have, how many differ by more than rtol (relative), the largest difference and the
metrics only one has; exits 1 when any differs or either has one the other lacks."""

from __future__ import annotations

import argparse
import sqlite3
import sys

QUERY = """
select v.value, s.value, m.key, m.value from latest_metrics m
join tags v on v.run_uuid = m.run_uuid and v.key = 'variant'
join tags s on s.run_uuid = m.run_uuid and s.key = 'seed'
where m.key like 'eval/%' or m.key = 'loss'
"""


def final_metrics(db: str) -> dict[tuple[str, str, str], float]:
    """(variant, seed, metric) -> the metric's latest value, for every trial run of the store."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return {(v, s, k): float(x) for v, s, k, x in con.execute(QUERY)}


def compare(a: dict, b: dict, rtol: float) -> tuple[list, list, float]:
    """(keys differing beyond rtol, keys in only one, the largest relative difference)."""
    shared = sorted(set(a) & set(b))
    rel = {k: abs(a[k] - b[k]) / max(1.0, abs(a[k])) for k in shared}
    return [k for k in shared if rel[k] > rtol], sorted(set(a) ^ set(b)), max(rel.values(), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-6)
    args = ap.parse_args()
    a, b = final_metrics(args.a), final_metrics(args.b)
    differ, lone, worst = compare(a, b, args.rtol)
    print(f"{len(set(a) & set(b))} metrics in both; {len(differ)} differ by more than {args.rtol:g} (relative);")
    print(f"largest relative difference {worst:.3g}; only in one: {lone or 'none'}")
    for k in differ[:20]:
        print("  ", k, a[k], b[k])
    return 1 if differ or lone or not a else 0


if __name__ == "__main__":
    sys.exit(main())
