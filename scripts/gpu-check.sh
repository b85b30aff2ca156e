#!/usr/bin/env bash
# GPU smoke of every objective and of the paper's TVM settings (run through the device tool).
# Expects Fashion-MNIST files under $FEWSTEP_DATA. Writes logs under ${OUT:-/tmp/gpu-check}.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -m gpu tests 2>&1 | tail -3
for obj in fm meanflow tvm scm ect; do
  fewstep train --recipe fashion-mnist --objective "$obj" --kimg 10.24 --out "$OUT/fm-$obj" --no-progress \
    --set train.status_kimg=5.12 --set sample.num_images=16 2>&1 | tail -3
done
# The paper's TVM settings (default recipe on a GPU): DiT-XL/2 18 heads, batch 2048 = 64 × 32, one step.
fewstep train --objective tvm --backbone dit-xl --dry-run > "$OUT/tvm-xl-config.json"
python3 -c "import json; c=json.load(open('$OUT/tvm-xl-config.json')); print('tvm-xl:', c['backbone']['num_heads'], 'heads, batch', c['train']['batch'], 'per gpu', c['train']['batch_per_gpu'])"
fewstep train --objective tvm --backbone dit-xl --kimg 2.048 --out "$OUT/tvm-xl" --no-progress \
  --set sample.num_images=4 --set sample.nfe="(1,)" 2>&1 | tail -4
