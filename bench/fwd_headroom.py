"""How fast can SLA's sparse forward loop go in Triton on Hopper? Variants of the loop alone, timed in one process.

The library's forward kernel (``sla_fwd_kernel``) runs the sparse branch's online softmax over a query block's
critical key blocks and then the linear branch, projection and mix in its epilogue. This script times the sparse
loop by itself in a few forms, beside the library's kernel and FlexAttention's Triton template on the same shape,
to find where the forward's time goes and which form to build into the library:

* ``ptr``: pointer loads, as the library's loop (``BM`` query rows x ``SUB``-wide key tiles);
* ``tma``: K/V (and Q) through host-side TMA tensor descriptors (sm_90+), 4-D ``(B, H, L, D)`` so a strided view
  works and the ragged end is zero-filled by the hardware;
* ``ws``: the loop with Triton's automatic warp specialisation (``tl.range(..., warp_specialize=True)``);
* sparse key blocks of 64 or 128 (a 128-wide block walked as two 64-wide tiles, as Flex's template does), and
  query tiles of 64 or 128 rows.

Every variant's output is checked against an fp32 PyTorch computation of the same block-sparse attention on a
sample of query blocks before its time counts. Random inputs and a random per-(head, query block) selection of
the critical key blocks (sorted), ``critical`` of each row, as ``../shared/reference/hopper-anchors.md`` measured.

    python bench/fwd_headroom.py --out headroom.json            # GPU
    TRITON_INTERPRET=1 python bench/fwd_headroom.py --check-only --shape 1,2,300,64   # CPU, fp32, no timing
"""

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

try:  # Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _sparse_step(b_q, b_mx, b_l, b_acc, i_n, K, V, k_desc, v_desc, base, i_b, i_h, s_l, qk_scale, L,
                 D: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, TMA: tl.constexpr):
    """One sparse key block (``BN`` keys in ``SUB``-wide tiles) of the online softmax."""
    o_d = tl.arange(0, D)
    for i_s in tl.static_range(BN // SUB):
        start = i_n * BN + i_s * SUB
        o_k = start + tl.arange(0, SUB)
        m_k = o_k < L
        if TMA:
            b_k = k_desc.load([i_b.to(tl.int32), i_h.to(tl.int32), start, 0]).reshape(SUB, D)
            b_v = v_desc.load([i_b.to(tl.int32), i_h.to(tl.int32), start, 0]).reshape(SUB, D)
        else:
            b_k = tl.load(K + base + o_k[:, None] * s_l + o_d[None, :], mask=m_k[:, None], other=0.)
            b_v = tl.load(V + base + o_k[:, None] * s_l + o_d[None, :], mask=m_k[:, None], other=0.)
        b_s = tl.where(m_k[None, :], tl.dot(b_q, tl.trans(b_k)), float("-inf"))
        b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1) * qk_scale)
        b_p = tl.math.exp2(b_s * qk_scale - b_mx_new[:, None])
        b_alpha = tl.math.exp2(b_mx - b_mx_new)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
        b_mx = b_mx_new
    return b_mx, b_l, b_acc


