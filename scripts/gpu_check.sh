#!/usr/bin/env bash
# The GPU check of the task-batching strategies (scripts/gpu_check.py): tasks/s, peak memory and
# meta-gradient agreement on Omniglot 5-way and 20-way, under 5 minutes on one GPU.
#   bash scripts/gpu_check.sh                                  # CUDA
#   bash scripts/gpu_check.sh --device cpu --quick             # the same code on the CPU
#   bash scripts/gpu_check.sh --out docs/results/gpu-check     # also write the markdown and JSON
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 300 python scripts/gpu_check.py "$@"
