"""GPU benchmark of SLA's block classification (``build_block_map_triton``): stage times and an A/B of the
row-selection methods and of the two ways to build the key-block LUTs, in one process.

Usage (CUDA machine, repo root):

    python bench/bench_blockmap.py --out bench/results_blockmap.json

For each shape (B, H, L, D), bf16, 64x64 blocks, critical 0.05, negligible 0.10:

* stages, each timed on its own: mean pooling of q and k, the fp32 score matmul, the row selection with each
  method (``sort``: one in-register sort per row; ``bisect``: bisection on the score bits; ``topk``:
  ``torch.topk`` + row compaction; the two kernels also with 2 and 8 warps instead of 4), the key-block LUTs (strided column reads vs a transposed copy);
* the whole builder with every (method, transpose) pair, and the default builder with only the critical
  transpose (training) or none (inference); every pair's map must equal the first's, and at
  the shapes where the PyTorch builder fits, the PyTorch builder's (``torch.equal`` on every field), or the
  script exits non-zero.

Times are medians of ``triton.testing.do_bench`` (ms). Expected before the first run (H200 numbers of the
whole builder: sort 13 ms, topk 9.7 ms at T_n = 1182): the sort best at T_n = 512, the bisection well under
1 ms at T_n = 1182, the transposed copy a fraction of a millisecond faster at 1182. Measured on an H100
(bench/RESULTS.md): the first bisection took 3.1-3.8 ms at 1182 (not under 1 ms) and already beat the sort
at 512; the copy did not help. Expected for the early-exit int32 bisection: about 3x less at 1182.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from provenance import git_commit  # noqa: E402

METHODS = ("sort", "bisect", "topk")
FIELDS = ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
          "negligible_lut_t_offsets", "negligible_lut_t")


def same_map(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def bench_shape(shape, critical, negligible, block, reference_max_tokens):
    import triton
    from triton.testing import do_bench

    from sla.ops.sla.blockmap import build_block_map, class_counts
    from sla.ops.sla.triton import blockmap as bm

    B, H, L, D = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    # A (B, L, H, D) buffer seen as (B, H, L, D), as diffusers hands it over.
    q = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    k = torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    Tn = triton.cdiv(L, block)
    n_crit, n_negl = class_counts(critical, negligible, Tn)
    row = {"shape": list(shape), "block": block, "T_n": Tn, "BT": triton.next_power_of_2(Tn),
           "n_critical": n_crit, "n_negligible": n_negl, "stages_ms": {}, "builder_ms": {}}
    st = row["stages_ms"]
    st["pool_q_k"] = do_bench(lambda: (bm._mean_pool(q, block), bm._mean_pool(k, block, with_sums=True)))
    pq, (pk, k_sums) = bm._mean_pool(q, block), bm._mean_pool(k, block, with_sums=True)

    def score():
        return (pq @ torch.sub(pk, k_sums.sum(dim=2, keepdim=True), alpha=1.0 / L).transpose(-1, -2)).contiguous()

    st["scores"] = do_bench(score)
    scores = score()
    selected = {}
    for method in METHODS:
        st[f"select_{method}"] = do_bench(lambda m=method: bm._select_blocks(scores, n_crit, n_negl, m))
        selected[method] = bm._select_blocks(scores, n_crit, n_negl, method)
    for method in ("sort", "bisect"):
        for warps in (2, 8):
            st[f"select_{method}_{warps}warps"] = do_bench(
                lambda m=method, w=warps: bm._select_blocks(scores, n_crit, n_negl, m, num_warps=w))
    for method in METHODS[1:]:
        for a, b in zip(selected[method], selected["sort"]):
            if not torch.equal(a, b):
                raise SystemExit(f"{shape}: selection {method!r} differs from 'sort'")
    class_map = selected["sort"][0]

    def build_transposes():
        for cls, count in ((1, n_crit), (-1, n_negl)):
            counts = (class_map == cls).sum(dim=2, dtype=torch.int32)
            offsets = torch.nn.functional.pad(torch.cumsum(counts, dim=-1, dtype=torch.int32), (1, 0))
            bm._compact(class_map, cls, False, count, offsets)

    st["transposes"] = do_bench(build_transposes)

    maps = {}
    try:
        for method in METHODS:
            bm.SELECTION_METHOD_OVERRIDE = method

            def build():
                return bm.build_block_map_triton(q, k, critical=critical, negligible=negligible,
                                                 block_q=block, block_k=block)

            row["builder_ms"][method] = do_bench(build)
            maps[method] = build()
        bm.SELECTION_METHOD_OVERRIDE = None
        for transposes in ("critical", "none"):  # what training / inference through the SLA op build
            row["builder_ms"][f"default, transposes={transposes}"] = do_bench(
                lambda t=transposes: bm.build_block_map_triton(q, k, critical=critical, negligible=negligible,
                                                               block_q=block, block_k=block, transposes=t))
    finally:
        bm.SELECTION_METHOD_OVERRIDE = None
    first = next(iter(maps.values()))
    for name, m in maps.items():
        if not same_map(m, first):
            raise SystemExit(f"{shape}: builder {name} gives a different map")
    if B * H * L <= reference_max_tokens:
        ref = build_block_map(q, k, critical=critical, negligible=negligible, block_q=block, block_k=block)
        row["matches_pytorch_builder"] = same_map(ref, first)
        if not row["matches_pytorch_builder"]:
            raise SystemExit(f"{shape}: GPU map differs from the PyTorch builder")
    return row


def markdown(meta, rows) -> str:
    lines = [f"Block classification, {meta['card']}, torch {meta['torch']}, triton {meta['triton']}, commit "
             f"{meta['commit']}, {meta['date']}; bf16, 64x64 blocks, critical {meta['critical']}, negligible "
             f"{meta['negligible']}; medians of do_bench, ms.", ""]
    stage_names = list(rows[0]["stages_ms"])
    lines.append("| shape | T_n | " + " | ".join(stage_names) + " |")
    lines.append("|---|---:|" + "---:|" * len(stage_names))
    for r in rows:
        lines.append(f"| {tuple(r['shape'])} | {r['T_n']} | "
                     + " | ".join(f"{r['stages_ms'][s]:.3f}" for s in stage_names) + " |")
    lines.append("")
    builders = list(rows[0]["builder_ms"])
    lines.append("| shape | " + " | ".join(f"builder {b}" for b in builders) + " |")
    lines.append("|---|" + "---:|" * len(builders))
    for r in rows:
        lines.append(f"| {tuple(r['shape'])} | " + " | ".join(f"{r['builder_ms'][b]:.3f}" for b in builders) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1,12,32760,128;1,40,75600,128;2,16,32760,128",
                   help="';'-separated B,H,L,D shapes")
    p.add_argument("--critical", type=float, default=0.05)
    p.add_argument("--negligible", type=float, default=0.10)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--reference-max-tokens", type=int, default=12 * 32760,
                   help="compare with the PyTorch builder when B*H*L is at most this (it materialises a sort)")
    p.add_argument("--out", help="JSON output path (Markdown beside it)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the interpreter tests in tests/test_triton_blockmap.py cover correctness on CPU)")
    import datetime

    import triton
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "critical": args.critical, "negligible": args.negligible}
    rows = []
    for text in args.shapes.split(";"):
        shape = tuple(int(x) for x in text.split(","))
        rows.append(bench_shape(shape, args.critical, args.negligible, args.block, args.reference_max_tokens))
        print(json.dumps(rows[-1]), flush=True)
    md = markdown(meta, rows)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
