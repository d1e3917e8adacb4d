"""Pack a stream of tokenized documents into fixed-length windows, keeping document boundaries.

A window is a contiguous slice of the document stream: `tokens` int32[S] (unused tail = `<pad>`) and
`segment_ids` int32[S] (0, 1, 2, … per document piece, -1 on the unused tail).

Budget. Objectives that add tokens (span corruption: a `<sep>` plus `<mask_k>`, `<mask_k>`, `<eom>` per span;
infill: 4 per document) must still return exactly S tokens without cutting anything. So the packer leaves room
for them: a `Reserve(per_window, per_doc, per_token)` makes every window satisfy

    raw_tokens * (1 + per_token) + per_doc * pieces + per_window <= S

and `cglab.data.objectives.packing_reserve(cfg)` gives the reserve under which every objective fits (it pads the
rest). A mixed objective (codegen2, infill, UL2) picks each window's part before packing, so the stream passes
`reserve_for(w)`: window w's own part's reserve (each is checked as `reserve` is). Span corruption's span count
grows with the unit's length, so its reserve is linear in the tokens (a per-token fraction plus a constant per
unit). CLM packs with no reserve and wastes nothing.

Long documents are split: what fits goes into this window (as long as at least `min_piece` tokens fit after the
reserve), the rest starts the next window; every piece is its own segment. Only the last piece of a document ends
with eot. Packing is greedy and deterministic: the same document stream gives the same windows however it is cut
into `add` batches (the unfinished last window is carried to the next call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from cglab.data.specials import Specials


@dataclass(frozen=True)
class Reserve:
    """Tokens kept free per window, per document piece and per raw token for what an objective adds."""

    per_window: int = 0
    per_doc: int = 0
    per_token: float = 0.0  # a fraction of every raw token (span corruption: spans grow with the unit)

    def __post_init__(self) -> None:
        if self.per_window < 0 or self.per_doc < 0 or not self.per_token >= 0:
            raise ValueError(f"Reserve: negative reserve {self}")


@dataclass
class PackStats:
    docs: int = 0
    tokens: int = 0
    windows: int = 0
    split_pieces: int = 0  # extra pieces made by splitting documents across windows
    skipped_empty: int = 0
    skipped_no_eot: int = 0


@dataclass
class Packer:
    """Streaming greedy packer: `add(docs)` returns the windows completed so far, `flush()` the last one."""

    seq_len: int
    specials: Specials
    reserve: Reserve = Reserve()
    min_piece: int = 1
    stats: PackStats = field(default_factory=PackStats)
    # window number (counted from 0 over this packer's windows) -> that window's reserve; None: `reserve` for all
    reserve_for: Callable[[int], Reserve] | None = None

    def __post_init__(self) -> None:
        self._checked: set[Reserve] = set()
        self._check(self.reserve)
        self._carry = np.zeros(0, np.int32)
        self._carry_ends = np.zeros(0, np.int64)  # piece ends (exclusive) inside the carry

    def _check(self, reserve: Reserve) -> None:
        if reserve in self._checked:
            return
        room = self.seq_len - reserve.per_window - reserve.per_doc
        # the same float expression as _cut's cost of a one-piece window, so an accepted reserve always packs
        first = (1 + reserve.per_token) * self.min_piece + reserve.per_doc
        if first > self.seq_len - reserve.per_window or self.min_piece < 1:
            raise ValueError(
                f"data.seq_length: {self.seq_len} leaves {room} tokens per window after the "
                f"objective's reserve {reserve}; need at least min_piece={self.min_piece}"
            )
        self._checked.add(reserve)

    def _window_reserve(self, w: int) -> Reserve:
        reserve = self.reserve if self.reserve_for is None else self.reserve_for(w)
        self._check(reserve)
        return reserve

    # ------------------------------------------------------------------------------------------ public
    def add(self, docs: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Pack more documents; return (tokens, segment_ids), each int32[W, S], of the windows now complete."""
        pieces = [self._carry]
        for doc in docs:
            doc = np.asarray(doc)
            if doc.size == 0:
                self.stats.skipped_empty += 1
                continue
            if doc.ndim != 1 or doc[-1] != self.specials.eot:
                self.stats.skipped_no_eot += 1
                continue
            pieces.append(doc.astype(np.int32, copy=False))
            self.stats.docs += 1
            self.stats.tokens += doc.size
        flat = np.concatenate(pieces) if len(pieces) > 1 else self._carry
        lengths = np.fromiter((p.size for p in pieces[1:]), np.int64, len(pieces) - 1)
        ends = np.concatenate([self._carry_ends, self._carry.size + np.cumsum(lengths)])
        cuts, rest = self._cut(ends, final=False)
        out = self._windows(flat, ends, cuts)
        self._carry = flat[rest:]
        self._carry_ends = ends[np.searchsorted(ends, rest, side="right") :] - rest
        return out

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """Emit the unfinished last window (if any) and reset the carry."""
        cuts, _ = self._cut(self._carry_ends, final=True)
        out = self._windows(self._carry, self._carry_ends, cuts)
        self._carry = np.zeros(0, np.int32)
        self._carry_ends = np.zeros(0, np.int64)
        return out

    # ------------------------------------------------------------------------------------------ internals
    def _cut(self, ends: np.ndarray, final: bool) -> tuple[list[tuple[int, int]], int]:
        """Greedy window boundaries [(start, end), …] over a stream whose pieces end at `ends`.

        Cost of pieces i..j taken whole from position p: g * (ends[j] - p) + r * (j - i + 1), g = 1 + per_token.
        With key[j] = g * ends[j] + r * j this is key[j] - g * p - r * (i - 1), so the last whole piece is one
        searchsorted.
        """
        keys: dict[Reserve, np.ndarray] = {}  # one key array per reserve in use (a mix has a few)
        cuts: list[tuple[int, int]] = []
        p, n = 0, ends.size
        total = int(ends[-1]) if n else 0
        i = 0

        def cost(end: int, pieces: int) -> float:  # of the window [p, end) holding `pieces` pieces
            return g * (end - p) + r * pieces

        while p < total:
            res = self._window_reserve(self.stats.windows + len(cuts))
            r, cap = res.per_doc, self.seq_len - res.per_window
            g = 1 + res.per_token if res.per_token else 1  # int arithmetic (exact) without it
            if res not in keys:
                keys[res] = g * ends + r * np.arange(ends.size)
            key = keys[res]
            while ends[i] <= p:  # piece holding position p (it may have been cut at p)
                i += 1
            j = int(np.searchsorted(key, cap + g * p + r * (i - 1), side="right")) - 1
            if g != 1:
                # The float key is absolute and rounds differently for another `add` batching: settle j on the
                # relative cost, so the windows stay a function of the document stream alone.
                while j >= i and cost(int(ends[j]), j - i + 1) > cap:
                    j -= 1
                while j + 1 < n and cost(int(ends[j + 1]), j + 2 - i) <= cap:
                    j += 1
            used_end = int(ends[j]) if j >= i else p
            whole = j - i + 1 if j >= i else 0
            if j + 1 < n:  # a piece follows that does not fit whole: split it or close the window
                # the most tokens L of it with cost(used_end + L, whole + 1) <= cap
                take = int((cap - cost(used_end, whole) - r) // g)
                if g != 1:
                    while take > 0 and cost(used_end + take, whole + 1) > cap:
                        take -= 1
                    while cost(used_end + take + 1, whole + 1) <= cap:
                        take += 1
                end = used_end + take if take >= self.min_piece else used_end
                if end > used_end:
                    self.stats.split_pieces += 1
            elif final:
                end = used_end
            else:  # everything left fits: wait for more documents
                break
            cuts.append((p, end))
            p = end
        self.stats.windows += len(cuts)
        return cuts, p

    def _windows(self, flat: np.ndarray, ends: np.ndarray, cuts: list[tuple[int, int]]):
        S = self.seq_len
        if not cuts:
            return np.zeros((0, S), np.int32), np.zeros((0, S), np.int32)
        starts = np.array([c[0] for c in cuts], np.int64)
        lens = np.array([c[1] - c[0] for c in cuts], np.int64)
        # piece index of every stream position: a cumsum of boundary marks; a window's first piece is 0.
        marks = np.zeros(flat.size + 1, np.int32)
        marks[ends[:-1]] = 1
        piece = np.cumsum(marks, dtype=np.int32)
        idx = starts[:, None] + np.arange(S)
        valid = np.arange(S) < lens[:, None]
        np.minimum(idx, flat.size - 1, out=idx)
        tokens = np.where(valid, flat[idx], np.int32(self.specials.pad)).astype(np.int32, copy=False)
        segs = np.where(valid, piece[idx] - piece[starts][:, None], -1).astype(np.int32, copy=False)
        return tokens, segs


def pack_documents(
    docs: Iterable[np.ndarray],
    seq_len: int,
    specials: Specials,
    reserve: Reserve = Reserve(),
    min_piece: int = 1,
    reserve_for: Callable[[int], Reserve] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All windows (the last one partial) of a finite document list: (tokens, segment_ids), int32[W, S]."""
    packer = Packer(seq_len, specials, reserve, min_piece, reserve_for=reserve_for)
    a_tok, a_seg = packer.add(docs)
    b_tok, b_seg = packer.flush()
    return np.concatenate([a_tok, b_tok]), np.concatenate([a_seg, b_seg])
