#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the extras named in $1 (default "test").
# torch is installed first and pinned to SLA_TORCH (default torch==2.13.0, which installs the CPU build on
# machines that carry it locally); set SLA_TORCH="" to keep whatever torch the venv already has.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${SLA_TORCH-torch==2.13.0}"
fi
python -m pip install -q -e ".[${extras}]"
