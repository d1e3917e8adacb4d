#!/usr/bin/env bash
# Every GPU check of the project in one device call: the `gpu`-marked tests, then benchmarks/train_throughput.py
# (cglab cases beside HF CodeGen eager and torch.compile, same process), then the gradient-accumulation rows.
# The device machine has torch with CUDA and transformers but no megatron-core, pydantic or pytest, and reaches no
# package index: their wheels travel in .whl/ (git-ignored). Fetch them on the development machine with
#   pip download --only-binary=:all: --no-deps --python-version 3.12 -d .whl megatron-core==0.16.1 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     pytest==9.2.0 pytest-timeout==2.4.0 pluggy iniconfig pygments packaging
# and run it with carry=[".whl"]. Everything printed also lands in $OUT/gpu_check.txt.
#
#   [EXTRA=0] bash benchmarks/gpu_check.sh [STEPS] [CASES] [PROFILED_CASES] [MICRO_CASES]
# With EXTRA=0 and 30 steps this took 7.6 minutes on one H100 (2026-11-26, 458 s), when it still measured one more
# 8-micro-batch cglab row (about one minute of that); EXTRA=1 adds about one more.
set -uo pipefail
STEPS=${1:-30}  # a few dozen optimizer steps per case (3 more warm up first)
# the goal's cases first (a run cut short still answers it), then correctness, then the other rows
CASES=${2:-cglab,hfc,hf,cglab-nofold,cglab-nowgrad,cglab-nofusions}
PROFILE=${3:-cglab}
MICRO_CASES=${4:-cglab,hfc}                       # 8 micro-batches per step (gradient accumulation), HF included
EXTRA=${EXTRA:-1}                        # 0: skip the document-masking table and the optimizer-op table
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/platform:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
  # recompiles would mean a compiled kernel (fused glue, FlexAttention with a new block mask per micro-batch) is
  # traced again each step: their reasons are printed
  TORCH_LOGS=recompiles python3 benchmarks/train_throughput.py --steps "$STEPS" --cases "$CASES" --profile "$PROFILE"
  python3 -m pytest -q -p no:cacheprovider tests/model/test_gpu.py 2>&1 | tail -15
  python3 benchmarks/train_throughput.py --steps "$STEPS" --micro 8 --cases "$MICRO_CASES"
  if [ "$EXTRA" = 1 ]; then
    TORCH_LOGS=recompiles python3 benchmarks/train_throughput.py --steps "$STEPS" \
      --cases cglab-docmask,cglab-sdpa-docmask,cglab-flash
    python3 benchmarks/optimizer_ops.py
  fi
} 2>&1 | tee "$OUT/gpu_check.txt"
