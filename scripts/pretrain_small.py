"""Pretrain the built-in small Wan transformer with FULL attention on the synthetic video set.

Rectified-flow (flow-matching) objective as Wan: ``x_t = (1 - s) x0 + s noise``, predict ``noise - x0``.
AdamW, linear warm-up then cosine decay over a wall-clock budget, bf16 autocast on CUDA, EMA of the
weights (the EMA is what gets shipped). Writes, into ``--out`` (a ``save_pretrained`` folder):
``config.json``, ``diffusion_pytorch_model.safetensors`` (EMA weights, float32), ``training_log.csv`` and
``pretrain_info.json`` (settings, steps, clips seen, held-out loss, device, wall time).

The shipped checkpoint (sla/assets/small_wan) came from this command on one NVIDIA H200 (270 s, 4,644
steps of 32 clips, bf16 autocast; its training_log.csv and pretrain_info.json are beside it):

    python scripts/pretrain_small.py --seconds 270 --batch-size 32 --lr 8e-4 --workers 11 --out sla/assets/small_wan

On a CPU pass ``--device cpu`` and a smaller ``--batch-size`` (much slower; not how the shipped one was made).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import time

import torch


def lr_at(progress: float, step: int, base_lr: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model, device, n: int = 64, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9), autocast: bool = False) -> float:
    from sla.data.synthetic import SyntheticVideoDataset, collate
    from sla.training.flow_matching import draw_noise_and_sigma, flow_matching_loss

    val = SyntheticVideoDataset("val", size=n)
    total = 0.0
    for start in range(0, n, 16):
        b = collate([val[i] for i in range(start, min(n, start + 16))])
        x0, te = b["video"].to(device), b["text_embeds"].to(device)
        for s in sigmas:
            pairs = [draw_noise_and_sigma(tuple(x0.shape[1:]), (1234, int(i), int(s * 1000)), sigma=s)
                     for i in b["index"]]
            noise = torch.stack([p[0] for p in pairs]).to(device)
            sig = torch.stack([p[1] for p in pairs]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                total += flow_matching_loss(model, x0, noise, sig, te, reduction="none").sum().item()
    return total / (n * len(sigmas))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    ap.add_argument("--eval-clips", type=int, default=64)
    ap.add_argument("--out", default="sla/assets/small_wan")
    args = ap.parse_args()

    from sla.data.synthetic import SyntheticVideoDataset, collate
    from sla.models.small_wan import SMALL_WAN_CONFIG, build_small_model
    from sla.training.flow_matching import noisy_input_and_target, predict, sample_sigmas

    device = torch.device(args.device)
    autocast = device.type == "cuda" and not args.no_bf16
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_small_model(seed=args.seed).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)

    train = SyntheticVideoDataset("train", size=100_000_000)
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=10_000_000,
                                             generator=torch.Generator().manual_seed(args.seed))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "training_log.csv")
    log_f = open(log_path, "w", newline="")
    log = csv.writer(log_f)
    log.writerow(["step", "seconds", "clips_seen", "loss", "lr", "steps_per_s"])
    t0 = time.time()
    step, running, window_t, window_steps = 0, 0.0, time.time(), 0
    for batch in loader:
        elapsed = time.time() - t0
        if elapsed > args.seconds or (args.max_steps is not None and step >= args.max_steps):
            break
        x0 = batch["video"].to(device, non_blocking=True)
        te = batch["text_embeds"].to(device, non_blocking=True)
        u = torch.randn(x0.shape[0], device=device)
        sigma = sample_sigmas(u, "logit_normal").clamp(1e-4, 1.0)
        noise = torch.randn_like(x0)
        x_t, target = noisy_input_and_target(x0, noise, sigma)
        lr = lr_at(elapsed / args.seconds, step, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = predict(model, x_t, sigma, te)
        loss = (pred.float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        window_steps += 1
        running += loss.item() if step % 10 == 0 else 0.0
        if step % 50 == 0:
            rate = window_steps / (time.time() - window_t)
            log.writerow([step, f"{time.time() - t0:.1f}", step * args.batch_size, f"{loss.item():.5f}", f"{lr:.3e}",
                          f"{rate:.2f}"])
            log_f.flush()
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {rate:.2f} it/s {time.time() - t0:.0f}s", flush=True)
            window_t, window_steps = time.time(), 0
    train_seconds = time.time() - t0
    log_f.close()
    ema_loss = heldout_loss(ema, device, n=args.eval_clips, autocast=False)
    raw_loss = heldout_loss(model.eval(), device, n=args.eval_clips, autocast=False)
    print(f"held-out flow-matching loss: ema {ema_loss:.5f} raw {raw_loss:.5f}", flush=True)
    ship = ema if ema_loss <= raw_loss else model
    ship.to("cpu", torch.float32).save_pretrained(args.out, safe_serialization=True)
    info = dict(
        script="scripts/pretrain_small.py", args=vars(args), steps=step, clips_seen=step * args.batch_size,
        train_seconds=round(train_seconds, 1), shipped="ema" if ship is ema else "raw",
        heldout_loss_ema=ema_loss, heldout_loss_raw=raw_loss, heldout_sigmas=[0.1, 0.3, 0.5, 0.7, 0.9],
        heldout_clips=args.eval_clips, model_config={k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in SMALL_WAN_CONFIG.items()},
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, bf16_autocast=autocast,
    )
    with open(os.path.join(args.out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
