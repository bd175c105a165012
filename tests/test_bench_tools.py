"""The GPU A/B tools of ``bench/`` stay usable: checked on CPU under Triton's interpreter.

* ``bench/explore_variants.py``: every variant's text edits still apply to the current ``kernels.py`` and the
  edited kernels compute what the unchanged ones compute (``--check-only``, fp32). A variant whose text no
  longer matches would otherwise only be found on the GPU, in device time.
* ``bench/ab_ops.py``: a copy of the operator package loads beside the installed one under its own
  ``torch.library`` namespace and computes the same output.
* ``bench/fwd_headroom.py``: its loop variants compute block-sparse attention (``--check-only``); ``bench/ab_tma.py``:
  its forms are valid launch overrides.
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


def test_bench_kernels_writes_the_current_summary_in_the_issue_schema(tmp_path):
    """``bench/results/current.json`` keeps issue 13's schema: one row per provider at the first shape, 95%
    sparsity, SLA's default 64x64 marginal configuration, dense providers with sparsity 0 and blocks "-"."""
    import bench_kernels

    shape = [1, 12, 32760, 128]
    rows = [
        {"shape": shape, "provider": "sdpa-flash", "fwd_ms": 18.0, "fwd_bwd_ms": 70.0},
        {"shape": shape, "provider": "sdpa-cudnn", "fwd_ms": 11.0, "fwd_bwd_ms": 43.0},
        {"shape": shape, "provider": "sla", "sparsity": 0.95, "scope": "marginal", "block_q": 64, "block_k": 64,
         "combine": "mass", "fwd_ms": 2.0, "fwd_bwd_ms": 7.0},
        {"shape": shape, "provider": "sla", "sparsity": 0.95, "scope": "marginal", "block_q": 128, "block_k": 64,
         "combine": "mass", "fwd_ms": 1.8, "fwd_bwd_ms": 8.7},
        {"shape": shape, "provider": "sla", "sparsity": 0.90, "scope": "marginal", "block_q": 64, "block_k": 64,
         "combine": "mass", "fwd_ms": 3.0, "fwd_bwd_ms": 9.0},
        {"shape": shape, "provider": "sla-pytorch-blockmap", "sparsity": 0.95, "scope": "marginal", "block_q": 64,
         "block_k": 64, "fwd_ms": 3.5, "fwd_bwd_ms": 8.5},
        {"shape": shape, "provider": "sla-pooled-cov", "sparsity": 0.95, "scope": "marginal", "block_q": 64,
         "block_k": 64, "combine": "pooled_cov", "fwd_ms": 4.1, "fwd_bwd_ms": 15.0},
        {"shape": shape, "provider": "sla-pooled-cov", "sparsity": 0.95, "scope": "marginal", "block_q": 128,
         "block_k": 64, "combine": "pooled_cov", "fwd_ms": 3.9, "fwd_bwd_ms": 15.6},
        {"shape": shape, "provider": "flex-triton", "sparsity": 0.95, "block_q": 128, "block_k": 128, "fwd_ms": 0.8,
         "fwd_bwd_ms": 3.3},
        {"shape": shape, "provider": "flex-flash", "sparsity": 0.95, "block_q": 128, "block_k": 128, "fwd_ms": 0.55,
         "fwd_bwd_ms": 2.2},
        {"shape": [2, 16, 32760, 128], "provider": "sdpa-flash", "fwd_ms": 36.0, "fwd_bwd_ms": 140.0},
    ]
    meta = {"card": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc1234", "date": "2026-12-01 05:34 UTC"}
    path = str(tmp_path / "results" / "current.json")
    bench_kernels.write_current(path, meta, rows)
    with open(path) as fh:
        got = json.load(fh)
    assert {k: got[k] for k in ("card", "torch", "commit", "date")} == meta
    assert [r["provider"] for r in got["rows"]] == ["sdpa-flash", "sdpa-cudnn", "sla", "sla-pooled-cov", "flex-triton",
                                                    "flex-flash"]
    by = {r["provider"]: r for r in got["rows"]}
    assert by["sdpa-flash"] == {"provider": "sdpa-flash", "shape": shape, "sparsity": 0.0, "blocks": "-",
                                "fwd_ms": 18.0, "fwdbwd_ms": 70.0}
    assert by["sla"]["blocks"] == "64x64" and by["sla"]["fwd_ms"] == 2.0 and by["sla"]["combine"] == "mass"
    assert by["flex-flash"]["blocks"] == "128x128" and by["flex-flash"]["fwdbwd_ms"] == 2.2
    assert by["sla-pooled-cov"]["combine"] == "pooled_cov" and by["sla-pooled-cov"]["fwdbwd_ms"] == 15.0
    assert not os.path.exists(path + ".tmp")


def test_trace_op_sums_busy_time_and_names_the_largest_gaps():
    import trace_op

    def kernel(name, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [kernel("a", 0, 10), {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 99},
                             kernel("b", 40, 10), kernel("c", 55, 5), kernel("a", 100, 10), kernel("b", 140, 10),
                             kernel("c", 155, 5)]}
    got = trace_op.kernel_gaps(trace, steps=2, top=2)
    assert got["kernels_per_step"] == 3 and got["busy_ms"] == 25 / 1e3 and got["span_ms"] == 80 / 1e3
    # a -> b: 30 us in each step; c -> a: 40 us once (between the steps), 20 per step; b -> c: 5, left out
    assert list(got["largest_gaps_us"].items()) == [("a -> b", 30.0), ("c -> a", 20.0)]


def test_fwd_headroom_variants_compute_block_sparse_attention(tmp_path):
    """``bench/fwd_headroom.py --check-only``: every loop variant the interpreter can run (pointer and TMA loads,
    64/128-row tiles, 64/128-wide key blocks; warp specialisation needs a GPU) matches fp32 PyTorch on sampled
    query blocks, including a ragged last block."""
    import fwd_headroom

    out = tmp_path / "headroom.json"
    assert fwd_headroom.main(["--check-only", "--shape", "1,2,300,32", "--critical", "0.3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(fwd_headroom.VARIANTS)
    ran = [r for r in rows if "skipped" not in r]
    assert {r["tma"] for r in ran} == {False, True} and {(r["BM"], r["BN"]) for r in ran} >= {(64, 64), (128, 128)}
    for r in ran:
        assert "error" not in r, r
        assert r["max_err"] <= 1e-4, r
    assert all(r["ws"] for r in rows if "skipped" in r)


def test_ab_tma_forms_are_valid_overrides():
    """``bench/ab_tma.py``'s forms are overrides ``launch_overrides`` accepts, and they select what they name."""
    import ab_tma

    from sla.ops.sla.triton.launch_config import fwd_split, launch_overrides, tma_loads

    q = torch.randn(1, 2, 64, 32)
    for form, tma, split in (("pointer", False, False), ("tma", True, False), ("tma+split", True, True),
                             ("pointer+split", False, True)):
        with launch_overrides(ab_tma.overrides(form, (8, 1) if split else None)):
            assert tma_loads("dkdv", q) == tma and fwd_split() == split


def test_compiled_shared_memory_reports_registers_and_spills_offline(tmp_path):
    # Compiles for sm_90 on this CPU (Triton's own ptxas and cuobjdump) in a child process: the interpreter this
    # test session runs under decorates kernels for interpretation, not compilation.
    import subprocess

    out = tmp_path / "res.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compiled_shared_memory.py"), "--kernels",
                           "state,linear_q", "--dtypes", "bf16", "--head-dims", "64", "--blocks", "64x64",
                           "--warps", "4", "--resources", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["num_warps"]) for r in rows] == [("state", 4), ("linear_q", 4)]
    for row in rows:
        assert "error" not in row, row
        assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0, row
        assert row["compiled"] > 0
