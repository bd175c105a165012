"""What each combination rule costs on the GPU: the whole SLA op (block map, both branches, projection and the
combination) under each rule of ``--rules``, timed in one process, interleaved, and each rule's overhead over the
first.

    python bench/bench_combine.py --out results_combine.json      # CUDA machine: paper and mass
    python bench/bench_combine.py --rules mass,pooled,pooled_cov --out results_combine_pooled.json

The mass rule adds, per query row: one more fp32 value written in the forward and read in the backward (the
mixing weight), a sigmoid, the gradient of the weight's logit (formed in the linear-q kernel, which then also
reads o_s, and read by the dQ kernel with delta; until issue 12's "mass rule backward" commit the dQ kernel
recomputed the projection in its prologue), dO scaled by the weight in the dK/dV loop, and an elementwise pass
over dO for the projection's weight gradient. Prediction (written before the first run): under 5% of the op's
forward+backward time at (1, 12, 32760, 128) bf16, 95% sparsity (bench/RESULTS.md has the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class Operands:
    """What the rule benchmarks run the op on (this script, ``trace_op.py``): random bf16 q, k, v and dO
    ``(B, H, L, D)`` on CUDA (seed 0), a projection ``(D, D)`` and bias ``(D,)`` at scale 0.05 and zero mass
    offsets ``(H,)``, all three needing gradients, and copies of q, k, v that need them too (``qg``, ``kg``,
    ``vg``)."""

    def __init__(self, B: int, H: int, L: int, D: int):
        torch.manual_seed(0)
        self.q, self.k, self.v, self.do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                                           for _ in range(4))
        self.w = (0.05 * torch.randn(D, D, device="cuda")).requires_grad_()
        self.b = (0.05 * torch.randn(D, device="cuda")).requires_grad_()
        self.mo = torch.zeros(H, device="cuda").requires_grad_()
        self.qg, self.kg, self.vg = (x.clone().requires_grad_() for x in (self.q, self.k, self.v))

    def fwd_bwd(self, combine: str, **blocks):
        """A callable running one forward+backward of ``sla.sparse_linear_attention`` under ``combine`` (gradients
        dropped after each call)."""
        import sla

        def run():
            o = sla.sparse_linear_attention(self.qg, self.kg, self.vg, proj_weight=self.w, proj_bias=self.b,
                                            combine=combine, mass_offset=self.mo if combine != "paper" else None,
                                            **blocks)
            o.backward(self.do)
            for t in (self.qg, self.kg, self.vg, self.w, self.b, self.mo):
                t.grad = None
        return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (paper, mass, paper, mass, ...)")
    ap.add_argument("--rules", default="paper,mass", help="comma list of combine= rules; overheads are against the "
                    "first")
    ap.add_argument("--blocks", default="64x64", help="block_q x block_k")
    ap.add_argument("--out", default="results_combine.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_combine.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    import sla
    from provenance import git_commit

    B, H, L, D = (int(x) for x in args.shape.split(","))
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in sla.settings.COMBINE_RULES]
    if unknown:
        print(f"--rules: unknown rule(s) {unknown}; choose from {list(sla.settings.COMBINE_RULES)}", file=sys.stderr)
        return 2
    block_q, block_k = (int(x) for x in args.blocks.split("x"))
    blocks = dict(block_q=block_q, block_k=block_k)
    x = Operands(B, H, L, D)

    def fwd(combine):
        def run():
            with torch.no_grad():
                sla.sparse_linear_attention(x.q, x.k, x.v, proj_weight=x.w, proj_bias=x.b, combine=combine,
                                            mass_offset=x.mo if combine != "paper" else None, **blocks)
        return run

    def fwdbwd(combine):
        return x.fwd_bwd(combine, **blocks)

    times = {f"{m}_{c}": [] for m in ("fwd", "fwdbwd") for c in rules}
    for c in rules:
        fwd(c)()  # compile every kernel before timing
        fwdbwd(c)()
    torch.cuda.synchronize()
    for _ in range(args.repeats):
        for c in rules:
            times[f"fwd_{c}"].append(triton.testing.do_bench(fwd(c), warmup=100, rep=400, return_mode="median"))
            times[f"fwdbwd_{c}"].append(triton.testing.do_bench(fwdbwd(c), warmup=100, rep=400,
                                                                 return_mode="median"))
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, commit=git_commit(),
                  shape=[B, H, L, D], dtype="bf16", critical=0.05, negligible=0.10, blocks=args.blocks,
                  times_ms=times, median_ms=med, baseline=rules[0],
                  **{f"{c}_overhead_{m}": med[f"{m}_{c}"] / med[f"{m}_{rules[0]}"] - 1
                     for c in rules[1:] for m in ("fwd", "fwdbwd")})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
