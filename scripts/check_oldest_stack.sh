#!/usr/bin/env bash
# Run the test suite on the oldest versions setup.py allows, in a fresh virtual environment.
# CI runs the newest stack (.ci/run); this is the other end of the range, run by hand when a
# lower bound changes or code starts using a newer API:
#
#   [PYTHON=/path/to/python3.10] bash scripts/check_oldest_stack.sh [VENV]      (default VENV: /tmp/venv-oldest)
#
# It downloads about 3 GB (PyPI's torch for Linux is a CUDA build; the tests run on the CPU)
# and takes as long as the suite. The pins below are setup.py's lower bounds
# (tests/test_oldest_stack_pins.py keeps the two in step).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.10}
OLDEST=(torch==2.6.0 transformers==4.40.0 pytorch-lightning==2.1.0 safetensors==0.4.1 omegaconf==2.3.0
        einops==0.6.0 tokenizers==0.19.1 numpy==1.26.4)
# not a bound of setup.py: the newest diffusers (the test extra) imports names transformers 4.40 lacks
TEST_PINS=(diffusers==0.31.0)
VENV=${1:-/tmp/venv-oldest}

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${OLDEST[@]}" "${TEST_PINS[@]}" -e ".[test]"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|pytorch-lightning|tokenizers|numpy|diffusers) " || true
"$VENV/bin/python" --version
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q tests
