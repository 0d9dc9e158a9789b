#!/usr/bin/env bash
# Fetch the optional comparison packages the GPU check measures against (Liger-Kernel), as wheels
# for the GPU machine's Python, into .whl/ (git-ignored). Run it where pip reaches a registry; the
# GPU machine has no network, so .whl/ travels with the tree and bench/device_check.sh installs
# from it (its "wheels" step) when present.
#
#   bash bench/fetch_wheels.sh            # PYVER=3.12 by default (the GPU machines' Python)
#
# Pinned: liger-kernel 0.8.5 (pure Python + Triton; needs only torch and triton, both there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3
mkdir -p "$ROOT/.whl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$ROOT/.whl" "liger-kernel==0.8.5"
ls -l "$ROOT/.whl"
