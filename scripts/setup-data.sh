#!/usr/bin/env bash
# Make sure Fashion-MNIST (the default data) is present.
#
# Usage: scripts/setup-data.sh [DIR]
# Looks for the four IDX files (raw or .gz) in DIR, $FEWSTEP_DATA, $FEWSTEP_DATA/fashion-mnist and
# /usr/share/datasets/fashion-mnist (the order fewstep searches). If absent, installs the Debian package
# dataset-fashion-mnist when apt-get is usable as root or through passwordless sudo; otherwise prints how
# to get the files and exits 1. Idempotent; prints one line on success.
set -euo pipefail

FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
SYSTEM_DIR=/usr/share/datasets/fashion-mnist
DIRS=()
[[ -n "${1:-}" ]] && DIRS+=("$1")
[[ -n "${FEWSTEP_DATA:-}" ]] && DIRS+=("$FEWSTEP_DATA" "$FEWSTEP_DATA/fashion-mnist")
DIRS+=("$SYSTEM_DIR")

has_all() {  # has_all DIR: all four files there, raw or gzipped
  local f
  for f in "${FILES[@]}"; do
    [[ -f "$1/$f" || -f "$1/$f.gz" ]] || return 1
  done
}

find_dir() {
  local d
  for d in "${DIRS[@]}"; do
    if has_all "$d"; then echo "$d"; return 0; fi
  done
  return 1
}

if dir=$(find_dir); then
  echo "Fashion-MNIST: found in $dir"
  exit 0
fi

sudo_cmd=()
can_apt=0
if command -v apt-get >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    can_apt=1
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    can_apt=1; sudo_cmd=(sudo -n)
  fi
fi

if [[ $can_apt -eq 1 ]]; then
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
    "${sudo_cmd[@]}" apt-get update -qq >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  fi
  if "${sudo_cmd[@]}" apt-get install -y -qq dataset-fashion-mnist >"$log" 2>&1 && has_all "$SYSTEM_DIR"; then
    echo "Fashion-MNIST: installed dataset-fashion-mnist into $SYSTEM_DIR"
    exit 0
  fi
  cat "$log" >&2
  echo "Fashion-MNIST: installing dataset-fashion-mnist with apt-get failed (output above)." >&2
fi

cat >&2 <<MSG
Fashion-MNIST not found. Searched:
$(printf '  - %s\n' "${DIRS[@]}")
To get the files:
  - on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist
  - elsewhere: download ${FILES[*]/%/.gz}
    from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a directory DIR,
    then pass --set data.root=DIR to fewstep or export FEWSTEP_DATA=DIR
MSG
exit 1
