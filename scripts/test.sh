#!/usr/bin/env bash
# The README's second command (and what CI runs): set up, then run the test suite on CPU.
# Triton kernels are exercised through the interpreter; GPU-only tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
python -m pytest -q "$@"
