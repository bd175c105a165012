"""CPU speed of SLA's PyTorch path against dense SDPA, side by side in one process.

Default shape is issue 2's speed bar: B=1, H=4, L=8192, D=64, critical=0.05 (negligible=0.10,
linear_scope="marginal", feature_map="softmax"), float32. SLA's time includes the block prediction
(pooling, scores, sorting), both branches and the projection. Runs of SDPA and SLA alternate so that
load from other processes hits both alike; the medians are reported.

    python bench/bench_cpu.py                       # the speed bar, forward only
    python bench/bench_cpu.py --backward --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import sla

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers, also when imported
from provenance import git_commit  # noqa: E402


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(B, H, L, D, critical, negligible, repeats, backward, threads):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    proj_w, proj_b = torch.randn(D, D) * 0.02, torch.zeros(D)
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
        do = torch.randn(B, H, L, D)

    def sdpa():
        o = F.scaled_dot_product_attention(q, k, v)
        if backward:
            o.backward(do)

    def sla_fn():
        o = sla.sparse_linear_attention(q, k, v, critical=critical, negligible=negligible,
                                        proj_weight=proj_w, proj_bias=proj_b, backend="torch")
        if backward:
            o.backward(do)

    grad_ctx = torch.enable_grad if backward else torch.no_grad
    with grad_ctx():
        sdpa(), sla_fn()  # warm-up: allocator, thread pool
        times = {"sdpa": [], "sla": []}
        for _ in range(repeats):
            times["sdpa"].append(_time_once(sdpa))
            times["sla"].append(_time_once(sla_fn))
    _, info = sla.sparse_linear_attention(q.detach(), k.detach(), v.detach(), critical=critical,
                                          negligible=negligible, return_info=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shape": [B, H, L, D], "critical": critical, "negligible": negligible, "mode": "fwd+bwd" if backward else "fwd",
        "sparsity": info.sparsity, "n_critical": info.n_critical, "n_negligible": info.n_negligible,
        "sdpa_ms": med["sdpa"] * 1e3, "sla_ms": med["sla"] * 1e3, "speedup": med["sdpa"] / med["sla"],
        "sdpa_spread_ms": [min(times["sdpa"]) * 1e3, max(times["sdpa"]) * 1e3],
        "sla_spread_ms": [min(times["sla"]) * 1e3, max(times["sla"]) * 1e3],
        "repeats": repeats, "threads": threads,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 4, 8192, 64], metavar=("B", "H", "L", "D"))
    ap.add_argument("--critical", type=float, nargs="+", default=[0.05])
    ap.add_argument("--negligible", type=float, default=0.10)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of each; the median is reported")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--markdown", help="write a Markdown table here")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    rows = []
    for crit in args.critical:
        for backward in ([False, True] if args.backward else [False]):
            row = bench(*args.shape, crit, args.negligible, args.repeats, backward, threads)
            rows.append(row)
            print(f"{row['mode']:8s} crit={crit:.2f} sparsity={row['sparsity']:.3f}  SDPA {row['sdpa_ms']:8.1f} ms"
                  f"  SLA {row['sla_ms']:7.1f} ms  speedup {row['speedup']:5.1f}x", flush=True)
    meta = {
        "date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    if args.markdown:
        lines = [f"CPU: {meta['cpu']}, {meta['cores']} cores, {threads} threads; torch {meta['torch']}; "
                 f"{meta['date']}; commit {meta['commit']}; median of {args.repeats} alternating runs.", "",
                 "| shape (B,H,L,D) | mode | critical | sparsity | SDPA ms | SLA ms | speedup |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {tuple(r['shape'])} | {r['mode']} | {r['critical']} | {r['sparsity']:.3f} | "
                         f"{r['sdpa_ms']:.1f} | {r['sla_ms']:.1f} | {r['speedup']:.1f}x |")
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
