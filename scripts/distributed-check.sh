#!/usr/bin/env bash
# DDP and FSDP2 on this machine's GPUs, each against a plain one-process run of the same experiment.
#
#   FEWSTEP_DATA=/path/to/fashion-mnist bash scripts/distributed-check.sh [OUT]
#
# Trains RECIPE (default fashion-mnist) with OBJECTIVE (default tvm) for KIMG (default 10) kimg three
# times: plainly, then under torchrun with train.distributed=ddp and =fsdp2 on NPROC processes (default:
# every visible GPU; one is enough to run NCCL, bf16 autocast and compile under the wrappers). Each
# distributed run is compared with the plain one (`fewstep compare`: settings and loss curves, a PNG
# each). With more than one process it also times `fewstep bench step` scaling for DDP and FSDP2.
# EXTRA adds --set overrides to every run (default: train.compile=true on a GPU).
# On a CPU (tests of this script): NPROC=2 RECIPE=smoke KIMG=0.5 EXTRA="" bash scripts/distributed-check.sh
set -euo pipefail
OUT=${1:-/tmp/fewstep-distributed-check}
RECIPE=${RECIPE:-fashion-mnist}
OBJECTIVE=${OBJECTIVE:-tvm}
KIMG=${KIMG:-10}
PY=${PYTHON:-python}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 2 ))}
EXTRA=${EXTRA-$([ "$GPUS" -gt 0 ] && echo "train.compile=true" || echo "")}
sets=(--set "train.status_kimg=$($PY -c "print($KIMG / 10)")")
for s in $EXTRA; do sets+=(--set "$s"); done
common=(--recipe "$RECIPE" --objective "$OBJECTIVE" --kimg "$KIMG" --no-progress "${sets[@]}")

mkdir -p "$OUT"
echo "== plain, 1 process"
$PY -m fewstep.cli train "${common[@]}" --out "$OUT/plain"
for mode in ddp fsdp2; do
  echo "== $mode, $NPROC processes"
  $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m fewstep.cli train "${common[@]}" \
      --set "train.distributed=$mode" --out "$OUT/$mode"
  $PY -m fewstep.cli compare "$OUT/plain" "$OUT/$mode" --plot "$OUT/$mode.png"
done
if [ "$NPROC" -gt 1 ] && [ "$GPUS" -gt 1 ]; then
  for mode in ddp fsdp2; do
    echo "== bench step scaling, $mode, $NPROC GPUs"
    $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m fewstep.cli bench step \
        --objective "$OBJECTIVE" --batch 32 --compile --set "train.distributed=$mode" --out "$OUT/scaling-$mode.json"
  done
fi
