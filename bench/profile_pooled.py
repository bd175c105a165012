"""Where ``combine="pooled"``'s time goes on a GPU, against ``combine="mass"``, in one process (``--rules`` adds
``"pooled_cov"``).

    python bench/profile_pooled.py --out bench/results_profile_pooled.json

For one shape (default (1, 12, 32760, 128) bf16, critical 0.05, negligible 0.10, marginal scope) and each block
config, it reports:

* ``op``: the whole op (``sla.sparse_linear_attention(backend="triton")``) for both rules: forward with gradients
  on (what training runs), forward under ``no_grad`` and forward+backward, medians of ``triton.testing.do_bench``;
* ``kernels_fwd`` / ``kernels_fwd_bwd``: device time per kernel (torch.profiler, mean of 5 calls) of one forward
  with gradients on and of one forward+backward, for both rules, so that a difference can be put on a kernel;
* ``main_fwd_kernel``: the forward launches alone (``launch.forward``) for both rules, with and without what
  backward keeps;
* ``coarse_sweep``: the coarse kernels alone under other ``num_warps``/``num_stages``, chunk widths
  (``launch.COARSE_CHUNK``) and dK/dV split targets (``launch.COARSE_DKDV_PROGRAMS``), for tuning the launch
  table; every variant's outputs are compared with the default's first.

It needs a CUDA GPU; nothing here runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import Runner, bench, kernel_profile, profile_kernels, sla_fn  # noqa: E402
from provenance import git_commit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: %(default)s)")
    p.add_argument("--blocks", default="64x64,128x64", help="block configs block_qxblock_k (default: %(default)s)")
    p.add_argument("--no-sweep", action="store_true", help="skip the coarse kernels' launch sweep")
    p.add_argument("--rules", default="mass,pooled", help="combine= rules to profile side by side (default: "
                   "%(default)s; add pooled_cov for the covariance rule)")
    p.add_argument("--out", default="bench/results_profile_pooled.json", help="JSON output path")
    return p.parse_args(argv)


def coarse_setup(r, block_map, scope="marginal"):
    """A forward and a backward of the coarse kernels alone, on inputs formed as the fused forward forms them."""
    from sla.ops.sla.blockmap import block_lengths
    from sla.ops.sla.triton import launch
    from sla.ops.sla.triton.api import coarse_codes

    q, k, v = (x.detach() for x in (r.q, r.k, r.v))
    bq, bk = block_map.block_q, block_map.block_k
    lengths = block_lengths(k.shape[2], bk, k.device).to(torch.float32)
    km, vm = launch.block_means(k, bk, lengths), launch.block_means(v, bk, lengths)
    codes = coarse_codes(block_map, scope)
    scale = q.shape[-1] ** -0.5
    o_c = torch.empty_like(q)
    rows = q.new_empty(2, *q.shape[:3], dtype=torch.float32)

    def fwd():
        launch.coarse_forward(q, km, vm, torch.log2(lengths), codes, scale, bq, o_c, rows, True)
        return o_c, rows

    fwd()
    g = torch.randn_like(rows[0])
    dq = torch.zeros_like(q)

    def bwd():
        dq.zero_()
        d_means = launch.coarse_backward(r.do, g, q, km, vm, codes, o_c, rows, dq, scale, bq, lengths)
        return dq, d_means

    return fwd, bwd


def coarse_sweep(r, block_map):
    """Times (ms) of the coarse kernels under other launch settings, chunk widths and split targets."""
    from sla.ops.sla.triton import launch
    from sla.ops.sla.triton.launch_config import launch_overrides

    fwd, bwd = coarse_setup(r, block_map)
    ref_f = [x.clone() for x in fwd()]
    ref_b = [x.clone() for x in bwd()]

    def same(a, b):
        return all(torch.allclose(x.float(), y.float(), rtol=2e-2, atol=2e-2, equal_nan=True) for x, y in zip(a, b))

    out = {}
    variants = []
    for warps, stages in [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)]:
        for name, fn in (("coarse_fwd", fwd), ("coarse_dq", bwd), ("coarse_dkdv", bwd)):
            variants.append((f"{name} warps={warps} stages={stages}", fn,
                             {name: {"num_warps": warps, "num_stages": stages}}, None, None))
    for chunk in (32, 64, 128):
        variants.append((f"chunk={chunk} fwd", fwd, {}, chunk, None))
        variants.append((f"chunk={chunk} bwd", bwd, {}, chunk, None))
    for programs in (512, 2048, 4096):
        variants.append((f"dkdv programs={programs} bwd", bwd, {}, None, programs))
    chunk0, wide0, programs0 = launch.COARSE_CHUNK, launch.COARSE_CHUNK_BWD_WIDE, launch.COARSE_DKDV_PROGRAMS
    out["default fwd"] = bench(fwd)
    out["default bwd"] = bench(bwd)
    for label, fn, over, chunk, programs in variants:
        try:
            launch.COARSE_CHUNK, launch.COARSE_CHUNK_BWD_WIDE = chunk or chunk0, chunk or wide0
            launch.COARSE_DKDV_PROGRAMS = programs or programs0
            with launch_overrides(over):
                ok = same(fn(), ref_f if fn is fwd else ref_b)
                out[label] = bench(fn) if ok else "wrong outputs"
        except Exception as exc:
            out[label] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            launch.COARSE_CHUNK, launch.COARSE_CHUNK_BWD_WIDE, launch.COARSE_DKDV_PROGRAMS = chunk0, wide0, programs0
        print(label, out[label], flush=True)
    return out


def main_kernel_times(r, block_map, rules=("mass", "pooled")):
    """The forward launches (``launch.forward``) for both rules, training and inference: the pooled rule's include
    its means and coarse kernel, so the difference minus ``coarse_sweep``'s "default fwd" is what ``POOLED`` costs
    inside the main kernel."""
    from sla.ops.sla.triton import launch
    from sla.ops.sla.triton.api import coarse_codes, scope_mask_for

    q, k, v = (x.detach() for x in (r.q, r.k, r.v))
    scale = q.shape[-1] ** -0.5
    mask = scope_mask_for(block_map, "marginal", launch.state_dtype(q.dtype))
    off = torch.zeros(q.shape[1], device=q.device)
    codes = coarse_codes(block_map, "marginal")
    w, b = r.w.detach(), r.b.detach()
    out = {}
    for aux in (True, False):
        for combine in rules:
            out[f"{combine} store_aux={aux}"] = bench(lambda: launch.forward(
                q, k, v, block_map.critical_lut, mask, w, b, off, codes if combine != "mass" else None, scale,
                block_map.block_q, block_map.block_k, "softmax", combine, aux))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/profile_pooled.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from sla.ops.sla.triton import build_block_map_triton

    B, H, L, D = (int(x) for x in args.shape.split(","))
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(), "shape": [B, H, L, D], "configs": {}}
    r = Runner(B, H, L, D)
    for blocks in args.blocks.split(","):
        bq, bk = (int(x) for x in blocks.split("x"))
        entry = res["configs"][blocks] = {}
        fns = {c: sla_fn(r, 0.05, 0.10, bq, bk, "marginal", combine=c) for c in args.rules.split(",")}
        op = entry["op"] = {}
        for c, fn in fns.items():
            fn()
            op[f"{c} fwd (grad on)"] = bench(fn)
            with torch.no_grad():
                op[f"{c} fwd (no_grad)"] = bench(fn)
            op[f"{c} fwd+bwd"] = bench(r.fwd_bwd(fn), 300, grad_to_none=r.leaves)
            for x in r.leaves:
                x.grad = None
        print(blocks, json.dumps(op), flush=True)
        # One forward with gradients on (the graph is dropped after each call).
        entry["kernels_fwd"] = {c: profile_kernels(fn) for c, fn in fns.items()}
        entry["kernels_fwd_bwd"] = {c: kernel_profile(fn, r) for c, fn in fns.items()}
        bm = build_block_map_triton(r.q.detach(), r.k.detach(), critical=0.05, negligible=0.10, block_q=bq,
                                    block_k=bk)
        entry["main_fwd_kernel"] = main_kernel_times(r, bm, list(fns))
        print(blocks, json.dumps(entry["main_fwd_kernel"]), flush=True)
        if not args.no_sweep:
            entry["coarse_sweep"] = coarse_sweep(r, bm)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
