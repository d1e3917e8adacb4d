"""Ids of the special tokens every cglab tokenizer carries (the tokens are named in cglab.data.contract).

The tokenizer fills this in; packing and the objectives only ever see ids, never strings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Specials:
    """`<|endoftext|>`, `<pad>`, `<sep>`, `<eom>` and `<mask_1>`…`<mask_N>` (masks[0] is `<mask_1>`)."""

    eot: int
    pad: int
    sep: int
    eom: int
    masks: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "masks", tuple(int(m) for m in self.masks))
        ids = [self.eot, self.pad, self.sep, self.eom, *self.masks]
        if not self.masks:
            raise ValueError("Specials.masks: at least one <mask_k> sentinel is needed")
        if min(ids) < 0:
            raise ValueError(f"Specials: negative token id in {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Specials: ids must be distinct, got {ids}")

    @classmethod
    def contiguous(cls, first: int, num_sentinels: int) -> Specials:
        """eot, pad, sep, eom, <mask_1>… as consecutive ids from `first` (tests, benchmarks)."""
        return cls(
            eot=first,
            pad=first + 1,
            sep=first + 2,
            eom=first + 3,
            masks=tuple(range(first + 4, first + 4 + num_sentinels)),
        )

    def table(self) -> np.ndarray:
        """[pad, sep, eom, mask_1, …] as int32: the objectives copy specials out of this array."""
        return np.array([self.pad, self.sep, self.eom, *self.masks], dtype=np.int32)

    def ids(self) -> np.ndarray:
        """Every special id, for checks that documents hold none of them but their final eot."""
        return np.array([self.eot, self.pad, self.sep, self.eom, *self.masks], dtype=np.int64)


# Offsets into Specials.table(); the objectives build outputs by copying from [window tokens | table].
PAD, SEP, EOM, MASK0 = 0, 1, 2, 3
