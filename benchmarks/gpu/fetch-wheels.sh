#!/usr/bin/env bash
# Download, here, the wheels that the lent GPU machine's image lacks (it has torch, grpcio,
# protobuf, numpy, Pillow, pytest, hypothesis, prometheus-client, safetensors, timm, regex,
# huggingface-hub and tqdm, for Python 3.12, and reaches no package registry). They land in
# .whl/, which git ignores through .git/info/exclude; run.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 cachetools==8.0.3 grpcio-health-checking==1.71.0 \
    transformers==5.25.0 tokenizers==0.23.3
