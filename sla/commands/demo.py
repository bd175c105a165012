"""``sla demo``: SLA against dense attention on generated video-like inputs, with a readable table.

The inputs imitate a video DiT's self-attention: tokens sit on a (frames, height, width) grid and q, k
carry a smooth positional code, so each query attends mostly to nearby tokens plus a diffuse tail,
which is the skewed distribution the paper measures in Wan2.1 (its Fig. 1). For several values of
``critical`` the demo reports, against dense softmax attention:

* the relative L1 error of sparse-only attention (the paper's rule with its zero-initialised projection);
* the relative L1 error of SLA with the library's default rule (``combine="mass"``) as a freshly built
  :class:`~sla.SparseLinearAttention` computes it: identity projection, zero offsets, no training;
* the relative L1 error of SLA with the paper's rule and a projection fitted by least squares on the even query
  blocks and evaluated on the odd ones (a stand-in for what fine-tuning learns; held out, so honest);
* forward time of SLA's CPU path (block prediction included) next to PyTorch's dense SDPA.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._argtypes import fraction, positive_int

    p.add_argument("--grid", type=positive_int, nargs=3, default=[8, 32, 32], metavar=("F", "H", "W"),
                   help="token grid (frames, height, width); L = F*H*W")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--head-dim", type=positive_int, default=64, help="D of q, k, v")
    p.add_argument("--critical", type=fraction, nargs="+", default=[0.05, 0.10, 0.20],
                   help="fractions of key blocks computed exactly, one table row each")
    p.add_argument("--negligible", type=fraction, default=0.10,
                   help="fraction of key blocks skipped (must leave room: critical + negligible <= 1)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per method (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.epilog = "examples:\n  sla demo\n  sla demo --grid 16 32 32 --critical 0.03 0.05 --repeats 5"

    p.add_argument("--out", default="out/demo", help="folder for report.md and results.json")


def video_like_qkv(grid, heads, head_dim, seed=0, dtype=None):
    """q, k, v ``(1, heads, F*H*W, head_dim)`` with locality-dominated attention (see module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    F_, H_, W_ = grid
    pos = torch.stack(torch.meshgrid(torch.arange(F_), torch.arange(H_), torch.arange(W_), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).float() / torch.tensor([max(F_, 1), max(H_, 1), max(W_, 1)]).float()
    n_freq = head_dim // 2
    qs, ks, vs = [], [], []
    for _ in range(heads):
        freqs = torch.randn(3, n_freq, generator=g) * 6.0  # per-head spatial frequencies
        code = torch.cat([torch.sin(pos @ freqs), torch.cos(pos @ freqs)], dim=-1)  # (L, D)
        sharp = 1.0 + 0.6 * torch.rand(1, generator=g)  # how peaked this head's attention is
        qs.append(code * sharp + 0.3 * torch.randn(code.shape, generator=g))
        ks.append(code * sharp + 0.3 * torch.randn(code.shape, generator=g))
        vs.append(torch.randn(code.shape, generator=g))
    q, k, v = (torch.stack(t)[None] for t in (qs, ks, vs))
    return (q, k, v) if dtype is None else (q.to(dtype), k.to(dtype), v.to(dtype))


def _rel_l1(a, b):
    return float((a - b).abs().sum() / b.abs().sum())


def run(args) -> int:
    import json
    import os

    from sla._paths import prepare_output_dir

    prepare_output_dir(args.out, "--out")  # before the timings

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from sla._timing import time_interleaved
    from sla.ops.sla import build_block_map, naive_sparse_linear_attention, sparse_linear_attention

    for crit in args.critical:
        if crit + args.negligible > 1:
            raise ValueError(f"--critical {crit} + --negligible {args.negligible} = {crit + args.negligible:g} > 1; "
                             f"lower --critical or --negligible so that each pair sums to at most 1")
    q, k, v = video_like_qkv(args.grid, args.heads, args.head_dim, args.seed)
    L, D = q.shape[2], q.shape[3]
    print(f"SLA demo: {args.heads} heads, L={L} tokens (grid {tuple(args.grid)}), D={D}, float32, "
          f"{torch.get_num_threads()} CPU threads")
    with torch.no_grad():
        dense = F.scaled_dot_product_attention(q, k, v)
        rows, timed = [], {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}
        fit = (torch.arange(L) // 64) % 2 == 0  # query blocks used to fit Proj; the others are held out
        held = ~fit
        for crit in tqdm(args.critical, desc="sparsity levels", unit="level"):
            negl = args.negligible
            bm = build_block_map(q, k, critical=crit, negligible=negl)
            # The branches from the PyTorch path with the paper's rule (o_s + Proj(o_l)): a zero projection gives
            # o_s, the identity o_s + o_l. (The mass rule mixes them with a weight, so it cannot split them.)
            zeros_w, zeros_b = torch.zeros(D, D), torch.zeros(D)
            o_s = sparse_linear_attention(q, k, v, block_map=bm, proj_weight=zeros_w, proj_bias=zeros_b,
                                          combine="paper")
            o_l = sparse_linear_attention(q, k, v, block_map=bm, combine="paper") - o_s
            # Least-squares Proj (shared by heads, as in SLA) fitted on the even query blocks only.
            x = torch.cat([o_l[..., fit, :].reshape(-1, D), torch.ones(args.heads * int(fit.sum()), 1)], dim=1)
            y = (dense - o_s)[..., fit, :].reshape(-1, D)
            sol = torch.linalg.lstsq(x.double(), y.double()).solution.float()
            w_fit, b_fit = sol[:D].T.contiguous(), sol[D]
            o_sla = sparse_linear_attention(q, k, v, block_map=bm, proj_weight=w_fit, proj_bias=b_fit,
                                            combine="paper")
            o_mass = sparse_linear_attention(q, k, v, block_map=bm, proj_weight=torch.eye(D), combine="mass")
            # Default arguments bind this level's values (a closure would see the last level's).
            timed[f"SLA critical={crit}"] = (lambda c=crit, w=w_fit, b=b_fit: sparse_linear_attention(
                q, k, v, critical=c, negligible=negl, proj_weight=w, proj_bias=b, combine="paper"))
            rows.append({
                "critical": crit, "negligible": negl, "sparsity": bm.sparsity(),
                "sparse_only_rel_l1": _rel_l1(o_s[..., held, :], dense[..., held, :]),
                "sla_mass_untrained_rel_l1": _rel_l1(o_mass[..., held, :], dense[..., held, :]),
                "sla_fitted_proj_rel_l1": _rel_l1(o_sla[..., held, :], dense[..., held, :]),
            })
        # Every method in each repeat, in rotating order (sla/_timing.py): load during the timing hits dense
        # SDPA and every SLA level alike, and the result says whether the machine was busy.
        timing = time_interleaved(timed, args.repeats, threads=torch.get_num_threads())
        dense_ms = timing.median("SDPA") * 1e3
        for r in rows:
            r["sla_ms"] = timing.median(f"SLA critical={r['critical']}") * 1e3
            r["sdpa_ms"], r["speedup"] = dense_ms, dense_ms / r["sla_ms"]
        if L <= 8192:  # the dense reference check is O(L^2) memory
            ref = naive_sparse_linear_attention(q, k, v, bm, proj_weight=w_fit, proj_bias=b_fit, combine="paper")
            agree = float((ref - o_sla).abs().max())
        else:
            agree = None

    header = ("| critical | negligible | sparsity | sparse-only rel. L1 | SLA mass rule, untrained, rel. L1 "
              "| SLA paper rule, fitted Proj, rel. L1 | SLA ms | SDPA ms | speedup |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['critical']:.2f} | {r['negligible']:.2f} | {r['sparsity']:.3f} | "
                     f"{r['sparse_only_rel_l1']:.3f} | {r['sla_mass_untrained_rel_l1']:.3f} | "
                     f"{r['sla_fitted_proj_rel_l1']:.3f} | {r['sla_ms']:.1f} | {r['sdpa_ms']:.1f} | "
                     f"{r['speedup']:.1f}x |")
    table = "\n".join(lines)
    warning = timing.warning_text()
    print()
    print(table)
    if warning:
        print(f"\nwarning: {warning}")
    if agree is not None:
        print(f"\nPyTorch path vs dense reference (last row), max abs difference: {agree:.2e}")
    meta = {"heads": args.heads, "seq_len": L, "head_dim": D, "grid": list(args.grid), "seed": args.seed,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "reference_max_abs_diff": agree,
            "timing": dict(timing.to_dict(), interleaved=True, warning=warning)}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("# SLA demo\n\n"
                f"Generated video-like attention inputs: {args.heads} heads, L = {L} tokens on a "
                f"{'x'.join(map(str, args.grid))} grid, D = {D}, float32, CPU with {torch.get_num_threads()} threads, "
                f"torch {torch.__version__}.\n\n"
                "Errors are relative L1 against dense softmax attention, measured on the odd query blocks "
                "(64 tokens each). Sparse-only is the critical blocks alone; the mass rule (the library's default) "
                "is shown as an untrained module computes it (identity Proj, zero offsets); the paper's rule gets a "
                "least-squares Proj fitted on the even blocks (what fine-tuning learns is not this fit, but it "
                "shows what the linear branch can carry). Times are medians of "
                f"{args.repeats} runs of the paper rule, SLA's block prediction included; SDPA and SLA runs "
                "alternate, so that machine load hits both alike.\n\n" + table + "\n"
                + (f"\n**Warning:** {warning}\n" if warning else ""))
    print(f"\nwrote {args.out}/report.md and {args.out}/results.json")
    return 0
