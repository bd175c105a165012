"""How much of ``combine="pooled_cov"``'s benefit survives if the covariance correction uses only each query block's
r highest-weight key blocks (a cheaper rule: ``T_m x r x D^2`` state work instead of ``T_m x T_n x D^2``).

Screening on real activations, before any such rule is built or trained: the shipped GPU-fine-tuned wan8k SLA model
(``sla/assets/wan8k_finetuned/sla_pooled_cov``) runs on held-out clips; at every SLA layer the hook takes the layer's
q, k, v and runs the layer again on the PyTorch path with the correction's ``G_i = sum_j pbar_ij C_j`` restricted to
the r largest ``pbar_ij`` of each query block (r = all, 32, 16, 8, 4; r = 0 is the pooled rule, no correction),
everything else (block map, o_c, a, Proj, mass offsets) as trained. Reported per layer: the relative L2 error of
the layer's output against dense attention on the same q, k, v, and the share of ``sum_j pbar_ij`` the kept
blocks hold. Zero-shot: a model trained with the restricted rule could do better.

    python bench/restricted_cov.py --out bench/results_restricted_cov_cpu.json     # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from sla.ops.sla import naive  # noqa: E402

RANKS = (None, 32, 16, 8, 4, 0)  # None: every key block (the shipped rule); 0: no correction (the pooled rule)
CORRECTION = naive.covariance_correction  # the rule itself, before the hook below swaps the module's name


def restricted_correction(r):
    """A drop-in for :func:`sla.ops.sla.naive.covariance_correction` that keeps each query block's ``r`` largest
    block weights (``None``: all), and records the share of the weights they hold."""
    shares = []

    def correction(q, k, v, k_means, p, block_q, block_k, scale):
        if r is not None:
            pbar = naive.mean_pool_blocks(p, block_q)  # (B, H, T_m, T_n): the weights of G_i
            kept = torch.zeros_like(pbar).scatter(-1, pbar.topk(min(r, pbar.shape[-1]), dim=-1).indices, 1.0) * pbar
            shares.append(float(kept.sum() / pbar.sum().clamp_min(1e-30)))
            # Every row carries its block's kept weights, so the rule's own mean over the block gives them back.
            p = kept.repeat_interleave(block_q, dim=-2)[..., :q.shape[-2], :]
        return CORRECTION(q, k, v, k_means, p, block_q, block_k, scale)

    return correction, shares


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--clips", type=int, default=1, help="held-out clips (default: 1)")
    p.add_argument("--sigmas", default="0.2,0.5,0.8", help="noise levels (default: 0.2,0.5,0.8)")
    args = p.parse_args(argv)

    import torch.nn.functional as F

    from sla.data.synthetic import SyntheticVideoDataset, collate
    from sla.eval.evaluate import EVAL_NOISE_SEED
    from sla.models.small_wan import shipped_finetuned_path
    from sla.training.checkpoint import load_finetuned, synthetic_data_config
    from sla.training.flow_matching import draw_noise_and_sigma, flow_matching_loss

    torch.manual_seed(0)
    model, info = load_finetuned(shipped_finetuned_path("sla_pooled_cov", "wan8k"))
    model.eval()
    data = synthetic_data_config("wan8k", model)
    batch = collate([SyntheticVideoDataset("val", size=args.clips, config=data)[i] for i in range(args.clips)])
    rows, busy = [], [False]
    original = naive.covariance_correction

    def make_hook(name):
        def hook(module, inputs, output):
            if busy[0]:
                return
            busy[0] = True
            try:
                q, k, v = (x.float() for x in inputs[:3])
                dense = F.scaled_dot_product_attention(q, k, v)
                row = {"layer": name, "sigma": sigma}
                for r in RANKS:
                    correction, shares = restricted_correction(r)
                    naive.covariance_correction = correction
                    try:
                        out = module(*inputs)
                    finally:
                        naive.covariance_correction = original
                    out = out[0] if isinstance(out, tuple) else out
                    key = "all" if r is None else str(r)
                    row[f"err_{key}"] = float((out.float() - dense).norm() / dense.norm())
                    if shares:
                        row[f"share_{key}"] = sum(shares) / len(shares)
                rows.append(row)
            finally:
                busy[0] = False
        return hook

    hooks = [m.register_forward_hook(make_hook(n[:-4])) for n, m in model.named_modules() if n.endswith(".sla")]
    for module in (m for n, m in model.named_modules() if n.endswith(".sla")):
        module.backend = "torch"
    t0 = time.time()
    try:
        with torch.no_grad():
            for sigma in (float(s) for s in args.sigmas.split(",")):
                x0, te = batch["video"], batch["text_embeds"]
                noise = torch.stack([draw_noise_and_sigma(tuple(x0.shape[1:]), (EVAL_NOISE_SEED, int(i), 0),
                                                          sigma=sigma)[0] for i in batch["index"]])
                flow_matching_loss(model, x0, noise, torch.full((x0.shape[0],), sigma), te)
    finally:
        for h in hooks:
            h.remove()
    keys = ["all" if r is None else str(r) for r in RANKS]
    summary = {k: sum(r[f"err_{k}"] for r in rows) / len(rows) for k in keys}
    result = dict(model="wan8k_finetuned/sla_pooled_cov", sla=info["sla"], clips=args.clips, sigmas=args.sigmas,
                  ranks=keys, mean_rel_error_vs_dense=summary, rows=rows, torch=torch.__version__,
                  seconds=round(time.time() - t0, 1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("r (kept key blocks of 128) | mean rel. error vs dense over layers and sigmas")
    for k in keys:
        print(f"{k:>4} | {summary[k]:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
