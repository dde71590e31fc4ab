#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the device tool):
#   benchmarks/gpu/fetch-wheels.sh            # here, once
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=540)
# 1. The randomised batched-engine tests on CUDA: every side of a drawn batch equals its solo
#    computation there too (float32 and float64).
# 2. The engine alone against batched (16 new pairs) on CUDA, for the shipped model and
#    ViT-B-32 at their defaults: on a GPU one request fills little of the device, which is
#    where batching pays (docs/benchmarks.md, issue 21).
# Logs go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:server:client PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/device.txt"
EXPLAIN_TEST_DEVICE=cuda python3 -m pytest tests/test_engine_batched.py -q -p no:cacheprovider 2>&1 | tee "$out/engine_batched.log"
python3 benchmarks/bench_batching.py --engine-only cuda 2>&1 | tee "$out/engine_batching.log"
