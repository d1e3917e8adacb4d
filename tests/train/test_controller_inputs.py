"""What Ray Train's controller gets of a run: its TorchTrainer's run context (the controller actor unpickles it in a
process that never trains). It must not carry the workers' inputs: unpickling them imports torch's training stack,
Megatron and cglab's training modules, seconds of every run's start (benchmarks/trial_overhead.py). The inputs
travel with the train function, which only the workers unpickle."""

from __future__ import annotations

import pickle
import subprocess
import sys

import cloudpickle

from cglab.config import from_dict
from cglab.train.loop import WorkerInputs
from cglab.train.trainer import torch_trainer

HEAVY = ("megatron.core", "cglab.train.loop", "cglab.distributed")


def _imported_by_unpickling(blob: bytes) -> list[str]:
    """The HEAVY modules a fresh interpreter has imported after unpickling `blob`."""
    code = (
        "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    return [m for m in out.stdout.decode().strip().split(",") if m]


def test_the_controllers_run_context_imports_no_training_module_and_the_workers_get_the_inputs(tmp_path):
    cfg = from_dict({}, ["model.preset=tiny", "parallel.data_parallel_size=2"])
    inputs = WorkerInputs(cfg=cfg, plan=None, name="probe")
    trainer = torch_trainer(inputs, str(tmp_path))
    assert _imported_by_unpickling(cloudpickle.dumps(trainer.train_run_context)) == []
    # the workers' train function carries the inputs (so they are not lost on the way)
    fn = pickle.loads(cloudpickle.dumps(trainer.train_loop_per_worker))
    assert fn.args[0].cfg == cfg and fn.args[0].name == "probe"
    assert trainer.train_run_context.scaling_config.num_workers == 2
