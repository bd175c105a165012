#!/usr/bin/env bash
# The test suite against the oldest diffusers that pyproject.toml allows; the main run (scripts/test.sh) uses the
# newest, which the test extra pins. CI runs both (.ci/run).
#
# pip resolves what the oldest release needs against the environment as it is (--dry-run --report: diffusers
# itself, and e.g. an older huggingface-hub it requires, with a transformers that accepts that hub), and exactly those packages are installed beside the
# environment in $SLA_OLDEST_DIFFUSERS_DIR (default .venv/oldest-diffusers), first on PYTHONPATH for this run only:
# .venv itself is not changed. Modules that never touch diffusers (the operator and its kernels) are not re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
dir="${SLA_OLDEST_DIFFUSERS_DIR:-.venv/oldest-diffusers}"
oldest=$(python -c 'import pathlib, re; print(re.search(r"\"diffusers>=([0-9.]+)", pathlib.Path("pyproject.toml").read_text()).group(1))')
# transformers is resolved with it: the oldest diffusers caps huggingface-hub (0.38.0: <2.0) while the newest
# transformers may need a newer one (5.25.0: >=2.4), which broke every test that imports both (2026-12-06).
transformers_req=$(python -c 'import pathlib, re; print(re.search(r"\"(transformers[^\"]*)\"", pathlib.Path("pyproject.toml").read_text()).group(1))')
quiet_pip() {  # as in setup_env.sh: pip -q still prints one warning per missing local mirror folder on some machines
  python -m pip "$@" 2>&1 | { grep -v -e "^WARNING: Location" || true; }
}
if ! PYTHONPATH="$dir" python -c "import diffusers, transformers, sys; sys.exit(diffusers.__version__ != '$oldest')" \
    2>/dev/null; then
  rm -rf "$dir" && mkdir -p "$dir"
  quiet_pip install -q --dry-run --report "$dir/resolution.json" "diffusers==$oldest" "$transformers_req"
  mapfile -t pinned < <(python -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$dir/resolution.json")
  quiet_pip install -q --no-deps --target "$dir" "${pinned[@]}"
fi
PYTHONPATH="$dir" python -c "import diffusers; print(f'diffusers {diffusers.__version__} (the oldest allowed) from $dir')"
PYTHONPATH="$dir" python -m pytest -q \
  --ignore=tests/test_blockmap.py --ignore=tests/test_triton_interpret.py --ignore=tests/test_triton_blockmap.py \
  --ignore=tests/test_bench_tools.py --ignore=tests/test_import_graph.py --ignore=tests/test_packaging.py "$@"
