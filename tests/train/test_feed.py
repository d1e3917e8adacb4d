"""The training feed over the real Ray Data stream: an epoch ends only where train.epochs puts it, a stream that
runs dry before then stops the run with the numbers (never a silent second pass), and each step reports what it
read: tokens per source (passes) and the masked fraction per objective."""

import numpy as np
import pytest

from cglab.config import from_dict

pytestmark = pytest.mark.slow
SEQ, GLOBAL = 64, 4


@pytest.fixture(scope="module")
def ray_local():
    from cglab.raylocal import local_ray

    with local_ray(2):
        yield


def _cfg(micro_sources, tokenizer_dir, *overrides):
    from cglab.config import SourceConfig
    from cglab.data.readers import resolve_files

    pile = next(s for s in micro_sources if s["kind"] == "pile")
    shard = resolve_files([SourceConfig(**pile)])[0].files[0]
    one_file = [dict(pile, paths=[shard])]  # a single small Pile shard
    return from_dict(
        {"data": {"sources": one_file, "seq_length": SEQ, "tokenizer": {"path": str(tokenizer_dir)}}},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.micro_batch_size=2",
            f"train.global_batch_size={GLOBAL}",
            "train.warmup_steps=1",
            "data.filters.dedup=false",
            *overrides,
        ],
    )


def _feed(cfg, tmp_path):
    from cglab.data.pipeline import prepare_data
    from cglab.plan import plan_run
    from cglab.train.checkpoint import DataPosition
    from cglab.train.feed import DataFeed

    plan = prepare_data(cfg, tmp_path)
    run_plan = plan_run(cfg, tokenizer=plan.tokenizer())
    plan.tokens_available = tuple(float(e["tokens"]) for e in run_plan["data"]["sources"])
    return DataFeed(cfg, plan, DataPosition()), run_plan


def test_a_stream_that_runs_dry_stops_the_run_instead_of_starting_a_second_pass(
    ray_local, single_rank, micro_sources, micro_tokenizer, tmp_path
):
    cfg = _cfg(micro_sources, micro_tokenizer.path, "train.train_steps=100000", "objective.kind=codegen2")
    feed, run_plan = _feed(cfg, tmp_path)
    assert any("would run dry" in e for e in run_plan["errors"])  # the plan saw it coming
    masked, steps = [], 0
    with pytest.raises(RuntimeError, match=r"data: epoch 0 of the stream ran dry after (\d+) samples") as err:
        while True:
            feed.next_step()
            steps += 1
            assert feed.pos.epoch == 0
            if "mask_fraction/span" in feed.step_stats:
                masked.append(feed.step_stats["mask_fraction/span"])
    msg = str(err.value)
    assert f"after {steps * GLOBAL} samples ({steps} steps" in msg
    assert f"needs {100000 * GLOBAL} samples" in msg and "train.epochs=1" in msg
    # every token the source holds was read once, by the counts the stream carries and the plan's exact scan
    # (the last partial step is not trained on: a little under one pass)
    assert 0.97 < feed.step_stats["data/passes/pile"] <= 1.0
    # the codegen2 mix corrupts about half the samples, each at its drawn ratio (mean 0.2)
    assert steps > 100 and np.mean(masked) == pytest.approx(0.2, rel=0.1)


def test_epochs_split_the_budget_and_every_epoch_rereads_the_same_data(
    ray_local, single_rank, micro_sources, micro_tokenizer, tmp_path
):
    # clm: every window holds what fits, so an epoch's windows hold the same tokens however they are drawn (a
    # mixed objective packs each window for its own drawn part, which a new epoch re-draws)
    cfg = _cfg(micro_sources, micro_tokenizer.path, "train.train_steps=6", "train.epochs=3", "objective.kind=clm")
    feed, _ = _feed(cfg, tmp_path)
    epochs, passes = [], []
    for _ in range(6):
        feed.next_step()
        epochs.append(feed.pos.epoch)
        passes.append(feed.step_stats["data/passes/pile"])
    assert epochs == [0, 0, 1, 1, 2, 2]  # two steps per epoch: ceil(6 / 3)
    # each epoch reads as much again (in its own shuffled order: the windows' padding differs by a few tokens)
    assert passes[3] == pytest.approx(2 * passes[1], rel=0.01) and passes[5] == pytest.approx(3 * passes[1], rel=0.01)
    with pytest.raises(RuntimeError, match="all train.epochs=3 epochs"):
        feed.next_step()


