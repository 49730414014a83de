#!/usr/bin/env bash
# The benchmarks in one command: set up .venv with the `bench` extra (TransformerLens, nnsight, psutil,
# bertviz, circuitsvis), then
#   1. lens.trace against plain HF, TransformerLens and nnsight (bench_trace.py; flags go to it:
#      bash benchmarks/run.sh --reps 5 --lengths 16,64,256 --mem-lengths 1024,16,64,256),
#   2. the lens and patch figures (bench_lenses.py: logit lens vs the matmul + top-k floor, value search,
#      composition scores, patched vs unpatched traces),
#   3. lv.load() of the embedded model, cold (converting the GGUF file) against warm (the cache):
#      bench_load.py, separate processes,
#   4. the prompt-pair figures (bench_pairs.py: exact resid sweep vs TransformerLens' get_act_patch_resid_pre
#      and an nnsight loop, attribution sweep vs two traces, exact head ablation per head vs one forward),
#   5. with LENSVIZ_BENCH_WIDGET=1 also the Explorer widget against bertviz / circuitsvis (bench_widget.py,
#      JupyterLab + Chromium, ~7 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
.venv/bin/python benchmarks/bench_trace.py "$@"
.venv/bin/python benchmarks/bench_lenses.py
.venv/bin/python benchmarks/bench_load.py          # lv.load() cold vs warm (the model cache), 5 processes each
.venv/bin/python benchmarks/bench_pairs.py         # prompt pairs: patching sweeps and head ablation, T=16 and 64
if [ "${LENSVIZ_BENCH_WIDGET:-0}" = 1 ]; then
    .venv/bin/python benchmarks/bench_widget.py
fi
