"""The GPU A/B tools of ``bench/`` stay usable: checked on CPU under Triton's interpreter.

* ``bench/explore_variants.py``: every variant's text edits still apply to the current ``kernels.py`` and the
  edited kernels compute what the unchanged ones compute (``--check-only``, fp32). A variant whose text no
  longer matches would otherwise only be found on the GPU, in device time.
* ``bench/ab_ops.py``: a copy of the operator package loads beside the installed one under its own
  ``torch.library`` namespace and computes the same output.
"""

import json
import os
import shutil
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter checks are for CPU CI; on CUDA run the tools themselves", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ab_ops  # noqa: E402
import explore_variants  # noqa: E402


def test_explore_variants_apply_and_compute_the_same(tmp_path):
    out = tmp_path / "variants.json"
    explore_variants.main(["--check-only", "--shape", "1,2,200,64", "--out", str(out)])
    results = json.loads(out.read_text())
    tags = [tag for tag, _, _ in explore_variants.VARIANTS]
    assert tags, "no variants listed"
    for tag in tags:
        assert "error" not in results[tag], f"{tag}: {results[tag]}"
        # fp32 under the interpreter: only summation order differs between a variant and the unchanged kernels.
        assert results[tag]["max_abs_diff_vs_baseline"] < 1e-4, (tag, results[tag])


def test_ab_ops_loads_a_second_copy_of_the_operator(tmp_path):
    import importlib

    import sla.ops.sla as new_package

    src = tmp_path / "sla_ops_copy"
    shutil.copytree(os.path.join(ROOT, "sla", "ops", "sla"), src, ignore=shutil.ignore_patterns("__pycache__"))
    base_package = ab_ops.load_base_ops(str(src))
    assert base_package is not new_package and base_package.__name__ == "sla_base_ops"
    assert importlib.import_module("sla_base_ops.triton.custom_ops").sla_triton_fwd._namespace == "sla_base"
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    kwargs = dict(critical=0.2, negligible=0.2, block_q=64, block_k=64)
    # the same source on the same inputs in one process: the same numbers
    torch.testing.assert_close(ab_ops.triton_entry(base_package)(q, k, v, **kwargs),
                               ab_ops.triton_entry(new_package)(q, k, v, **kwargs), rtol=0, atol=0)
