"""Weighted mixing of sources, by training tokens (the default) or by documents, deterministic for a seed.

`source_weights` turns `data.mixture` into one weight per source:
- `weights`: each SourceConfig.weight;
- `pl_only` / `nl_only`: only Stack (programming language) / only Pile (natural language) sources;
- `mix`: half from PL, half from NL (lesson 4's 50/50), split inside each kind by weight.

What a weight is a share of is `data.mix_by`:
- `tokens` (default): the share of the tokens the model trains on. The CodeGen2 paper samples training *examples*
  (fixed-length sequences) equally from the Pile and the Stack, "so exposure to each domain is reduced by 50%";
  Megatron's blended datasets, OLMo-core and Levanter weigh the same way. `interleave` then takes, for every next
  document, the live source furthest behind its share of the tokens emitted so far (smooth weighted round robin on
  token counts): every prefix of the stream is within one document of the weights.
- `documents`: the share of documents, drawn at random with a seeded generator (exact in expectation). With NL
  documents of ~300 tokens and code files of ~6,000, "50/50" by documents is ~5% NL by tokens.

The stream ends when a source with positive weight runs dry: continuing with the others would silently change
the ratio the ablation is about (`cglab plan` says how much of each source an epoch reads).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from cglab.config import ConfigError

T = TypeVar("T")
KIND_OF = {"stack": "pl", "pile": "nl"}
MIX_BY = ("tokens", "documents")  # what a weight is a share of (data.mix_by)


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
    streams: Sequence[Iterator[T]],
    weights: np.ndarray,
    rng: np.random.Generator,
    draw: int = 4096,
    size: Callable[[T], int] | None = None,
) -> Iterator[tuple[int, T]]:
    """(source index, item) mixed by `weights`; stops when a positive-weight stream is exhausted.

    `size=None`: by items (documents), each next source drawn at random from the weights. `size` given (an item's
    token count): by tokens, each next item from the live source with the least emitted tokens per unit of weight
    (ties: the lower index), so each source's share of the tokens emitted so far is its weight to within one item.
    """
    w = np.asarray(weights, np.float64)
    live = np.flatnonzero(w > 0)
    if size is not None:
        sent = np.zeros(len(w), np.float64)
        while True:
            s = int(live[np.argmin(sent[live] / w[live])])
            try:
                item = next(streams[s])
            except StopIteration:
                return
            sent[s] += size(item)
            yield s, item
    p = w[live] / w[live].sum()
    while True:
        for s in live[rng.choice(live.size, size=draw, p=p)]:
            try:
                item = next(streams[s])
            except StopIteration:
                return
            yield int(s), item
