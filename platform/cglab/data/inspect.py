"""`cglab data inspect`: what the training readers, filters, dedup and decontamination make of some sources, as
JSON counts.

Runs the same code as training (`pipeline.scan_dataset` → readers + filters, `dedup.find_survivors`,
`decontam.contaminated`), so a count here is a count of what a run would skip. Output, per source and in total:
`{"read": N, "kept": K, "skipped": {"malformed_json": a, "duplicate": b, "contaminated:humaneval": c, ...},
"subsets": {...}}`. A contaminated later copy counts as contaminated, as in the prepared drop list.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from cglab.data import decontam
from cglab.data.dedup import DUPLICATE, duplicate_mask, find_survivors


def _block_counts(batch: dict) -> dict:
    """Per block: (source, reason) counts, duplicates already marked. Tiny rows that the driver adds up."""
    src, reason = batch["source"], batch["reason"].astype(object)
    keys = [f"{s}\t{r}" for s, r in zip(src.tolist(), reason.tolist())]
    c = Counter(keys)
    subs = Counter(
        f"{s}\t{sub}" for s, sub, r in zip(src.tolist(), batch["subset"].tolist(), reason.tolist()) if r == ""
    )
    names = list(c) + [f"subset\t{k}" for k in subs]
    return {"name": np.array(names, dtype=object), "n": np.array(list(c.values()) + list(subs.values()), np.int64)}


def inspect_sources(sources, fcfg, dedup: bool = True, decontaminate: bool = True) -> dict:
    """Counts for resolved sources (readers.SourceFiles) under a FilterConfig (decontamination as its
    `decontaminate` section says, unless `decontaminate` is False). Needs Ray (starts a local one)."""
    # pyarrow (cglab.data.pipeline): kept off `cglab --help`'s path
    from cglab.data.pipeline import scan_dataset

    index = decontam.load_index(fcfg.decontaminate) if decontaminate else None
    scan = scan_dataset(sources, fcfg).select_columns(["source", "key", "subset", "reason", "sha"]).materialize()
    survivors = find_survivors(scan) if dedup else {}
    ckeys, creasons = decontam.contaminated(sources, fcfg, index) if index else (np.zeros(0, np.int64), None)

    def mark(batch):
        dup = (batch["sha"] != "") & duplicate_mask(batch["sha"].tolist(), batch["key"].tolist(), survivors)
        reason = batch["reason"].astype(object)
        reason[dup] = DUPLICATE
        if len(ckeys):
            at = np.minimum(np.searchsorted(ckeys, batch["key"]), len(ckeys) - 1)
            hit = ckeys[at] == batch["key"]
            reason[hit] = creasons[at[hit]]
        return _block_counts({**batch, "reason": reason})

    totals: Counter = Counter()
    subsets: Counter = Counter()
    for b in scan.map_batches(mark, batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy"):
        for name, n in zip(b["name"].tolist(), b["n"].tolist()):
            if name.startswith("subset\t"):
                _, s, sub = name.split("\t", 2)
                subsets[(int(s), sub)] += n
            else:
                s, r = name.split("\t", 1)
                totals[(int(s), r)] += n
    out: dict = {"sources": {}, "total": {"read": 0, "kept": 0, "skipped": {}}}
    for src in sources:
        per = {r: n for (s, r), n in totals.items() if s == src.index}
        kept = per.pop("", 0)
        entry = {
            "kind": src.kind,
            "files": len(src.files),
            "read": kept + sum(per.values()),
            "kept": kept,
            "skipped": dict(sorted(per.items())),
            "subsets": dict(sorted((sub, n) for (s, sub), n in subsets.items() if s == src.index)),
        }
        out["sources"][src.name] = entry
        out["total"]["read"] += entry["read"]
        out["total"]["kept"] += kept
        for r, n in per.items():
            out["total"]["skipped"][r] = out["total"]["skipped"].get(r, 0) + n
    out["total"]["skipped"] = dict(sorted(out["total"]["skipped"].items()))
    return out
