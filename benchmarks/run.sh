#!/usr/bin/env bash
# The benchmark in one command: set up .venv with the `bench` extra (TransformerLens, nnsight, psutil),
# then time lens.trace against plain HF, TransformerLens and nnsight. Flags go to bench_trace.py:
#   bash benchmarks/run.sh --reps 5 --lengths 16,64,256 --mem-lengths 1024,16,64,256
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench && .venv/bin/python benchmarks/bench_trace.py "$@"
