"""bench/bench_pipeline.py runs end to end on the tiny pipeline on CPU (the GPU run uses the same code paths:
the same generate_video as `sla sample --pipeline`, the same mode switching, the same JSON and Markdown)."""

from __future__ import annotations

import importlib.util
import json
import os

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_pipeline.py")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_pipeline_tiny_writes_json_and_markdown(tmp_path):
    bench = _load_bench()
    out = tmp_path / "pipe.json"
    assert bench.main(["--tiny", "--out", str(out), "--warmup-steps", "1", "--quiet"]) == 0
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    # on CPU the flash/cuDNN baselines become PyTorch's default SDPA ("native")
    assert set(rows) == {"native", "sla"}
    assert result["tokens"] == 48 and result["steps"] == 2 and result["sla"]["resolved_backend"] == "torch"
    for mode, row in rows.items():
        assert len(row["step_seconds"]) == 2 and row["finite"]
        assert row["text_encoding_seconds"] > 0 and row["vae_decode_seconds"] > 0
        total = row["text_encoding_seconds"] + row["denoising_seconds"] + row["vae_decode_seconds"]
        assert abs(row["total_seconds"] - total) < 1e-9
        assert row["video_shape"] == [9, 64, 64, 3]
    # 3 key blocks per row, 1 critical -> 2/3 of the query-key pairs skipped; the dense rows measure none
    assert abs(rows["sla"]["sparsity"]["transformer"]["mean"] - 2 / 3) < 1e-9 and "sparsity" not in rows["native"]
    assert rows["sla"]["denoising_speedup_vs_native"] > 0
    md = (tmp_path / "pipe.md").read_text()
    assert "| sla |" in md and "seconds per video" in md
