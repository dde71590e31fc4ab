#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (the device tool):
#   benchmarks/gpu/fetch-wheels.sh            # here, once
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=540)
# 1. The randomised batched-engine tests on CUDA: every side of a drawn batch equals its solo
#    computation there too (float32 and float64).
# 2. The engine alone against batched (16 new pairs) on CUDA, for the shipped model and
#    ViT-B-32 at their defaults: on a GPU one request fills little of the device, which is
#    where batching pays (docs/benchmarks.md, issue 21).
# 3. The CUDA half of the suite: the engine tests with EXPLAIN_TEST_DEVICE=cuda.
# 4. The server on the GPU with ViT-B-16 (seeded random weights) at its defaults, one worker:
#    p50 latency of a lone caller, then throughput at concurrency 64 (explain-loadgen, new
#    inputs on every request).
# 5. Every family (issue 22) at its defaults on CUDA: one real-size model per family, seeded
#    random weights, explanation time against one forward pass (bench_families.py --device cuda).
# Logs go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:api:server:client PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$out/device.txt"
EXPLAIN_TEST_DEVICE=cuda python3 -m pytest tests/test_engine_batched.py -q -p no:cacheprovider 2>&1 | tee "$out/engine_batched.log"
python3 benchmarks/bench_batching.py --engine-only cuda 2>&1 | tee "$out/engine_batching.log"
EXPLAIN_TEST_DEVICE=cuda python3 -m pytest tests/test_engine.py -q -p no:cacheprovider 2>&1 | tee "$out/engine.log"
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_engine import save_weights; save_weights('ViT-B-16', '/tmp/b16.safetensors')"
python3 -m explain_server --port 50051 --metrics-port 9090 --device cuda --model b16=ViT-B-16:/tmp/b16.safetensors \
  > "$out/server.log" 2>&1 &
server=$!
python3 -c "from explain_client import ExplainClient; ExplainClient('127.0.0.1:50051').wait_until_ready(timeout=300)"
python3 -m explain_client.loadgen --target 127.0.0.1:50051 --concurrency 1 --requests 32 --json "$out/b16-lone.json" \
  2>&1 | tee "$out/b16-lone.log"
python3 -m explain_client.loadgen --target 127.0.0.1:50051 --concurrency 64 --requests 1024 --json "$out/b16-c64.json" \
  2>&1 | tee "$out/b16-c64.log"
kill -TERM "$server"; wait "$server"
python3 benchmarks/bench_families.py --device cuda 2>&1 | tee "$out/families.log"
