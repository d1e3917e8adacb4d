"""The stream's pack and corrupt stages (data/pipeline.py) pick each window's part of a mixed objective before it
is packed: a window is packed with its own part's reserve (a UL2 S or R window does not carry X_dense's), and the
corrupt stage, drawing from the same generator, makes that very part of it, which always fits."""

import numpy as np
import pyarrow as pa
import pytest

from cglab.config import ObjectiveConfig
from cglab.data import contract as C
from cglab.data import objectives as O
from cglab.data.pipeline import DataPlan, corrupt_block, pack_block, window_rng
from cglab.data.tokenizer import train_tokenizer

SENTINELS = 160  # the most spans X_dense can need at 512 tokens


@pytest.fixture(scope="module")
def plan():
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tok = train_tokenizer(texts, 600, SENTINELS, 32)
    return DataPlan((), (), tok.to_str(), SENTINELS, 32)


def _block(plan, lengths, seed):
    eot = plan.tokenizer().specials.eot
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(10, 300, n), eot).astype(np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])])
    return pa.table(
        {
            "key": pa.array(np.arange(len(docs)) + 1000 * seed, pa.int64()),
            "source": pa.array(np.zeros(len(docs), np.int32)),
            "ids": pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(np.concatenate(docs))),
            "unit": pa.array(np.zeros(len(docs), np.int32)),
            "doc": pa.array(np.arange(len(docs), dtype=np.int64)),
        }
    )


def _stream(plan, ocfg, seq_len, seed=0, epoch=0, blocks=3):
    out = []
    for b in range(blocks):
        lengths = np.random.default_rng([seed, b]).integers(1, 3 * seq_len, 120)
        packed = pack_block(_block(plan, lengths, b + 1), plan, seq_len, ocfg, seed, epoch)
        out.append(corrupt_block(packed, plan, ocfg, seed, epoch, seq_len))  # raises if a window overflows
        out[-1]["raw"] = (packed["segment_ids"] >= 0).sum(1)
        out[-1]["pieces"] = packed["segment_ids"].max(1) + 1
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


@pytest.mark.parametrize("seq_len", [128, 512])
def test_each_ul2_denoiser_packs_with_its_own_reserve(plan, seq_len):
    ocfg = ObjectiveConfig(kind="ul2")
    out = _stream(plan, ocfg, seq_len)
    raw, code = out["raw"][:-1], out["objective"][:-1]  # the block's last window is partial
    s_windows = code == C.UL2_S
    assert s_windows.any() and (code == C.UL2).any()
    # the S denoiser adds nothing: its windows are full, as a clm window is
    assert (raw[s_windows] == seq_len).mean() > 0.6
    # every span denoiser's windows hold the raw tokens its own reserve allows, more than X_dense's would
    bound = O.packing_reserve(ocfg)
    most_under_bound = (seq_len - bound.per_doc) / (1 + bound.per_token)
    assert raw[s_windows].mean() > most_under_bound + 0.2 * seq_len


@pytest.mark.parametrize("kind", ["codegen2", "infill", "ul2"])
def test_the_corrupt_stage_makes_the_part_the_window_was_packed_for(plan, kind):
    """Every window's part, re-drawn from its generator, is the objective code its sample carries, and the
    window was packed with that part's reserve: within it, and (but a block's last window) full for it."""
    ocfg = ObjectiveConfig(kind=kind)
    seq_len, seed, epoch = 128, 3, 1
    out = _stream(plan, ocfg, seq_len, seed, epoch)
    parts = O.part_reserves(ocfg)
    names = {
        "codegen2": [C.CLM, C.SPAN],
        "infill": [C.INFILL, C.CLM],
        "ul2": [C.UL2_S if d.kind == "prefix" else C.UL2 for d in ocfg.ul2_denoisers],
    }[kind]
    for w in range(len(out["objective"])):
        part = int(O.pick(ocfg, window_rng(seed, epoch, out["block_key"][w], out["window"][w]).random()))
        assert out["objective"][w] == names[part]
        r = parts[part]
        cost = out["raw"][w] * (1 + r.per_token) + r.per_doc * out["pieces"][w] + r.per_window
        assert cost <= seq_len + 1e-9
        last = out["window"][w] == out["window"][out["block_key"] == out["block_key"][w]].max()
        if not last:
            assert cost + r.per_doc + 1 + r.per_token > seq_len - 1e-9, f"window {w}: room left for its part"
