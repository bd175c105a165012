"""GPU benchmark of the SLA Triton kernels against SDPA (flash, cuDNN) and FlexAttention, in one process.

Usage (on a CUDA machine; see bench/gpu_check.sh, which runs the GPU tests first):

    python bench/bench_kernels.py --out bench/results_kernels.json --md bench/results_kernels.md

For each shape (B, H, L, D), bf16:

* ``sdpa-flash`` / ``sdpa-cudnn``: dense ``scaled_dot_product_attention`` pinned to one backend.
* ``flex-triton``: ``torch.compile(flex_attention)`` with a ``BlockMask`` of exactly SLA's critical blocks (the
  sparse part only, mask given, not predicted). Tried with SLA's block size first; where FlexAttention cannot
  compile that block size, the row says so and uses 128x128 blocks at the same block sparsity. (Rows before
  2026-12-01 call this provider ``flex``.)
* ``flex-flash``: the same mask through FlexAttention's FlashAttention-4 backend (``kernel_options={"BACKEND":
  "FLASH"}``; needs the ``flash-attn-4`` and ``nvidia-cutlass-dsl`` wheels, see
  ``../shared/reference/hopper-anchors.md``), at 128x128 blocks (its Hopper backward needs 128-wide key blocks).
  The kept blocks go into the full-block lists with a non-trivial ``mask_mod``: with the default no-op mask_mod the
  backend runs dense. Skipped with a note where the backend is not installed.
* ``sla``: ``sla.sparse_linear_attention(..., backend="triton")`` end to end: block classification on the GPU
  (``build_block_map_triton``), both branches and the fp32 projection.
* ``sla-pooled``, ``sla-pooled-cov``: ``sla`` with ``combine="pooled"`` (its coarse branch over the key blocks'
  means on top) and ``"pooled_cov"`` (that plus the covariance state; the default of ``apply_sla`` with token
  tiles), at 95% sparsity with the marginal scope; the breakdown profiles the pooled rule's kernels too.
* ``sla-pytorch-blockmap``: the same, with the block map from the PyTorch ``build_block_map`` (what
  ``torch.compile`` traces; target configuration only). Older results have ``sla-public-api`` rows instead: the
  public API, which used the PyTorch map before commit cf1a926 and the GPU map after it.

Times are medians of ``triton.testing.do_bench`` after a warm-up call of every provider. "TFLOPS" is
dense-equivalent: ``4*B*H*L^2*D`` per forward, 3.5x that per forward+backward, divided by the time. Peak
memory is ``torch.cuda.max_memory_allocated`` over one forward+backward, inputs included. For the target
configuration a per-stage breakdown of SLA's time is measured too.
"""

from __future__ import annotations

import argparse
import importlib
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers, also when imported
from provenance import git_commit  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1,12,32760,128;2,16,32760,128;1,40,75600,128",
                   help="';'-separated B,H,L,D shapes; the first gets the full sweep, the others the target "
                        "configuration only (default: %(default)s)")
    p.add_argument("--sparsities", default="0.90,0.95,0.97", help="block sparsities (1 - critical) for the sweep")
    p.add_argument("--negligible", type=float, default=0.10, help="negligible fraction (default: %(default)s)")
    p.add_argument("--combine", choices=("mass", "paper", "pooled", "pooled_cov"), default="mass",
                   help="SLA's combination rule in the sla rows (default: %(default)s, the default without token "
                        "tiles); at 95%% sparsity with the marginal scope the pooled rules also get rows of their own, "
                        "'sla-pooled' and 'sla-pooled-cov'")
    p.add_argument("--scopes", default="marginal,noncritical,all", help="linear scopes for the sweep")
    p.add_argument("--blocks", default="64x64,128x64", help="block configs block_qxblock_k")
    p.add_argument("--time-budget", type=float, default=330.0,
                   help="seconds; shapes after the first are skipped once this is spent (default: %(default)s)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    p.add_argument("--no-sweep", action="store_true", help="skip the num_warps/num_stages sweep")
    p.add_argument("--out", default="bench/results_kernels.json", help="JSON output path")
    p.add_argument("--md", default=None, help="also write the Markdown tables here")
    p.add_argument("--current", default="bench/results/current.json",
                   help="the compact summary rewritten at every GPU run: card, torch, commit, date and one row per "
                        "provider at the first shape, 95%% sparsity (default: %(default)s; '' to skip)")
    return p.parse_args(argv)


def bench(fn, rep_ms=200, grad_to_none=None):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none,
                                         return_mode="median"))


