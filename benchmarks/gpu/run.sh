#!/usr/bin/env bash
# The GPU check of issue 15, one command on one GPU machine as it comes (its own
# python3 with torch, triton, jax, cupy, flax, optax and transformers; no network):
#
#   benchmarks/gpu/run.sh              # all sections, < 8 min on one H200
#   benchmarks/gpu/run.sh --dry-run    # what would run and each section's budget; no GPU
#   benchmarks/gpu/run.sh --only step  # one section
#   benchmarks/gpu/run.sh --smoke --out /tmp/gpu-smoke  # the code on CPU, tiny shapes
#
# Writes benchmarks/results/gpu.{json,md} (--out DIR: elsewhere; --smoke must). Every section has a time budget
# (bench_gpu.BUDGET_S, printed as it runs); the whole run is stopped at 7 min 50 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=".:adapters:benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with torch
PYTHON="${PYTHON:-python3}"
if [[ " $* " == *" --dry-run "* || " $* " == *" --smoke "* ]]; then
  exec "$PYTHON" benchmarks/bench_gpu.py "$@"
fi
start=$(date +%s)
timeout --signal=INT --kill-after=10 470 "$PYTHON" benchmarks/bench_gpu.py "$@"
echo "benchmarks/gpu/run.sh: $(( $(date +%s) - start )) s in all"