@triton.jit(do_not_specialize=["L", "Tm", "N_CRIT"])
def _sparse_fwd_loop(Q, K, V, LUT, O, q_desc, k_desc, v_desc,
                     s_b, s_h, s_l, qk_scale, L, Tm, N_CRIT,
                     H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr,
                     TMA: tl.constexpr, WS: tl.constexpr):
    """Block-sparse softmax attention of one (query tile, batch*head): q, k, v, o ``(B, H, L, D)`` with the same
    strides; LUT ``(B*H, Tm, N_CRIT)`` int32 key-block indices (blocks of ``BN`` keys), walked in ``SUB``-wide
    tiles. Base-2 online softmax with fp32 state, as the library's loop."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, D)
    m_q = o_m < L
    base = i_b * s_b + i_h * s_h
    if TMA:
        b_q = q_desc.load([i_b.to(tl.int32), i_h.to(tl.int32), i_m * BM, 0]).reshape(BM, D)
    else:
        b_q = tl.load(Q + base + o_m[:, None] * s_l + o_d[None, :], mask=m_q[:, None], other=0.)
    b_mx = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    p_lut = LUT + (i_bh * Tm + i_m) * N_CRIT
    if WS:
        for i_c in tl.range(0, N_CRIT, warp_specialize=True):
            b_mx, b_l, b_acc = _sparse_step(b_q, b_mx, b_l, b_acc, tl.load(p_lut + i_c), K, V, k_desc, v_desc, base,
                                            i_b, i_h, s_l, qk_scale, L, D, BN, SUB, TMA)
    else:
        for i_c in range(N_CRIT):
            b_mx, b_l, b_acc = _sparse_step(b_q, b_mx, b_l, b_acc, tl.load(p_lut + i_c), K, V, k_desc, v_desc, base,
                                            i_b, i_h, s_l, qk_scale, L, D, BN, SUB, TMA)
    b_o = b_acc / b_l[:, None]
    tl.store(O + base + o_m[:, None] * s_l + o_d[None, :], b_o.to(O.dtype.element_ty), mask=m_q[:, None])


def _descriptor(x: torch.Tensor, rows: int):
    B, H, L, D = x.shape
    return TensorDescriptor(x, [B, H, L, D], list(x.stride()), [1, 1, rows, D])


def sparse_forward(q, k, v, lut, BM, BN, SUB, tma=False, ws=False, num_warps=4, num_stages=3):
    """Run the variant; ``lut`` ``(B, H, Tm, n)`` int32 over ``BN``-key blocks with ``Tm = cdiv(L, BM)``."""
    B, H, L, D = q.shape
    o = torch.empty_like(q)
    Tm, n = lut.shape[2], lut.shape[3]
    descs = (_descriptor(q, BM), _descriptor(k, SUB), _descriptor(v, SUB)) if tma else (q, k, v)  # placeholders
    _sparse_fwd_loop[(Tm, B * H)](
        q, k, v, lut, o, *descs, q.stride(0), q.stride(1), q.stride(2), D ** -0.5 * 1.4426950408889634, L, Tm, n,
        H=H, D=D, BM=BM, BN=BN, SUB=SUB, TMA=tma, WS=ws, num_warps=num_warps, num_stages=num_stages)
    return o


def random_lut(B, H, L, BM, BN, critical, device, seed=0):
    Tm, Tn = triton.cdiv(L, BM), triton.cdiv(L, BN)
    n = max(1, round(critical * Tn))
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(B, H, Tm, Tn, device=device, generator=g)
    return scores.topk(n, dim=-1).indices.sort(dim=-1).values.to(torch.int32).contiguous()


def reference_rows(q, k, v, lut, BM, BN, samples):
    """fp32 block-sparse attention of the sampled (b, h, query block)s: {sample: [rows, D]}."""
    L, D = q.shape[2], q.shape[3]
    out = {}
    for (b, h, i) in samples:
        rows = torch.arange(i * BM, min((i + 1) * BM, L), device=q.device)
        keys = torch.cat([torch.arange(j * BN, min((j + 1) * BN, L), device=q.device) for j in lut[b, h, i].tolist()
                          if j * BN < L])
        s = q[b, h, rows].float() @ k[b, h, keys].float().T * D ** -0.5
        out[(b, h, i)] = torch.softmax(s, dim=-1) @ v[b, h, keys].float()
    return out


def check(o, ref, BM, tol):
    L = o.shape[2]
    err = 0.0
    for (b, h, i), r in ref.items():
        got = o[b, h, i * BM:min((i + 1) * BM, L)].float()
        err = max(err, (got - r).abs().max().item())
    if not err <= tol:
        raise AssertionError(f"max error {err:.3g} > {tol}")
    return err


# (name, BM, BN, SUB, tma, ws, num_warps, num_stages)
VARIANTS = [
    ("ptr 64x64 w4 s3 (the library's loop)", 64, 64, 64, False, False, 4, 3),
    ("ptr 64x64 w4 s2", 64, 64, 64, False, False, 4, 2),
    ("ptr 64x64 w4 s4", 64, 64, 64, False, False, 4, 4),
    ("ptr 64x64 w8 s3", 64, 64, 64, False, False, 8, 3),
    ("tma 64x64 w4 s2", 64, 64, 64, True, False, 4, 2),
    ("tma 64x64 w4 s3", 64, 64, 64, True, False, 4, 3),
    ("tma 64x64 w4 s4", 64, 64, 64, True, False, 4, 4),
    ("tma+ws 64x64 w4 s3", 64, 64, 64, True, True, 4, 3),
    ("ptr 128x64 w8 s3", 128, 64, 64, False, False, 8, 3),
    ("tma 128x64 w8 s3", 128, 64, 64, True, False, 8, 3),
    ("tma+ws 128x64 w8 s3", 128, 64, 64, True, True, 8, 3),
    ("ptr 128x128 sub64 w8 s3 (Flex's template shape)", 128, 128, 64, False, False, 8, 3),
    ("tma 128x128 sub64 w8 s3", 128, 128, 64, True, False, 8, 3),
    ("ptr 64x128 sub64 w4 s3", 64, 128, 64, False, False, 4, 3),
    ("tma 64x128 sub64 w4 s3", 64, 128, 64, True, False, 4, 3),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: %(default)s)")
    p.add_argument("--critical", type=float, default=0.05, help="share of key blocks kept per row")
    p.add_argument("--check-only", action="store_true", help="check outputs only (no timing; CPU interpreter)")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only variants whose name has one")
    p.add_argument("--no-library", action="store_true", help="skip the library's kernel and FlexAttention rows")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    B, H, L, D = (int(x) for x in args.shape.split(","))
    cpu = args.check_only and os.environ.get("TRITON_INTERPRET") == "1"
    if cpu:
        from sla.ops.sla.triton.testing import patch_triton_interpreter
        patch_triton_interpreter()
    device = "cpu" if cpu else "cuda"
    dtype = torch.float32 if cpu else torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    meta = {"shape": [B, H, L, D], "critical": args.critical, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "triton": triton.__version__, "commit": os.environ.get("SLA_COMMIT", ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"}
    rows = []
    if not args.check_only:
        from bench.bench_kernels import bench
    variants = VARIANTS
    if args.only:
        keys = args.only.split(",")
        variants = [v_ for v_ in VARIANTS if any(key in v_[0] for key in keys)]
    luts, refs = {}, {}
    for name, BM, BN, SUB, tma, ws, nw, ns in variants:
        if (tma or ws) and (cpu and ws or TensorDescriptor is None
                            or (device == "cuda" and torch.cuda.get_device_capability()[0] < 9)):
            rows.append({"variant": name, "BM": BM, "BN": BN, "SUB": SUB, "tma": tma, "ws": ws,
                         "skipped": "warp specialisation needs a GPU; TMA needs sm_90+ and Triton's tensor descriptors"})
            continue
        if (BM, BN) not in luts:
            lut = random_lut(B, H, L, BM, BN, args.critical, device)
            Tm = lut.shape[2]
            samples = [(0, h, i) for h in (0, H - 1) for i in (0, Tm // 2, Tm - 1)]
            luts[BM, BN] = lut
            refs[BM, BN] = reference_rows(q, k, v, lut, BM, BN, samples)
        lut = luts[BM, BN]
        row = {"variant": name, "BM": BM, "BN": BN, "SUB": SUB, "tma": tma, "ws": ws, "num_warps": nw,
               "num_stages": ns, "n_critical": lut.shape[3]}
        try:
            o = sparse_forward(q, k, v, lut, BM, BN, SUB, tma, ws, nw, ns)
            row["max_err"] = check(o, refs[BM, BN], BM, tol)
            if not args.check_only:
                t = bench(lambda: sparse_forward(q, k, v, lut, BM, BN, SUB, tma, ws, nw, ns), 200)
                flops = 4.0 * B * H * lut.shape[2] * BM * lut.shape[3] * BN * D
                row.update(ms=t, effective_tflops=flops / (t * 1e-3) / 1e12,
                           ms_at_5pct=t * (0.05 * L * L) / (lut.shape[2] * BM * lut.shape[3] * BN))
        except Exception as e:  # a variant that does not compile on this card/triton is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.check_only and not args.no_library:
        rows.extend(library_rows(q, k, v, args.critical))
    bad = [r for r in rows if "error" in r and r.get("tma") is False]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if bad else 0


def library_rows(q, k, v, critical):
    """The library's forward kernel at 64x64 and 128x64 (inference and with the tensors backward keeps; states and
    their aggregation subtracted, as bench_kernels' breakdown does) and FlexAttention's Triton template on the
    same random selection as the loop variants at 128x128 and 128x64."""
    from types import SimpleNamespace

    from bench.bench_kernels import bench, flex_fn
    from sla.ops.sla.triton import build_block_map_triton, launch
    from sla.ops.sla.triton.api import scope_mask_for

    B, H, L, D = q.shape
    out = []
    for bq, bk in ((64, 64), (128, 64)):
        bm = build_block_map_triton(q, k, critical=critical, negligible=0.10, block_q=bq, block_k=bk)
        mask = scope_mask_for(bm, "marginal", launch.state_dtype(q.dtype))
        t_state = bench(lambda: launch.linear_states(k, v, bk, "softmax"))
        hs, zs = launch.linear_states(k, v, bk, "softmax")
        t_agg = bench(lambda: launch.aggregate_states(hs, zs, mask))
        w = 0.05 * torch.randn(D, D, device=q.device)
        b = 0.05 * torch.randn(D, device=q.device)
        offs = torch.zeros(H, device=q.device)
        for combine in ("paper", "mass"):
            for aux in (False, True):
                args = (q, k, v, bm.critical_lut, mask, w, b, offs if combine == "mass" else None, None, D ** -0.5,
                        bq, bk, "softmax", combine, aux)
                t = bench(lambda: launch.forward(*args)) - t_state - t_agg
                flops = 4.0 * B * H * bm.num_query_blocks * bq * bm.n_critical * bk * D
                row = {"variant": f"library sla_fwd_kernel {bq}x{bk} combine={combine} store_aux={aux}", "BM": bq,
                       "BN": bk, "n_critical": bm.n_critical, "ms": t, "effective_tflops": flops / (t * 1e-3) / 1e12}
                out.append(row)
                print(json.dumps(row), flush=True)
    r = SimpleNamespace(q=q, k=k, v=v, shape=q.shape)
    for bq, bk in ((128, 128), (128, 64)):
        lut = random_lut(B, H, L, bq, bk, critical, q.device)
        bm = SimpleNamespace(critical_lut=lut, num_key_blocks=triton.cdiv(L, bk), block_q=bq, block_k=bk)
        row = {"variant": f"flex-triton {bq}x{bk} (same random selection)", "BM": bq, "BN": bk,
               "n_critical": lut.shape[3]}
        try:
            f = flex_fn(r, bm, "triton")
            f()
            t = bench(f, 200)
            flops = 4.0 * B * H * lut.shape[2] * bq * lut.shape[3] * bk * D
            row.update(ms=t, effective_tflops=flops / (t * 1e-3) / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
