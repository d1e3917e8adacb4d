"""The smallest real training job with `cglab.train.trainer.fit`'s signature: a byte-level MLP language model
trained by a Ray Train TorchTrainer, logging per-step metrics through the rank-zero MLflow logger.

It exists so sweeps, MLflow structure and resume can be exercised end to end before (and independently of)
the Megatron trainer. Its data is Python's own standard library: code = module sources, NL = their
docstrings, so `data.mixture` (lesson 4) and `train.epochs` over a fixed token budget (lesson 5) mean what
they mean in the real trainer. It ignores the model architecture and the objective (lessons 1-3).
"""
from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
import tempfile
from typing import Any

import numpy as np

from cglab.config import CGLabConfig
from cglab.track.mlflow_logger import MlflowContext

TRAIN_MODULES = ("argparse", "textwrap", "string", "json.decoder", "json.encoder", "shlex", "fractions",
                 "dataclasses", "calendar", "configparser")
EVAL_MODULES = ("difflib", "csv", "statistics")
CONTEXT = 8  # bytes of left context the model sees


def _texts(modules: tuple[str, ...]) -> tuple[bytes, bytes]:
    """(code, natural language) bytes from module sources and their docstrings."""
    code, nl = [], []
    for name in modules:
        src = inspect.getsource(importlib.import_module(name))
        code.append(src)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    nl.append(doc)
    return "\n".join(code).encode(), "\n\n".join(nl).encode()


def _windows(data: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left contexts [n, CONTEXT] and next bytes [n] for positions idx (idx >= CONTEXT)."""
    ctx = np.stack([data[idx - CONTEXT + j] for j in range(CONTEXT)], axis=1)
    return ctx.astype(np.int64), data[idx].astype(np.int64)


def _train_stream(cfg: CGLabConfig) -> np.ndarray:
    code, nl = (np.frombuffer(b, dtype=np.uint8) for b in _texts(TRAIN_MODULES))
    mixture = cfg.data.mixture
    if mixture == "pl_only":
        return code
    if mixture == "nl_only":
        return nl
    # mix / weights: equal bytes of each, interleaved in blocks so a batch sees both.
    n = min(len(code), len(nl))
    block = 4096
    parts = []
    for i in range(0, n, block):
        parts += [code[i:i + block], nl[i:i + block]]
    return np.concatenate(parts)


def _lr(cfg: CGLabConfig, step: int) -> float:
    # Cosine decay over the whole run (all epochs), after linear warmup.
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.train_steps - t.warmup_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def _model(cfg: CGLabConfig):
    import torch.nn as nn

    d = cfg.model.hidden_size
    return nn.Sequential(nn.Embedding(256, d), nn.Flatten(), nn.Linear(CONTEXT * d, cfg.model.ffn_size),
                         nn.GELU(approximate="tanh"), nn.Linear(cfg.model.ffn_size, 256))


def _ppl(model, data: np.ndarray, n: int = 4096) -> float:
    import torch

    idx = np.linspace(CONTEXT, len(data) - 1, num=min(n, len(data) - CONTEXT)).astype(np.int64)
    x, y = _windows(data, idx)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    return float(math.exp(loss.item()))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from cglab.track.mlflow_logger import RankZeroLogger

    cfg = CGLabConfig.model_validate(config["cfg"])
    t = cfg.train
    torch.manual_seed(t.seed)
    model = ray.train.torch.prepare_model(_model(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resumed run (Train retry, or the Tune trial restarted with the same Train run name)
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stream = _train_stream(cfg)
    # Lesson 5: an epoch is train_steps / epochs steps over the same unique positions, re-shuffled per epoch.
    steps_per_epoch = max(1, t.train_steps // t.epochs)
    per_step = t.global_batch_size * cfg.data.seq_length
    unique = min(len(stream) - CONTEXT, steps_per_epoch * per_step)
    positions = CONTEXT + np.arange(unique)
    logger = RankZeroLogger.from_context(config.get("mlflow"))
    loss = float("nan")
    for step in range(start, t.train_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([t.seed, epoch]).permutation(unique)
        take = order[(np.arange(per_step) + k * per_step) % unique]
        mine = take[rank::world]  # data-parallel shard
        x, y = _windows(stream, positions[mine])
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss_t = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss_t.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        loss = loss_t.item()
        if (step + 1) % t.log_every == 0:
            logger.log_metrics(step + 1, {"train/loss": loss, "train/lr": _lr(cfg, step),
                                          "train/tokens": (step + 1) * per_step, "train/epoch": epoch})
        last = step + 1 == t.train_steps
        if last or (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0):
            metrics = {"loss": loss, "step": step + 1}
            if last:
                code, nl = (np.frombuffer(b, dtype=np.uint8) for b in _texts(EVAL_MODULES))
                net = getattr(model, "module", model)
                metrics.update({"eval/code_ppl": _ppl(net, code), "eval/nl_ppl": _ppl(net, nl)})
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                               os.path.join(d, "state.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0
                                 else None)
    logger.close()


def tiny_fit(cfg: CGLabConfig, *, storage_path: str, name: str, mlflow: MlflowContext | None = None) -> dict:
    """Run one Ray Train job (world_size CPU/GPU workers) and return its final metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    p = cfg.parallel
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "mlflow": mlflow},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.world_size, use_gpu=p.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if p.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last)),
    )
    result = trainer.fit()
    return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
