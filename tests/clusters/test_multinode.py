"""On the multi-node test bed (tests/clusters/multinode.py: a head with 0 CPUs, two worker nodes that cannot see
the driver's files, S3 storage): `cglab train` with its run in the bucket, then resumed from the bucket.
Everything a worker reads must come through the storage URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cglab import storage
from cglab.config import dump_config, from_dict

pytestmark = pytest.mark.slow


def _on(node: str):
    """Ray options that pin a task to a worker node (its custom resource)."""
    return {"resources": {node: 0.01}, "num_cpus": 0}


def test_worker_nodes_see_the_bucket_and_not_the_driver(on_cluster, tmp_path):
    """The bed itself: a file the driver writes locally does not exist on a worker node; an object in the bucket
    does, through the nodes' own AWS_* env."""
    import pyarrow.fs as pafs
    import ray

    local = tmp_path / "driver-only.txt"
    local.write_text("x")
    with on_cluster.s3().open_output_stream(f"{on_cluster.bucket}/probe/x.txt") as f:
        f.write(b"from the driver")

    @ray.remote
    def look(path: str, uri: str):
        import os

        fs, p = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(p) as f:
            return os.path.exists(path), f.read(), os.environ["HOME"]

    for node in ("node_a", "node_b"):
        seen, data, home = ray.get(
            look.options(**_on(node)).remote(str(local), f"s3://{on_cluster.bucket}/probe/x.txt")
        )
        assert (seen, data) == (False, b"from the driver")
        assert home == str(on_cluster.nodes[node].scratch / "home")


@pytest.fixture(scope="module")
def s3_sources(cluster, micro_corpus):
    """data.sources of the micro corpus copied to the bucket (uploaded once per module)."""
    data = cluster.upload(micro_corpus["out"], "data")
    return [
        {"name": "pile", "kind": "pile", "paths": [f"{data}/pile"]},
        {"name": "stack", "kind": "stack", "paths": [f"{data}/stack"]},
    ]