def peak_memory_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def dense_flops(B, H, L, D) -> float:
    return 4.0 * B * H * L * L * D


class Runner:
    def __init__(self, B, H, L, D, dtype=torch.bfloat16):
        self.shape = (B, H, L, D)
        g = torch.Generator(device="cuda").manual_seed(0)
        self.q, self.k, self.v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
                                  for _ in range(3))
        self.do = torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g)
        self.w = (0.05 * torch.randn(D, D, device="cuda", generator=g)).requires_grad_()
        self.b = (0.05 * torch.randn(D, device="cuda", generator=g)).requires_grad_()
        self.leaves = [self.q, self.k, self.v, self.w, self.b]

    def fwd_bwd(self, f):
        def step():
            f().backward(self.do)
        return step

    def time_pair(self, f, rep_fwd=200, rep_bwd=300):
        with torch.no_grad():
            f()
        self.fwd_bwd(f)()  # warm-up / compile
        t_fwd = bench(lambda: f(), rep_fwd)
        t_fb = bench(self.fwd_bwd(f), rep_bwd, grad_to_none=self.leaves)
        for x in self.leaves:
            x.grad = None
        mem = peak_memory_gb(self.fwd_bwd(f))
        for x in self.leaves:
            x.grad = None
        return t_fwd, t_fb, mem


