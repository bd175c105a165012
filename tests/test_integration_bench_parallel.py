"""bench/bench_parallel.py runs end to end at a tiny size on CPU with 2 gloo processes (the GPU runs use the same
worker: the model built as `sla finetune --fsdp --context-parallel` builds it, the trainer's own step)."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import pytest

pytest.importorskip("diffusers")

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_parallel.py")


def _main_retried_once(bench, argv, out):
    """``bench.main(argv)``, run a second time (from the same ``out``) if the first fails. A gloo process on a loaded
    2-core CI machine aborts now and then (SIGABRT, "terminate called without an active exception"; about 1 run in
    12-30 under load, bench/bench_parallel.py), outside this library's code; a second failure fails the test, and a
    retry is reported as a warning."""
    before = out.read_bytes() if out.exists() else None
    rc = bench.main(argv)
    if rc != 0:
        if before is None:
            out.unlink(missing_ok=True)
        else:
            out.write_bytes(before)
        warnings.warn(f"bench_parallel {argv[2]!r} failed once (its first error lines are above); retried")
        rc = bench.main(argv)
    return rc


def test_bench_parallel_tiny_one_process_against_fsdp_and_ulysses(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_parallel", _BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "parallel.json"
    # One run per call, the second appended (how the GPU commands stay under a time limit per command).
    assert _main_retried_once(bench, ["--tiny", "--runs", "2:fsdp,cp=2", "--out", str(out), "--quiet"], out) == 0
    assert _main_retried_once(bench, ["--tiny", "--runs", "1", "--out", str(out), "--quiet", "--append"], out) == 0
    result = json.loads(out.read_text())
    rows = {r["spec"]: r for r in result["rows"]}
    assert set(rows) == {"1", "2:fsdp,cp=2"} and not result["failed"]
    assert result["tokens"] == 32 and result["global_batch"] == 2
    one, two = rows["1"], rows["2:fsdp,cp=2"]
    assert (two["procs"], two["fsdp"], two["cp"], two["data_parallel"]) == (2, True, 2, 1)
    assert len(one["losses"]) == len(two["step_seconds"]) == 2
    # The same clips, weights and global batch: the losses agree to the reduction order's rounding.
    assert two["max_rel_loss_diff_vs_baseline"] < 1e-5 and one["parallel_efficiency"] == 1.0 and two["baseline"] == "1"
    assert two["parallel_efficiency"] > 0 and two["median_step_seconds"] > 0
    md = (tmp_path / "parallel.md").read_text()
    assert "| 2:fsdp,cp=2 | 2 | True | 2 |" in md
