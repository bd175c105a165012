#!/usr/bin/env bash
# The README's first command: set up .venv, then run the main job on the embedded default:
# the shipped small video DiT -> SLA -> brief fine-tune -> evaluation against full attention -> report.
# Extra arguments go to `sla quickstart` (see `sla quickstart --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh train
. .venv/bin/activate
sla quickstart "$@"
