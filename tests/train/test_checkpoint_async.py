"""Checkpoints written in the background (train.async_save, Megatron-Core's async save) on one gloo rank: a checkpoint
is never COMPLETE, nor handed on, before its write ended; training goes on meanwhile and the checkpoint still holds
its own step; a write killed in the middle leaves the previous checkpoint as the one to resume from, exactly; a stop
(preemption) and the last step wait for the writes. A held write (`Writes.hold`) keeps the write open as long as a
test looks at it."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest
import torch

from cglab.config import from_dict
from cglab.train import checkpoint
from cglab.train.checkpoint import DataPosition, IncompleteCheckpoint
from cglab.train.checkpoint_writes import Write, Writes

_RUN = ["model.preset=tiny", "train.micro_batch_size=2", "train.global_batch_size=2", "train.warmup_steps=1"]


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 1000, (2, 32), generator=g)
        out.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(2, 32),
                "segment_ids": torch.zeros(2, 32, dtype=torch.long),
            }
        )
    return out


def _losses(state, cfg, batches) -> list[float]:
    from cglab.train.step import train_step

    return [train_step(state, cfg, [b])["loss"] for b in batches]


def _start(writes: Writes, d, state, step: int) -> None:
    writes.start(checkpoint.request(d, state, step, DataPosition(0, 2 * step)), Write(d, step))


def _writers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture
def held(single_rank, tmp_path):
    """A run trained 2 steps with its checkpoint A (step 2) complete, then 2 more steps (their losses: `then`), and
    a background checkpoint B of step 4 whose write is held; 2 steps trained while it is held (`meanwhile`)."""
    from cglab.train.step import build_train_state

    cfg = from_dict({}, _RUN)
    batches = _batches(6)
    state = build_train_state(cfg)
    writes = Writes(background=True)
    a, b = tmp_path / "a", tmp_path / "b"
    _losses(state, cfg, batches[:2])
    _start(writes, a, state, 2)
    writes.finalize(blocking=True)
    assert writes.take() == [Write(a, 2)]
    then = _losses(state, cfg, batches[2:4])
    writes.hold = tmp_path / "gate"
    before = {p.pid for p in _writers()}
    _start(writes, b, state, 4)
    meanwhile = _losses(state, cfg, batches[4:6])  # training goes on while B is written
    writer = [p for p in _writers() if p.pid not in before]
    assert len(writer) == 1  # B's write is in a process of its own, waiting at the gate
    yield SimpleNamespace(
        cfg=cfg,
        batches=batches,
        writes=writes,
        a=a,
        b=b,
        then=then,
        meanwhile=meanwhile,
        gate=writes.hold,
        writer=writer[0],
    )
    writes.abort()  # a test that failed with the write still held leaves no process behind


def test_a_background_checkpoint_is_complete_only_once_its_write_ended(held):
    from cglab.train.step import build_train_state

    w = held.writes
    w.finalize(blocking=False)  # every rank asked: B's write has not ended
    assert w.in_flight and w.take() == []
    assert not (held.b / checkpoint.MARKER).exists() and not (held.b / checkpoint.MANIFEST).exists()
    with pytest.raises(IncompleteCheckpoint, match="marker"):
        checkpoint.verify(held.b)
    assert checkpoint.newest_complete(held.a, held.b) == str(held.a)
    held.gate.touch()
    w.finalize(blocking=True)
    assert w.take() == [Write(held.b, 4)] and not w.in_flight
    assert checkpoint.verify(held.b)["world_size"] == 1
    assert checkpoint.newest_complete(held.a, held.b) == str(held.b)
    # B holds step 4, not the weights the two steps trained during its write left behind
    fresh = build_train_state(held.cfg)
    assert checkpoint.load(held.b, fresh) == (4, DataPosition(0, 8))
    assert _losses(fresh, held.cfg, held.batches[4:6]) == pytest.approx(held.meanwhile, abs=1e-6)


def test_a_write_killed_in_the_middle_resumes_from_the_previous_checkpoint(held):
    """The writer process is killed while B is being written (started: its trainer state, RNG and Megatron's common
    state are on disk; its shards are not): B never becomes COMPLETE, and the run resumes from A with the losses of
    the run that was never interrupted."""
    from cglab.train.step import build_train_state

    assert held.writes.abort() == [Write(held.b, 4)]
    assert not held.writer.is_running() or held.writer.status() == psutil.STATUS_ZOMBIE
    held.gate.touch()  # nothing is left to go on writing
    assert not (held.b / checkpoint.MARKER).exists() and (held.b / checkpoint.STATE).exists()
    good = checkpoint.newest_complete(held.a, held.b)
    assert good == str(held.a)
    fresh = build_train_state(held.cfg)
    assert checkpoint.load(good, fresh) == (2, DataPosition(0, 4))
    again = _losses(fresh, held.cfg, held.batches[2:6])
    assert again == pytest.approx(held.then + held.meanwhile, abs=1e-6)


def test_the_checkpointer_hands_on_only_complete_checkpoints_and_a_stop_waits_for_the_writes(single_rank, tmp_path):
    """The Checkpointer of a run with train.async_save, checkpointing every 3 steps with each write held: step 3's
    checkpoint is not handed on (to RayReport, which gives it to Ray Train) while held, then at a later step
    boundary, COMPLETE. A stop (preemption) at step 7 comes with step 6's write held: the stop checkpoint is handed
    on COMPLETE, with no write left in flight, when the step's callbacks return (the loop then ends)."""
    import threading

    from cglab.train import callbacks as cb
    from cglab.train.step import build_train_state, train_step

    cfg = from_dict({}, [*_RUN, "train.async_save=true", "train.checkpoint_every=3", "train.train_steps=100"])
    state = build_train_state(cfg)
    assert state.decisions.async_save
    feed = SimpleNamespace(pos=DataPosition())  # the data position a checkpoint records
    ckpt = cb.Checkpointer(cfg, state, feed, tokenizer_json="{}")
    gates = {3: tmp_path / "gate3", 6: tmp_path / "gate6"}
    handed: dict[int, int] = {}  # step -> the step of the checkpoint handed on there
    try:
        for step, batch in enumerate(_batches(7), start=1):
            if step in gates:
                ckpt.writes.hold = gates[step]
            if step == 5:
                gates[3].touch()
            stop = step == 7
            if stop:
                assert ckpt.writes.in_flight  # step 6's write is held
                # released while the stop waits (how long after does not matter: the stop waits as long as it takes)
                threading.Timer(0.5, gates[6].touch).start()
            train_step(state, cfg, [batch])
            s = cb.StepEnd(step, {}, 0.0, 1.0, stop=stop)
            ckpt.on_step_end(s)
            if step == 4:  # step 3's write is held
                assert s.checkpoint is None and ckpt.writes.in_flight
                with pytest.raises(IncompleteCheckpoint):
                    checkpoint.verify(checkpoint.local_dir(ckpt.staging, 3))
            if s.checkpoint is not None:
                checkpoint.verify(s.checkpoint)  # complete when handed on
                handed[step] = s.metrics["checkpoint_step"]
        assert handed[7] == 7 and not ckpt.writes.in_flight  # the stop checkpoint, before the loop ends
        # nothing before the gate opened; step 3's checkpoint by the next checkpoint step at the latest, where a new
        # write first waits for the one in flight
        assert min(handed) in (5, 6) and handed[min(handed)] == 3
    finally:
        ckpt.on_end()
    assert not ckpt.staging.exists()