def _train(cfg_path, storage: str, name: str, capsys, *overrides: str) -> dict:
    """`cglab train` in this process (the function the console script calls); its printed result."""
    from cglab.cli import main

    rc = main(["train", str(cfg_path), "--storage", storage, "--name", name, *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, (out + err)[-3000:]
    return json.loads(out[out.index("{") : out.rindex("}") + 1])


def test_train_writes_checkpoints_to_the_bucket_and_resumes_from_them(on_cluster, s3_sources, capsys, tmp_path):
    """Two data-parallel workers on nodes without the driver's files: the sources, the prepared corpus (no
    data.cache_path: it goes with the run's storage) and the checkpoints are in the bucket; the same command with
    more steps resumes from the last checkpoint there."""
    from ray.train import Checkpoint

    from cglab.train import checkpoint

    cfg = from_dict(
        {
            "data": {
                "sources": s3_sources,
                "seq_length": 64,
                "tokenizer": {"vocab_size": 1024, "train_docs": 300},
            }
        },
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.warmup_steps=1",
            "train.train_steps=4",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "parallel.data_parallel_size=2",
            "data.filters.dedup=false",
            "track.system_metrics=false",
        ],
    )
    cfg_path = Path.cwd() / "train.yaml"  # the driver's working directory: hidden from the worker nodes
    cfg_path.write_text(dump_config(cfg))
    storage = f"s3://{on_cluster.bucket}/runs"

    first = _train(cfg_path, storage, "mn", capsys)
    assert (first["step"], first["started_at_step"]) == (4, 0)
    keys = on_cluster.keys("runs/mn")
    ckpts = sorted({k.split("/")[2] for k in keys if k.count("/") >= 3 and k.split("/")[2].startswith("checkpoint_")})
    assert len(ckpts) == 2  # train.keep_last
    for c in ckpts:
        assert f"runs/mn/{c}/{checkpoint.MARKER}" in keys and f"runs/mn/{c}/{checkpoint.MANIFEST}" in keys
    # the newest, fetched from the bucket, is whole: every file its manifest lists, at its size
    fetched = Checkpoint(f"{on_cluster.bucket}/runs/mn/{ckpts[-1]}", filesystem=on_cluster.s3()).to_directory(
        str(tmp_path / "fetched")
    )
    assert checkpoint.verify(fetched)["files"]
    # the prepared corpus went with the run's storage, where every node reads it
    assert any(k.startswith("runs/corpus/tokens-") and k.endswith("/COMPLETE") for k in on_cluster.keys("runs/corpus"))

    second = _train(cfg_path, storage, "mn", capsys, "train.train_steps=6")
    assert (second["step"], second["started_at_step"]) == (6, 4)
    assert second["checkpoint"].startswith(f"{storage}/mn/checkpoint_")  # a URI any node opens, not `bucket/key`


def test_ablate_reads_its_inputs_from_the_bucket(on_cluster, s3_sources, capsys):
    """`cglab ablate 2 --preset laptop --storage-path s3://...` (one trial, a few steps): the held-out split and the
    tokenizer the driver settles are in the bucket, beside the experiment, and the trial, on a worker node, trains
    and evaluates with them."""
    from cglab.cli import main

    (Path.cwd() / "data.yaml").write_text(
        dump_config(from_dict({"data": {"sources": s3_sources, "tokenizer": {"vocab_size": 1024, "train_docs": 300}}}))
    )
    # a short trial that evaluates while it trains (step 2, a Ray task on whichever node Ray picks) and at its end
    steps = ["train.train_steps=4", "train.warmup_steps=1", "eval.every=2"]
    where = ["--config", "data.yaml", "--storage-path", f"s3://{on_cluster.bucket}/tune", "--name", "l2"]
    rc = main(["ablate", "2", *steps, "--preset", "laptop", *where, "--variants", "clm", "--seeds", "0"])
    out, err = capsys.readouterr()
    assert rc == 0, (out + err)[-4000:]
    keys = on_cluster.keys("tune")
    assert "tune/l2-inputs/tokenizer/tokenizer.json" in keys
    for name in ("nl.jsonl", "code.jsonl"):  # the held-out split, beside the prepared corpus in the bucket
        assert any(k.startswith("tune/corpus/tokens-") and "/heldout-" in k and k.endswith(name) for k in keys)
    assert any(k.startswith("tune/l2-train/") and k.endswith("/COMPLETE") for k in keys)
    # the evaluation while training went through the bucket: its record is there, its snapshot deleted
    records = [k for k in keys if k.startswith("tune/l2-train/") and "/eval_records/step_000002.json" in k]
    assert len(records) == 1 and not any("/evals/step_" in k for k in keys)
    rec = json.loads(storage.read_bytes(f"s3://{on_cluster.bucket}/{records[0]}"))
    assert "error" not in rec and rec["metrics"]["eval/code_bpb"] > 0
    print(out[-3000:])


def _node_of_train_worker(cluster) -> str:
    """The name of the worker node that runs the (one) Ray Train worker."""
    import ray
    from ray.util.state import list_actors

    names = {n["NodeID"]: k for n in ray.nodes() if n["Alive"] for k in n["Resources"] if k in cluster.nodes}
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 1, workers
    return names[workers[0].node_id]


def test_a_worker_node_lost_mid_run_resumes_from_the_bucket_on_the_node_left(on_cluster, s3_sources):
    """The node running the training worker is killed (its raylet and processes, SIGKILL; its scratch deleted)
    once a checkpoint is in the bucket: Ray Train restarts the worker on the other node, which resumes from the
    bucket's last checkpoint and finishes the run. The node is started again afterwards for later tests."""
    import threading

    from cglab.train.trainer import fit

    cfg = from_dict(
        {"data": {"sources": s3_sources, "seq_length": 64, "tokenizer": {"vocab_size": 1024, "train_docs": 300}}},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.warmup_steps=1",
            "train.train_steps=30",
            "train.checkpoint_every=3",
            "train.log_every=1",  # a report (~1-2 s on CPU) every step: the run outlasts the kill
            "train.max_failures=1",
            "data.filters.dedup=false",
            "track.system_metrics=false",
        ],
    )
    killed: list[str] = []
    done = threading.Event()

    def kill_once_a_checkpoint_is_in_the_bucket():
        # fit runs in the main thread (it installs signal handlers); this one waits, then kills
        while not any(k.endswith("/COMPLETE") for k in on_cluster.keys("runs/lost")):
            if done.wait(0.5):
                return
        killed.append(_node_of_train_worker(on_cluster))
        on_cluster.kill_worker(killed[0])

    killer = threading.Thread(target=kill_once_a_checkpoint_is_in_the_bucket, daemon=True)
    killer.start()
    try:
        result = fit(cfg, storage_path=f"s3://{on_cluster.bucket}/runs", name="lost")
        assert killed, "the run ended before a node was killed"
        assert result["step"] == 30
        # the restarted worker, on the node left, resumed from a checkpoint in the bucket
        assert 0 < result["started_at_step"] < 30 and result["started_at_step"] % 3 == 0
        assert killed[0] not in _alive_nodes()
    finally:
        done.set()
        killer.join(timeout=60)
        for name in killed:
            on_cluster.add_worker(name, 3)


def _alive_nodes() -> set[str]:
    import ray

    return {k for n in ray.nodes() if n["Alive"] for k in n["Resources"] if k.startswith("node_")}
