"""A/B timing of source-level variants of the SLA kernels, in one process on one GPU.

Each variant is a list of text replacements applied to ``sla/ops/sla/triton/kernels.py``; the edited source
is written to a temporary module, imported, swapped into ``ops`` and timed on the same inputs as the
unchanged kernels (medians of ``triton.testing.do_bench``). Every variant's output is checked against the
unchanged kernels' before its time is reported. This is how a kernel-only change is tried before it is made
(for a change that spans kernels and launchers, bench/ab_ops.py times the whole op against another commit's):

    python bench/explore_variants.py --out variants.json

Shape (1, 12, 32760, 128) bf16, critical 0.05, negligible 0.10, marginal scope, 64x64 blocks by default. Without
a GPU, ``TRITON_INTERPRET=1 python bench/explore_variants.py --check-only --shape 1,2,300,64`` checks that every
variant computes what the unchanged kernels compute (fp32, no timing).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
KERNELS = os.path.join(ROOT, "sla", "ops", "sla", "triton", "kernels.py")

def _kernel_source_lines():
    with open(KERNELS) as f:
        return f.read().splitlines(keepends=True)


def _kernel_function(name: str) -> ast.FunctionDef:
    tree = ast.parse("".join(_kernel_source_lines()))
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def function_body(name: str) -> str:
    """The current text of a kernels.py function's body, docstring excluded: what a variant replaces."""
    body = _kernel_function(name).body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return "".join(_kernel_source_lines()[body[0].lineno - 1:body[-1].end_lineno])


def first_loop(name: str) -> str:
    """The current text of the first ``for`` loop in a kernels.py function."""
    loop = next(n for n in ast.walk(_kernel_function(name)) if isinstance(n, ast.For))
    return "".join(_kernel_source_lines()[loop.lineno - 1:loop.end_lineno])


