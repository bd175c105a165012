"""A/B timing of source-level variants of the SLA kernels, in one process on one GPU.

Each variant is a list of text replacements applied to ``sla/ops/sla/triton/kernels.py``; the edited source
is written to a temporary module, imported, swapped into ``ops`` and timed on the same inputs as the
unchanged kernels (medians of ``triton.testing.do_bench``). Every variant's output is checked against the
unchanged kernels' before its time is reported. This is how a kernel-only change is tried before it is made
(for a change that spans kernels and launchers, bench/ab_ops.py times the whole op against another commit's):

    python bench/explore_variants.py --out variants.json

Shape (1, 12, 32760, 128) bf16, critical 0.05, negligible 0.10, marginal scope, 64x64 blocks by default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
KERNELS = os.path.join(ROOT, "sla", "ops", "sla", "triton", "kernels.py")

# (name, op that the variant changes: "fwd" times the forward launcher, "bwd" the backward one, replacements)
VARIANTS = [
    ("fwd: keep q in registers for phi(q) (no second load)", "fwd", [(
        "    b_x = tl.load(Q + i_b * s_q_b + i_h * s_q_h + o_m[:, None] * s_q_l + o_d[None, :], mask=m_q[:, None], "
        "other=0.)\n    b_pq = _feature_map(b_x.to(tl.float32), FEATURE).to(b_x.dtype)",
        "    b_x = b_q\n    b_pq = _feature_map(b_x.to(tl.float32), FEATURE).to(b_x.dtype)")]),
    ("fwd: rescale-and-add outside the dot", "fwd", [(
        "    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PREC)",
        "    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)")]),
    ("fwd: scores scaled before the max", "fwd", [(
        "    b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1) * qk_scale)\n"
        "    b_p = tl.math.exp2(b_s * qk_scale - b_mx_new[:, None])",
        "    b_s = b_s * qk_scale\n    b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))\n"
        "    b_p = tl.math.exp2(b_s - b_mx_new[:, None])")]),
    ("bwd: dK/dV accumulate outside the dots", "bwd", [
        ("        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)",
         "        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)"),
        ("        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)",
         "        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)")]),
]


def load_variant(replacements, tag):
    src = open(KERNELS).read()
    for old, new in replacements:
        if old not in src:
            raise ValueError(f"variant {tag!r}: text not found in kernels.py:\n{old}")
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(prefix="sla_variant_"), "variant_kernels.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"sla_variant_{abs(hash(tag))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # triton.jit reads the source back from this file
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128")
    p.add_argument("--blocks", default="64x64")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    import triton.testing

    from sla.ops.sla.triton import build_block_map_triton, ops

    B, H, L, D = (int(x) for x in args.shape.split(","))
    bq, bk = (int(x) for x in args.blocks.split("x"))
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w, b = 0.05 * torch.randn(D, D, device="cuda"), 0.05 * torch.randn(D, device="cuda")
    bm = build_block_map_triton(q, k, critical=0.05, negligible=0.10, block_q=bq, block_k=bk)
    mask = ops.scope_mask_for(bm, "marginal", ops._state_dtype(q.dtype))
    scale = D ** -0.5
    fwd_args = (q, k, v, bm.critical_lut, mask, w, b, scale, bq, bk, "softmax", True)
    o, o_s, o_l, lse = ops._fwd_impl(*fwd_args)
    bwd_args = (do, q, k, v, o_s, o_l, lse, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t, mask, w,
                b, scale, bq, bk, "softmax")
    runs = {"fwd": lambda: ops._fwd_impl(*fwd_args), "bwd": lambda: ops._bwd_impl(*bwd_args)}
    ref = {"fwd": ops._fwd_impl(*fwd_args)[0], "bwd": ops._bwd_impl(*bwd_args)[:3]}
    results = {"shape": [B, H, L, D], "blocks": args.blocks, "card": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__}
    for op in ("fwd", "bwd"):
        results[f"baseline {op} op ms"] = triton.testing.do_bench(runs[op], warmup=50, rep=300)
        print(f"baseline {op}: {results[f'baseline {op} op ms']:.3f} ms", flush=True)
    names = ("sla_linear_state_kernel", "sla_fwd_kernel", "sla_bwd_dq_kernel", "sla_bwd_dkdv_kernel")
    originals = {n: getattr(ops, n) for n in names}
    for tag, op, replacements in VARIANTS:
        try:
            mod = load_variant(replacements, tag)
            for n in names:
                setattr(ops, n, getattr(mod, n))
            got = runs[op]()
            got = (got[0],) if op == "fwd" else got[:3]
            want = (ref[op],) if op == "fwd" else ref[op]
            err = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, want))
            ms = triton.testing.do_bench(runs[op], warmup=50, rep=300)
            results[tag] = {"op_ms": ms, "max_abs_diff_vs_baseline": err}
            print(f"{tag}: {ms:.3f} ms (baseline {results[f'baseline {op} op ms']:.3f}), max diff {err:.2e}",
                  flush=True)
        except Exception as exc:  # a variant that does not compile is a result too
            results[tag] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{tag}: FAILED {results[tag]['error']}", flush=True)
        finally:
            for n in names:
                setattr(ops, n, originals[n])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
