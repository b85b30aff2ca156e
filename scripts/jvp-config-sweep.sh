#!/usr/bin/env bash
# Every candidate tile configuration of the JVP-attention kernels, each in its own process, on one shape.
# Usage: scripts/jvp-config-sweep.sh B H N d
for c in "fwd 64 32 4 3" "fwd 64 64 4 3" "fwd 128 64 8 3" "fwd 128 32 4 3" \
         "kv 64 64 4 2" "kv 64 64 8 2" "kv 128 64 8 2" "kv 64 32 4 3" "kv 32 64 4 2" "kv 128 32 8 2" \
         "q 64 64 4 2" "q 128 64 8 2" "q 64 32 4 3" "q 128 32 8 2" "q 32 64 4 2"; do
  timeout 90 python3 scripts/jvp-config-check.py "$@" $c 2>&1 | grep -E "ok errs|Error" | tail -1 | sed "s/^/[$c] /"
done