# (name, op that the variant changes: "fwd" times the forward launcher, "bwd" the backward one, replacements
# (old text, new text)). The old texts are read from kernels.py, so a variant always edits the current code.
# Earlier candidates (q kept in registers for phi(q), the rescale outside the dot, scores scaled before the max,
# dK/dV accumulated outside the dots, the last key block peeled off the loops, and the four below) were measured
# and are in bench/RESULTS.md; the list keeps the last batch, all slower or equal, as examples of the format.
VARIANTS = [
    ("bwd: dK/dV in steps of half a query block (BM/2 rows: smaller S^T, dP^T tiles)", "bwd",
     [(first_loop("sla_bwd_dkdv_kernel"), """    for i_t in range(i_start, i_end):
        i_m = tl.load(p_lut_t + i_t)
        for i_half in tl.static_range(2):
            o_m = i_m * BM + i_half * (BM // 2) + tl.arange(0, BM // 2)
            m_q = o_m < Lq
            b_q = tl.load(p_q0 + o_m[:, None] * s_q_l + o_d[None, :], mask=m_q[:, None], other=0.)
            b_do = tl.load(p_do0 + o_m[:, None] * s_do_l + o_d[None, :], mask=m_q[:, None], other=0.)
            b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))
            b_delta = tl.load(DELTA + i_bh * Lq + o_m, mask=m_q, other=0.)
            b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
            b_pt = tl.math.exp2(b_st * qk_scale - b_lse[None, :])
            b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
            b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=PREC)
""")]),
    ("bwd: dK/dV with q loaded transposed ([D, BM] tile, as Triton's attention tutorial)", "bwd",
     [(first_loop("sla_bwd_dkdv_kernel"), """    for i_t in range(i_start, i_end):
        o_m, m_q, m_qt = _block_rows(tl.load(p_lut_t + i_t), BM, Lq)
        b_qt = tl.load(p_q0 + o_m[None, :] * s_q_l + o_d[:, None], mask=m_q[None, :], other=0.)  # [D, BM]
        b_do = _load_tile(p_do0, o_m, s_do_l, m_qt, D)  # [BM, D]
        b_lse = tl.load(LSE + i_bh * Lq + o_m, mask=m_q, other=float("inf"))
        b_delta = tl.load(DELTA + i_bh * Lq + o_m, mask=m_q, other=0.)
        b_st = tl.dot(b_k, b_qt, input_precision=PREC)  # [BN, BM]
        b_pt = tl.math.exp2(b_st * qk_scale - b_lse[None, :])
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=PREC)
""")]),
    ("bwd: dQ over each key block in two halves (BN/2 keys per step)", "bwd",
     [(function_body("_dq_block"), """    for i_half in tl.static_range(2):
        b_k, b_v, m_k = _load_key_block(p_k0, p_v0, KD, VD, i_b, i_h, 2 * i_n + i_half, s_k_l, s_v_l, Lk, D,
                                        BN // 2, False)  # pointer loads: the descriptors' blocks are BN rows
        b_p = tl.math.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale - b_lse[:, None])
        b_p = tl.where(m_k[None, :], b_p, 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=PREC)
    return b_dq
""")]),
    ("fwd: each key block in two halves (BN/2 keys per online-softmax step)", "fwd",
     [(function_body("_attend_block"), """    for i_half in tl.static_range(2):
        b_k, b_v, m_k = _load_key_block(p_k0, p_v0, KD, VD, i_b, i_h, 2 * i_n + i_half, s_k_l, s_v_l, Lk, D,
                                        BN // 2, False)  # pointer loads: the descriptors' blocks are BN rows
        b_s = tl.where(m_k[None, :], tl.dot(b_q, tl.trans(b_k), input_precision=PREC), float("-inf"))
        b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1) * qk_scale)
        b_p = tl.math.exp2(b_s * qk_scale - b_mx_new[:, None])
        b_alpha = tl.math.exp2(b_mx - b_mx_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=PREC)
        b_mx = b_mx_new
    return b_mx, b_l, b_acc
""")]),
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
    p.add_argument("--check-only", action="store_true",
                   help="compare each variant's outputs with the unchanged kernels' and time nothing: runs on a CPU "
                        "under TRITON_INTERPRET=1 (fp32; use a small --shape such as 1,2,300,64)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    import triton
    import triton.testing

    from sla.ops.sla.triton import build_block_map_triton, launch
    from sla.ops.sla.triton.api import scope_mask_for

    if args.check_only:
        from sla.ops.sla.triton.testing import patch_triton_interpreter

        patch_triton_interpreter()  # the CPU interpreter under NumPy >= 2.4

    B, H, L, D = (int(x) for x in args.shape.split(","))
    bq, bk = (int(x) for x in args.blocks.split("x"))
    device, dtype = ("cpu", torch.float32) if args.check_only else ("cuda", torch.bfloat16)
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(4))
    w, b = 0.05 * torch.randn(D, D, device=device), 0.05 * torch.randn(D, device=device)
    bm = build_block_map_triton(q, k, critical=0.05, negligible=0.10, block_q=bq, block_k=bk)
    mask = scope_mask_for(bm, "marginal", launch.state_dtype(q.dtype))
    scale = D ** -0.5
    fwd_args = (q, k, v, bm.critical_lut, mask, w, b, None, None, scale, bq, bk, "softmax", "paper", True)
    o, o_s, o_l, lse, a, o_c, rows, means = launch.forward(*fwd_args)
    bwd_args = (do, q, k, v, o_s, o_l, lse, a, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t, mask, w,
                b, None, None, o_c, rows, means, scale, bq, bk, "softmax", "paper")
    runs = {"fwd": lambda: launch.forward(*fwd_args), "bwd": lambda: launch.backward(*bwd_args)}
    ref = {"fwd": launch.forward(*fwd_args)[0], "bwd": launch.backward(*bwd_args)[:3]}
    results = {"shape": [B, H, L, D], "blocks": args.blocks, "torch": torch.__version__, "triton": triton.__version__,
               "card": "CPU (interpreter)" if args.check_only else torch.cuda.get_device_name()}

    def timed(op):
        return None if args.check_only else triton.testing.do_bench(runs[op], warmup=50, rep=300)

    names = ("sla_linear_state_kernel", "sla_fwd_kernel", "sla_bwd_dq_kernel", "sla_bwd_linear_q_kernel",
             "sla_bwd_dkdv_kernel")
    originals = {n: getattr(launch, n) for n in names}
    for tag, op, replacements in VARIANTS:
        try:
            mod = load_variant(replacements, tag)
            base_ms = timed(op)  # the unchanged kernels, timed right before each variant: drift hits both alike
            for n in names:
                setattr(launch, n, getattr(mod, n))
            got = runs[op]()
            got = (got[0],) if op == "fwd" else got[:3]
            want = (ref[op],) if op == "fwd" else ref[op]
            err = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, want))
            ms = timed(op)
            results[tag] = {"op_ms": ms, "baseline_op_ms": base_ms, "max_abs_diff_vs_baseline": err}
            timing = "not timed" if ms is None else f"{ms:.3f} ms (unchanged kernels {base_ms:.3f} ms)"
            print(f"{tag}: {timing}, max diff {err:.2e}", flush=True)
        except Exception as exc:  # a variant that does not compile is a result too
            results[tag] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{tag}: FAILED {results[tag]['error']}", flush=True)
        finally:
            for n in names:
                setattr(launch, n, originals[n])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
