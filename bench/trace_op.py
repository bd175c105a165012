"""Chrome traces of SLA's Triton op (forward+backward through autograd) under each combination rule, with Python
stacks, for finding where the op's time goes between kernels (host launch gaps, copies, allocations).

    python bench/trace_op.py --rules pooled,pooled_cov --out traces/      # CUDA machine; open in chrome://tracing

Per rule: five warm-up steps, then three profiled steps of ``sla.sparse_linear_attention(..., backend="triton")``
with a projection, bias and zero mass offsets on random bf16 inputs (default (1, 12, 32760, 128), critical 0.05,
negligible 0.10, 64x64 blocks); writes ``trace_<rule>.json.gz`` and prints, per step, the GPU's busy time (sum of
kernels), the span from the first kernel to the last, and the largest gaps between consecutive kernels. The
profiler's stacks slow the host down, so the gaps here are upper bounds; time the op with ``bench_combine.py``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def kernel_gaps(trace: dict, steps: int, top: int = 8) -> dict:
    """Busy time, span and the largest gaps (µs, summed by the pair of kernels around them) per step."""
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    gaps = collections.Counter()
    for a, b in zip(kernels, kernels[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            gaps[f"{a['name'][:60]} -> {b['name'][:60]}"] += gap / steps
    return {"kernels_per_step": len(kernels) / steps, "busy_ms": sum(e["dur"] for e in kernels) / steps / 1e3,
            "span_ms": span / steps / 1e3, "largest_gaps_us": dict(gaps.most_common(top))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: %(default)s)")
    p.add_argument("--rules", default="pooled,pooled_cov", help="comma list of combine= rules")
    p.add_argument("--blocks", default="64x64", help="block_q x block_k (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for the traces")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("trace_op.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_combine import Operands

    B, H, L, D = (int(x) for x in args.shape.split(","))
    block_q, block_k = (int(x) for x in args.blocks.split("x"))
    os.makedirs(args.out, exist_ok=True)
    operands = Operands(B, H, L, D)
    steps = 3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for rule in args.rules.split(","):
        step = operands.fwd_bwd(rule, block_q=block_q, block_k=block_k)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities, with_stack=True) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw) as f:
                summary = kernel_gaps(json.load(f), steps)
            with open(raw, "rb") as f, gzip.open(os.path.join(args.out, f"trace_{rule}.json.gz"), "wb") as g:
                shutil.copyfileobj(f, g)
        print(rule, json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
