#!/usr/bin/env bash
# The GPU figures in one run (README "Benchmarks"): attention kernel vs einsum, train-step MFU of a ~1B model,
# decode at batch 64 vs the memory-bandwidth bound, and the RL step's phase breakdown. Each case appends its
# table, with the hardware, versions and date, to BENCHMARKS.md (OUT=path to write elsewhere).
#   bash launch/benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-BENCHMARKS.md}
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import jax; print(jax.__version__, jax.devices())"
run() { echo "+ $*"; timeout "${CASE_TIMEOUT:-240}" "$py" -m launch.bench --out "$out" "$@" || echo "case failed: $*"; }
run --case attention --model llama-3.2-1b --dtype bfloat16 --batch 4 --seq 4096
run --case train_step --model llama-3.2-1b --dtype bfloat16 --batch 8 --seq 2048
run --case sampler --model llama-3.2-1b --dtype bfloat16 --batch 64
run --case rl_step --model small-32m --batch 8 --seq 32 --new_tokens 64 --steps 3
