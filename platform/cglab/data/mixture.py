"""Weighted mixing of sources by examples (documents), deterministic for a seed.

`source_weights` turns `data.mixture` into one weight per source:
- `weights`: each SourceConfig.weight;
- `pl_only` / `nl_only`: only Stack (programming language) / only Pile (natural language) sources;
- `mix`: half the examples from PL, half from NL (lesson 4's 50/50), split inside each kind by weight.

`interleave` draws, for every next example, its source from those weights with a seeded generator, so the mix is
the same in every run and exact in expectation. The stream ends when a source with positive weight runs dry:
continuing with the others would silently change the ratio the ablation is about.
"""

from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

import numpy as np

from cglab.config import ConfigError

T = TypeVar("T")
KIND_OF = {"stack": "pl", "pile": "nl"}


def source_weights(mixture: str, kinds: Sequence[str], weights: Sequence[float]) -> np.ndarray:
    """Normalised weight per source (0 for sources the mixture leaves out). Raises ConfigError if nothing is left."""
    w = np.asarray(weights, np.float64)
    pl = np.array([KIND_OF[k] == "pl" for k in kinds], bool)
    if mixture == "pl_only":
        w = np.where(pl, w, 0.0)
    elif mixture == "nl_only":
        w = np.where(pl, 0.0, w)
    elif mixture == "mix":
        if w[pl].sum() <= 0 or w[~pl].sum() <= 0:
            raise ConfigError("data.mixture: 'mix' needs a pile (NL) and a stack (PL) source with positive weight")
        w = np.where(pl, 0.5 * w / w[pl].sum(), 0.5 * w / w[~pl].sum())
    elif mixture != "weights":
        raise ConfigError(f"data.mixture: unknown mixture {mixture!r}")
    if w.sum() <= 0:
        need = {"pl_only": "a stack", "nl_only": "a pile"}.get(mixture, "a")
        raise ConfigError(
            f"data.mixture: {mixture!r} leaves no source; need {need} source with positive weight in data.sources"
        )
    return w / w.sum()


def interleave(
    streams: Sequence[Iterator[T]], weights: np.ndarray, rng: np.random.Generator, draw: int = 4096
) -> Iterator[tuple[int, T]]:
    """(source index, item) in a weighted random order; stops when a positive-weight stream is exhausted."""
    live = np.flatnonzero(np.asarray(weights) > 0)
    p = np.asarray(weights)[live] / np.asarray(weights)[live].sum()
    while True:
        for s in live[rng.choice(live.size, size=draw, p=p)]:
            try:
                item = next(streams[s])
            except StopIteration:
                return
            yield int(s), item
