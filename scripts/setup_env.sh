#!/usr/bin/env bash
# Create .venv (if missing) and install the package with the extras named in $1 (default "test").
# When the venv has no torch yet, SLA_TORCH (default torch==2.13.0, the CPU build on machines that carry it
# locally) is installed first; an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
quiet_pip() {  # pip -q still prints one warning per missing local mirror folder on some machines
  python -m pip install -q "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" || true; }
}
quiet_pip --upgrade pip
if ! python -c "import torch" 2>/dev/null && [ -n "${SLA_TORCH-torch==2.13.0}" ]; then
  quiet_pip "${SLA_TORCH-torch==2.13.0}"
fi
quiet_pip -e ".[${extras}]"
python -c "import sla, torch; print(f'sla {sla.__version__} with torch {torch.__version__} ready in .venv')"
