#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one command, one JSON of figures, under 8 minutes on a machine
# with one NVIDIA GPU. On such a machine the project usually arrives without its built .venv; this sets it up
# first (scripts/setup.sh) and then runs the check. Set AFIL_TORCH_SPEC=torch there, or setup installs the CPU
# build of torch:
#
#   AFIL_TORCH_SPEC=torch bash scripts/gpu_check.sh [--out runs/gpu_check/figures.json] [--budget-s 450]
#   bash scripts/gpu_check.sh --cpu-smoke     # every part at toy size on CPU (tests/test_gpu_check.py)
#
# Exit status: 0 every part measured, 1 a part failed (its error is in the JSON), 2 no CUDA without --cpu-smoke.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AFIL_VENV:-.venv}
smoke=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && smoke=1; done

if [ ! -x "$VENV/bin/python" ]; then
  if [ "$smoke" = 0 ] && [ -z "${AFIL_TORCH_SPEC:-}" ] && command -v nvidia-smi >/dev/null \
      && nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: $VENV is missing and AFIL_TORCH_SPEC is unset, so setup would install the CPU build of torch;" \
         "run: AFIL_TORCH_SPEC=torch bash scripts/gpu_check.sh $*" >&2
    exit 2
  fi
  bash scripts/setup.sh
fi
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
