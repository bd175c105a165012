"""GPU benchmark of SLA's block classification (``build_block_map_triton``): the time of each stage and of
the whole builder, in one process.

Usage (CUDA machine, repo root):

    python bench/bench_blockmap.py --out bench/results_blockmap.json

For each shape (B, H, L, D), bf16, 64x64 blocks, critical 0.05, negligible 0.10:

* stages, each timed on its own: mean pooling of q and k, the fp32 scores (with smooth-K), the row selection
  (``sla_select_blocks_bisect_kernel`` with 2, 4 and 8 warps), the two CSR transposes (both; the critical one);
* the whole builder with all transposes (the complete map), only the critical one (what the SLA op builds
  for training) and none (inference). The complete map must equal the PyTorch builder's at the shapes where
  that fits (``torch.equal`` on every field), or the script exits non-zero.

Times are medians of ``triton.testing.do_bench`` (ms). The A/B that chose the bisection over an in-register
sort and ``torch.topk`` (since removed) is in bench/RESULTS.md.
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


def same_map(a, b) -> bool:
    from sla.ops.sla.blockmap import _TENSOR_FIELDS

    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in _TENSOR_FIELDS)


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
    st["scores"] = do_bench(lambda: bm._block_scores(pq, pk, k_sums, L))
    scores = bm._block_scores(pq, pk, k_sums, L)
    for warps in (2, 4, 8):
        st[f"select_{warps}warps"] = do_bench(lambda w=warps: bm._select_blocks(scores, n_crit, n_negl, num_warps=w))
    class_map = bm._select_blocks(scores, n_crit, n_negl)[0]
    st["transposes"] = do_bench(lambda: bm._lut_transposes(class_map, n_crit, n_negl, True, True))
    st["transposes_critical_only"] = do_bench(lambda: bm._lut_transposes(class_map, n_crit, n_negl, True, False))

    for transposes in ("all", "critical", "none"):
        row["builder_ms"][f"transposes={transposes}"] = do_bench(
            lambda t=transposes: bm.build_block_map_triton(q, k, critical=critical, negligible=negligible,
                                                           block_q=block, block_k=block, transposes=t))
    first = bm.build_block_map_triton(q, k, critical=critical, negligible=negligible, block_q=block, block_k=block)
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