def test_a_resumed_feed_continues_exactly_and_refuses_another_dp_size(
    ray_local, single_rank, micro_sources, micro_tokenizer, tmp_path
):
    from cglab.config import ConfigError
    from cglab.train.checkpoint import DataPosition
    from cglab.train.feed import DataFeed

    cfg = _cfg(micro_sources, micro_tokenizer.path, "train.train_steps=6")
    feed, _ = _feed(cfg, tmp_path)
    feed.next_step(), feed.next_step()
    pos = feed.pos
    assert pos.dp_size == 1 and len(pos.shards) == 1 and pos.shards[0][1] == 2 * GLOBAL  # (unit 0, offset 8)
    want = feed.next_step()
    again = DataFeed(cfg, feed.plan, pos).next_step()  # a fresh stream from the checkpointed position
    for a, b in zip(want, again):
        assert all((a[k] == b[k]).all() for k in a)
    with pytest.raises(ConfigError, match=r"parallel\.data_parallel_size.*written with data_parallel_size=2"):
        DataFeed(cfg, feed.plan, DataPosition(0, 8, (), 2, ((0, 4), (0, 4))))


def test_each_step_logs_the_token_share_of_each_source_as_planned(
    ray_local, single_rank, micro_sources, micro_tokenizer, tmp_path
):
    """data.mixture=mix is half the tokens from each kind (data.mix_by=tokens): what the feed reads matches the
    plan's token_share, logged per step as data/token_share/<source>, though a micro Stack file holds several times
    the tokens of a micro Pile document."""
    cfg = from_dict(
        _cfg(micro_sources, micro_tokenizer.path).model_dump()
        | {
            "data": _cfg(micro_sources, micro_tokenizer.path).data.model_dump()
            | {"sources": micro_sources, "mixture": "mix"}
        },
        ["train.train_steps=120", "train.global_batch_size=16"],
    )
    feed, run_plan = _feed(cfg, tmp_path)
    assert run_plan["tokens_needed"]["token_share"] == {"pile": 0.5, "stack": 0.5}
    for _ in range(100):  # ~100k tokens
        feed.next_step()
    share = {k.removeprefix("data/token_share/"): v for k, v in feed.step_stats.items() if "token_share" in k}
    assert set(share) == {"pile", "stack"} and sum(share.values()) == pytest.approx(1.0)
    # exact to within one document per unit of work: a micro corpus unit holds 70-140k tokens and ends when its
    # Pile runs dry, up to one code file (~8k tokens) behind; by documents the Pile would be ~20% of the tokens
    assert share["pile"] == pytest.approx(0.5, abs=0.05), share


@pytest.mark.parametrize(
    "stop_at, kinds",
    [("raw_tokens", ("clm", "ul2")), ("loss_tokens", ("clm", "codegen2")), ("raw_tokens", ("clm", "codegen2"))],
)
def test_variants_read_equal_tokens_of_the_declared_kind(
    ray_local, single_rank, micro_sources, micro_tokenizer, tmp_path, stop_at, kinds
):
    """train.stop_at with one train.token_budget: objectives that leave very different raw and loss tokens per
    window end within 1% of each other in the declared count, which each step logs (data/raw_tokens,
    data/loss_tokens: the loss mask's sum, over every DP shard), and the LR schedule has advanced by
    train.train_steps nominal steps when the budget is reached, whatever the step count."""
    budget = 100 * GLOBAL * SEQ  # the least the config accepts: one step is at most 1% of it
    counts, steps = {}, {}
    for kind in kinds:
        cfg = from_dict(
            {"data": {"sources": micro_sources, "seq_length": SEQ, "tokenizer": {"path": str(micro_tokenizer.path)}}},
            [
                "model.preset=tiny",
                "model.max_position_embeddings=64",
                "train.micro_batch_size=2",
                f"train.global_batch_size={GLOBAL}",
                "train.train_steps=100",  # the nominal steps the LR schedule is laid over, not the run's
                "train.warmup_steps=1",
                "data.filters.dedup=false",
                f"objective.kind={kind}",
                f"train.stop_at={stop_at}",
                f"train.token_budget={budget}",
            ],
        )
        feed, _ = _feed(cfg, tmp_path / kind)
        step, loss, raw, progress = 0, 0.0, 0, 0.0
        while not feed.done(step):
            micro = feed.next_step()
            step += 1
            progress += feed.progress
            loss += sum(float(m["loss_mask"].sum()) for m in micro)
            raw += sum(int((m["segment_ids"] >= 0).sum()) for m in micro)
        assert feed.step_stats["data/loss_tokens"] == loss  # the logged count is the samples' own
        if kind == "clm":
            assert feed.step_stats["data/raw_tokens"] == raw  # a clm sample holds its raw tokens unchanged
        counts[kind], steps[kind] = feed.step_stats[f"data/{stop_at}"], step
        assert feed.step_stats["data/budget_used"] == counts[kind] / budget
        assert progress == pytest.approx(100 * counts[kind] / budget)
    a, b = (counts[k] for k in kinds)
    assert abs(a - b) < 0.01 * budget, counts
    assert all(budget <= c < budget * 1.01 for c in counts.values()), counts
    assert steps[kinds[1]] > 1.05 * steps[kinds[0]], steps  # the other objective needed more steps for it