def sdpa_fn(r, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def f():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(r.q, r.k, r.v)
    return f


_FLEX = {}


def _keep_all(b, h, q_idx, kv_idx):
    # Not the default no-op mask_mod: with that one the FLASH backend treats the mask as absent and runs dense.
    return q_idx >= 0


def flex_fn(r, block_map, backend="triton"):
    """FlexAttention over exactly ``block_map``'s critical blocks. ``backend="triton"`` is the default template (kept
    blocks as partial blocks, no mask_mod); ``"flash"`` is FlashAttention-4 (kept blocks as full blocks)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    B, H, L, _ = r.shape
    lut = block_map.critical_lut
    Tm, n = lut.shape[2], lut.shape[3]
    Tn = block_map.num_key_blocks
    kv_num = torch.full((B, H, Tm), n, dtype=torch.int32, device="cuda")
    kv_idx = torch.zeros(B, H, Tm, Tn, dtype=torch.int32, device="cuda")
    kv_idx[..., :n] = lut
    size = (block_map.block_q, block_map.block_k)
    fn = _FLEX["fn"]
    if backend == "triton":
        mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=size, seq_lengths=(L, L))
        return lambda: fn(r.q, r.k, r.v, block_mask=mask)
    mask = BlockMask.from_kv_blocks(torch.zeros_like(kv_num), torch.zeros_like(kv_idx), kv_num, kv_idx,
                                    BLOCK_SIZE=size, mask_mod=_keep_all, seq_lengths=(L, L))
    return lambda: fn(r.q, r.k, r.v, block_mask=mask, kernel_options={"BACKEND": "FLASH"})


def flash4_available() -> str | None:
    """None if FlexAttention's FLASH backend can be imported, else why not."""
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def write_current(path, meta, rows):
    """``bench/results/current.json``: one row per provider at the first shape and 95% sparsity (dense providers
    with sparsity 0.0). SLA's rows are its 64x64 ``marginal`` configuration, the default, under the rule of
    ``--combine`` and, where measured, the two pooled rules (``pooled_cov`` is the default with token tiles)."""
    picked, first = [], None
    for row in rows:
        first = first or row["shape"]
        if row["shape"] != first:
            continue
        p = row["provider"]
        dense = p.startswith("sdpa")
        if not dense and row.get("sparsity") != 0.95:
            continue
        if p.startswith("sla") and (row.get("scope") != "marginal" or (row["block_q"], row["block_k"]) != (64, 64)):
            continue
        if p not in ("sdpa-flash", "sdpa-cudnn", "flex-triton", "flex-flash", "sla", "sla-pooled", "sla-pooled-cov"):
            continue
        picked.append({"provider": p, "shape": row["shape"], "sparsity": 0.0 if dense else 0.95,
                       "blocks": "-" if dense else f"{row['block_q']}x{row['block_k']}",
                       "fwd_ms": round(row["fwd_ms"], 4), "fwdbwd_ms": round(row["fwd_bwd_ms"], 4),
                       **({"combine": row["combine"]} if "combine" in row else {})})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({"card": meta["card"], "torch": meta["torch"], "commit": meta["commit"], "date": meta["date"],
                   "rows": picked}, fh, indent=1)
    os.replace(tmp, path)


def sla_fn(r, critical, negligible, block_q, block_k, scope, pytorch_block_map=False, combine="mass"):
    """SLA end to end through ``sla.sparse_linear_attention(backend="triton")`` (GPU classification), or with
    ``pytorch_block_map`` the block map built by the PyTorch ``build_block_map`` inside the timed call."""
    import sla

    def fn():
        bm = None
        if pytorch_block_map:
            bm = sla.build_block_map(r.q.detach(), r.k.detach(), critical=critical, negligible=negligible,
                                     block_q=block_q, block_k=block_k)
        return sla.sparse_linear_attention(r.q, r.k, r.v, critical=critical, negligible=negligible, block_q=block_q,
                                           block_k=block_k, linear_scope=scope, proj_weight=r.w, proj_bias=r.b,
                                           block_map=bm, backend="triton", combine=combine)

    return fn


def sla_breakdown(r, critical, negligible, block_q, block_k, scope):
    """Per-stage times (ms) of one SLA forward and backward, each stage timed on its own."""
    from sla.ops.sla.blockmap import build_block_map
    from sla.ops.sla.triton import build_block_map_triton, launch
    from sla.ops.sla.triton.api import scope_mask_for
    from sla.ops.sla.triton.custom_ops import sla_triton_bwd

    q, k, v = (x.detach() for x in (r.q, r.k, r.v))
    out = {}
    bm = build_block_map(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    out["block_map_pytorch"] = bench(lambda: build_block_map(q, k, critical=critical, negligible=negligible,
                                                             block_q=block_q, block_k=block_k))
    out["block_map_triton"] = bench(lambda: build_block_map_triton(q, k, critical=critical, negligible=negligible,
                                                                   block_q=block_q, block_k=block_k))
    mask = scope_mask_for(bm, scope, launch.state_dtype(q.dtype))
    out["scope_mask"] = bench(lambda: scope_mask_for(bm, scope, launch.state_dtype(q.dtype)))
    out["linear_states_kernel"] = bench(lambda: launch.linear_states(k, v, block_k, "softmax"))
    hs, zs = launch.linear_states(k, v, block_k, "softmax")
    out["aggregate_M_at_h_matmul"] = bench(lambda: launch.aggregate_states(hs, zs, mask))
    w, b = r.w.detach(), r.b.detach()
    fwd_args = (q, k, v, bm.critical_lut, mask, w, b, None, None, q.shape[-1] ** -0.5, block_q, block_k,
                "softmax", "paper")
    t_fwd = bench(lambda: launch.forward(*fwd_args, False))
    out["fwd_kernel_only_inference"] = t_fwd - out["linear_states_kernel"] - out["aggregate_M_at_h_matmul"]
    t_fwd = bench(lambda: launch.forward(*fwd_args, True))
    out["fwd_kernel_only"] = t_fwd - out["linear_states_kernel"] - out["aggregate_M_at_h_matmul"]
    o, o_s, o_l, lse, a, o_c, rows, means = launch.forward(*fwd_args, True)
    do = r.do
    bwd_args = (do, q, k, v, o_s, o_l, lse, a, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t, mask, w,
                b, None, None, o_c, rows, means, q.shape[-1] ** -0.5, block_q, block_k, "softmax", "paper")
    # Until issue 16 the first key timed the kernels and M matmuls without the projection's gradient GEMM; the
    # backward's launches are one function now, so both keys include it (the second adds the custom op's dispatch).
    out["bwd_launches_with_proj_grads"] = bench(lambda: launch.backward(*bwd_args))
    out["bwd_full_op_with_proj_grads"] = bench(lambda: sla_triton_bwd(*bwd_args))
    out["per_kernel_ms_fwd_bwd"] = kernel_profile(sla_fn(r, critical, negligible, block_q, block_k, scope), r)
    out["per_kernel_ms_fwd_bwd_pooled"] = kernel_profile(sla_fn(r, critical, negligible, block_q, block_k, scope,
                                                                combine="pooled"), r)
    n_crit = bm.n_critical
    B, H, L, D = r.shape
    Tm = bm.num_query_blocks
    sparse_flops = 4.0 * B * H * Tm * block_q * n_crit * block_k * D
    out["sparse_fwd_effective_tflops"] = sparse_flops / (out["fwd_kernel_only"] * 1e-3) / 1e12
    prof = out["per_kernel_ms_fwd_bwd"]
    t_dq = sum(v for k_, v in prof.items() if "sla_bwd_dq_kernel" in k_)
    t_dkdv = sum(v for k_, v in prof.items() if "sla_bwd_dkdv_kernel" in k_)
    if t_dq + t_dkdv > 0:
        out["sparse_bwd_effective_tflops_dq_plus_dkdv"] = 2.5 * sparse_flops / ((t_dq + t_dkdv) * 1e-3) / 1e12
    return out


def launch_config_sweep(r, critical, negligible, block_q, block_k):
    """Times of the forward and backward ops under other num_warps/num_stages (for tuning
    ``launch_config.LAUNCH_TABLE``), each run inside ``launch_overrides``."""
    from sla.ops.sla.triton import build_block_map_triton, launch
    from sla.ops.sla.triton.api import scope_mask_for
    from sla.ops.sla.triton.launch_config import launch_overrides

    q, k, v = (x.detach() for x in (r.q, r.k, r.v))
    bm = build_block_map_triton(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    mask = scope_mask_for(bm, "marginal", launch.state_dtype(q.dtype))
    w, scale = r.w.detach(), q.shape[-1] ** -0.5
    fwd_args = (q, k, v, bm.critical_lut, mask, w, r.b.detach(), None, None, scale, block_q, block_k, "softmax",
                "paper", True)
    o, o_s, o_l, lse, a, o_c, rows, means = launch.forward(*fwd_args)
    bwd_args = (r.do, q, k, v, o_s, o_l, lse, a, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t, mask,
                w, r.b.detach(), None, None, o_c, rows, means, scale, block_q, block_k, "softmax", "paper")
    out = {}
    for name, fn, configs in (("fwd", lambda: launch.forward(*fwd_args), [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)]),
                              ("dkdv", lambda: launch.backward(*bwd_args), [(4, 1), (4, 2), (4, 3), (8, 2)]),
                              ("dq", lambda: launch.backward(*bwd_args), [(4, 1), (4, 3), (8, 2)]),
                              ("linear_q", lambda: launch.backward(*bwd_args), [(2, 1), (4, 1), (4, 2), (8, 1)]),
                              ("state", lambda: launch.forward(*fwd_args), [(2, 1), (4, 1), (4, 2), (8, 1)])):
        for warps, stages in configs:
            try:
                with launch_overrides({name: {"num_warps": warps, "num_stages": stages}}):
                    fn()
                    op = "fwd" if name in ("fwd", "state") else "bwd"
                    out[f"{name} warps={warps} stages={stages} (whole {op} op)"] = bench(fn)
            except Exception as exc:
                out[f"{name} warps={warps} stages={stages} failed: {type(exc).__name__}"] = float("nan")
    return out


def profile_kernels(call, iters=5, top=None):
    """Mean device time (ms) per ``call()`` of each GPU kernel it launches (torch.profiler, after one warm-up
    call), the ``top`` longest (all by default), largest first, plus ``"(sum of all kernels)"``."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None)
        if t is None:
            t = getattr(evt, "cuda_time_total", 0.0)
        if t > 0:
            times[evt.key[:90]] = t / 1e3 / iters
    out = dict(sorted(times.items(), key=lambda kv: -kv[1])[:top])
    out["(sum of all kernels)"] = sum(times.values())
    return out


def kernel_profile(fn, r, iters=5):
    """Mean device time (ms) per call of each GPU kernel in one forward+backward, from torch.profiler (18 longest)."""
    step = r.fwd_bwd(fn)

    def fresh_step():
        for x in r.leaves:  # else autograd adds each step's gradients to the last (a bf16 add kernel)
            x.grad = None
        step()

    out = profile_kernels(fresh_step, iters, top=18)
    for x in r.leaves:
        x.grad = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (triton.testing.do_bench times with CUDA events); "
              "for the CPU benchmark see bench/ (PyTorch path).", file=sys.stderr)
        return 2
    import triton

    from sla.ops.sla.blockmap import build_block_map

    t_start = time.time()
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_commit(), "dtype": "bfloat16", "negligible": args.negligible}
    print(json.dumps(meta))
    rows, breakdowns, notes = [], {}, []
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    scopes = args.scopes.split(",")
    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]

    def save():
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows, "breakdown": breakdowns, "notes": notes}, fh, indent=1)

    for i_shape, (B, H, L, D) in enumerate(shapes):
        if i_shape > 0 and time.time() - t_start > args.time_budget:
            notes.append(f"shape {(B, H, L, D)} skipped: time budget of {args.time_budget:.0f} s spent")
            print(notes[-1])
            continue
        full = i_shape == 0
        r = Runner(B, H, L, D)
        flops = dense_flops(B, H, L, D)

        def add(provider, config, t_fwd, t_fb, mem):
            row = {"shape": [B, H, L, D], "provider": provider, **config, "fwd_ms": t_fwd, "fwd_bwd_ms": t_fb,
                   "fwd_tflops": flops / (t_fwd * 1e-3) / 1e12, "fwd_bwd_tflops": 3.5 * flops / (t_fb * 1e-3) / 1e12,
                   "peak_mem_gb": mem}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()

        base = {}
        for be in ("flash", "cudnn"):
            try:
                t = r.time_pair(sdpa_fn(r, be), rep_fwd=300, rep_bwd=500)
                base[be] = t
                add(f"sdpa-{be}", {}, *t)
            except Exception as exc:  # a backend the card/torch build lacks is reported, not fatal
                notes.append(f"sdpa-{be} at {(B, H, L, D)} failed: {type(exc).__name__}: {str(exc)[:200]}")
                print(notes[-1])
        sweep = [(s, sc, bl) for s in sparsities for sc in scopes for bl in blocks] if full else \
            [(0.95, "marginal", bl) for bl in blocks]
        for sparsity, scope, (bq, bk) in sweep:
            crit = round(1.0 - sparsity, 6)
            try:
                t = r.time_pair(sla_fn(r, crit, args.negligible, bq, bk, scope, combine=args.combine))
            except Exception as exc:
                notes.append(f"sla {sparsity} {scope} {bq}x{bk} at {(B, H, L, D)} failed: {type(exc).__name__}: "
                             f"{str(exc)[:300]}")
                print(notes[-1])
                continue
            config = {"sparsity": sparsity, "critical": crit, "negligible": args.negligible, "scope": scope,
                      "block_q": bq, "block_k": bk, "combine": args.combine}
            add("sla", config, *t)
            if sparsity == 0.95 and scope == "marginal":
                t = r.time_pair(sla_fn(r, crit, args.negligible, bq, bk, scope, pytorch_block_map=True,
                                       combine=args.combine))
                add("sla-pytorch-blockmap", config, *t)
                for rule in ("pooled", "pooled_cov"):  # what the pooled rules' coarse branch costs on top
                    if args.combine != rule:
                        t = r.time_pair(sla_fn(r, crit, args.negligible, bq, bk, scope, combine=rule))
                        add("sla-" + rule.replace("_", "-"), {**config, "combine": rule}, *t)
        if full or L <= 40000:
            targets = [(0.95, (64, 64)), (0.95, (128, 64))] if full else [(0.95, (64, 64))]
            for sparsity, (bq, bk) in targets:
                key = f"{(B, H, L, D)} sparsity={sparsity} marginal {bq}x{bk}"
                try:
                    breakdowns[key] = sla_breakdown(r, round(1 - sparsity, 6), args.negligible, bq, bk, "marginal")
                except Exception as exc:
                    notes.append(f"breakdown {key} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    print(notes[-1])
                    continue
                print(key, json.dumps(breakdowns[key]), flush=True)
                save()
        if not args.no_flex:
            flex_sparsities = sparsities if full else [0.95]
            flex_block = blocks[0]
            for sparsity in flex_sparsities:
                crit = round(1.0 - sparsity, 6)
                for attempt in ([flex_block, (128, 128)] if flex_block != (128, 128) else [(128, 128)]):
                    bm = build_block_map(r.q.detach(), r.k.detach(), critical=crit, negligible=0.0,
                                         block_q=attempt[0], block_k=attempt[1])
                    try:
                        t = r.time_pair(flex_fn(r, bm))
                    except Exception as exc:
                        notes.append(f"flex {attempt[0]}x{attempt[1]} at {(B, H, L, D)} failed: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}")
                        print(notes[-1])
                        torch._dynamo.reset()
                        _FLEX.clear()
                        flex_block = (128, 128)
                        continue
                    add("flex-triton", {"sparsity": sparsity, "critical": crit, "block_q": attempt[0],
                                 "block_k": attempt[1], "n_critical_blocks": bm.n_critical}, *t)
                    break
            why = flash4_available()
            if why is not None:
                notes.append(f"flex-flash skipped: FlashAttention-4 is not importable ({why})")
                print(notes[-1])
            else:
                for sparsity in flex_sparsities:
                    crit = round(1.0 - sparsity, 6)
                    bm = build_block_map(r.q.detach(), r.k.detach(), critical=crit, negligible=0.0, block_q=128,
                                         block_k=128)
                    try:
                        t = r.time_pair(flex_fn(r, bm, backend="flash"))
                    except Exception as exc:
                        notes.append(f"flex-flash 128x128 at {(B, H, L, D)} failed: {type(exc).__name__}: "
                                     f"{str(exc)[:300]}")
                        print(notes[-1])
                        break
                    add("flex-flash", {"sparsity": sparsity, "critical": crit, "block_q": 128, "block_k": 128,
                                       "n_critical_blocks": bm.n_critical}, *t)
        if full and not args.no_sweep:
            for bq, bk in blocks:
                key = f"launch-config sweep {(B, H, L, D)} sparsity=0.95 marginal {bq}x{bk} (ms)"
                try:
                    breakdowns[key] = launch_config_sweep(r, 0.05, args.negligible, bq, bk)
                except Exception as exc:
                    notes.append(f"{key} failed: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                print(key, json.dumps(breakdowns[key]), flush=True)
                save()
        if "flash" in base:
            for row in rows:
                if row["shape"] == [B, H, L, D]:
                    row["speedup_fwd_vs_flash"] = base["flash"][0] / row["fwd_ms"]
                    row["speedup_fwd_bwd_vs_flash"] = base["flash"][1] / row["fwd_bwd_ms"]
        save()
        del r
        torch.cuda.empty_cache()

    md = to_markdown(meta, rows, breakdowns, notes)
    print(md)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md)
    save()
    if args.current:
        write_current(args.current, meta, rows)
        print(f"wrote {args.current}")
    return 0


def to_markdown(meta, rows, breakdowns, notes) -> str:
    lines = [f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}; {meta['date']}; commit "
             f"{meta['commit']}; {meta['dtype']}; negligible={meta['negligible']}.", ""]
    lines.append("| shape (B,H,L,D) | provider | sparsity | scope | blocks | fwd ms | fwd+bwd ms | fwd TFLOPS | "
                 "fwd+bwd TFLOPS | fwd x flash | fwd+bwd x flash | peak GB |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        blocks = f"{r['block_q']}x{r['block_k']}" if "block_q" in r else "-"
        lines.append(
            f"| {tuple(r['shape'])} | {r['provider']} | {r.get('sparsity', '-')} | {r.get('scope', '-')} | {blocks} | "
            f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_tflops']:.0f} | "
            f"{r.get('speedup_fwd_vs_flash', float('nan')):.1f} | "
            f"{r.get('speedup_fwd_bwd_vs_flash', float('nan')):.1f} | "
            f"{r['peak_mem_gb']:.2f} |")
    for key, bd in breakdowns.items():
        lines += ["", f"Breakdown, {key} (ms unless named):", ""]
        for k, v in bd.items():
            if isinstance(v, dict):
                lines.append(f"- {k}:")
                lines += [f"  - `{name}`: {t:.3f}" for name, t in v.items()]
            else:
                lines.append(f"- {k}: {v:.3f}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
