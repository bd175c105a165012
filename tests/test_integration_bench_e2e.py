"""bench/bench_e2e.py runs end to end on a tiny Wan model on CPU (the GPU run uses the same code paths)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

pytest.importorskip("diffusers")

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_e2e.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_e2e_tiny_writes_json_and_markdown(tmp_path):
    bench = _load_bench()
    out = tmp_path / "e2e.json"
    assert bench.main(["--tiny", "--out", str(out), "--warmup", "0", "--iters", "1", "--quiet"]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["step"]): r for r in result["rows"]}
    # on CPU the flash/cuDNN baselines become PyTorch's default SDPA ("native")
    assert set(rows) == {(m, s) for m in ("native", "sla", "sla_tiled", "noop") for s in ("forward", "train")}
    assert result["tokens"] == 192 and result["sla"]["resolved_backend"] == "torch"
    assert result["sla"]["combine"] == "auto" and result["sla"]["token_tile_of_sla_tiled"] == [4, 4, 4]
    for (mode, step), row in rows.items():
        assert row["ms"] > 0
        if mode != "noop":
            assert 0 <= row["self_attention_share"] <= 1
        if step == "forward":
            assert row["finite"]
    assert rows[("sla", "forward")]["speedup_vs_native"] > 0
    md = (tmp_path / "e2e.md").read_text()
    assert "| sla | forward |" in md and "| sla_tiled | train |" in md and "self-attn share" in md
