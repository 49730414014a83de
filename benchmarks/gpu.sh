#!/usr/bin/env bash
# For a machine with a CUDA GPU (nothing else depends on this script; it has not been run yet: the
# project's machines so far had no GPU). From the repository root, after `bash scripts/setup.sh bench`
# with a CUDA build of torch in .venv:
#   1. the device tests (tests/test_devices.py: traces, patches, logit lens and generate on cuda in
#      float32 and bfloat16 against float64 CPU traces),
#   2. the trace benchmark on SmolLM2 and GPT-2 in float32, then bfloat16: plain HF, lensviz and nnsight
#      saving the same sites (timing only; the memory pass measures host RSS and is skipped here).
# Results: benchmarks/results/gpu-float32.md and gpu-bfloat16.md (+ .json). About 5 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py
for dtype in float32 bfloat16; do
    out=$(mktemp -d)
    "$PY" benchmarks/bench_trace.py --device cuda --dtype "$dtype" --methods lensviz,nnsight --reps 5 \
        --lengths 64,256,1024 --mem-lengths none --threads 4 --out "$out"
    cp "$out/latest.md" "benchmarks/results/gpu-$dtype.md"
    cp "$out/latest.json" "benchmarks/results/gpu-$dtype.json"
done
echo "wrote benchmarks/results/gpu-float32.md and gpu-bfloat16.md"
