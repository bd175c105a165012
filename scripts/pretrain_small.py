"""Pretrain a built-in Wan transformer with FULL attention on the synthetic video set.

``--preset wan8k`` (default) builds the 8,192-token testbed (sla/assets/wan8k), ``--preset small`` the first
4,096-token one (sla/assets/small_wan); ``--model-overrides`` / ``--data-overrides`` (JSON) vary either for
experiments. ``--gate`` then measures the premise SLA needs on the trained model (``sla analyze``'s gate: the
pooled critical blocks at critical=0.05 hold >= 60% of the attention mass in >= 75% of the captured
(layer, step) pairs, with <= 15% of weights above 1/N) and writes it to ``OUT_analysis``.

Rectified-flow (flow-matching) objective as Wan: ``x_t = (1 - s) x0 + s noise``, predict ``noise - x0``.
AdamW, linear warm-up then cosine decay over a wall-clock budget, bf16 autocast on CUDA, EMA of the
weights (the EMA is what gets shipped). Writes, into ``--out`` (a ``save_pretrained`` folder):
``config.json``, ``diffusion_pytorch_model.safetensors`` (EMA weights, float32), ``training_log.csv`` and
``pretrain_info.json`` (settings, steps, clips seen, held-out loss, device, wall time).

The first testbed (sla/assets/small_wan) came from this command on one NVIDIA H200 (270 s, 4,644 steps of 32
clips, bf16 autocast; its training_log.csv and pretrain_info.json are beside it):

    python scripts/pretrain_small.py --preset small --seconds 270 --batch-size 32 --lr 8e-4 --workers 11 \
        --out sla/assets/small_wan

The wan8k testbed's command is in its pretrain_info.json.

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
def heldout_loss(model, device, data_config, n: int = 64, sigmas=(0.1, 0.3, 0.5, 0.7, 0.9),
                 autocast: bool = False) -> float:
    from sla.data.synthetic import SyntheticVideoDataset, collate
    from sla.training.flow_matching import draw_noise_and_sigma, flow_matching_loss

    val = SyntheticVideoDataset("val", size=n, config=data_config)
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
    ap.add_argument("--preset", default="wan8k", choices=["wan8k", "small"],
                    help="architecture and data of a built-in model (sla/models/small_wan.py)")
    ap.add_argument("--model-overrides", default="{}", help="JSON dict of model config entries to change")
    ap.add_argument("--data-overrides", default="{}", help="JSON dict of SyntheticVideoConfig fields to change")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the saved weights (bfloat16 halves the file; loading casts to float32)")
    ap.add_argument("--gate", action="store_true", help="measure the premise gate on the trained model")
    ap.add_argument("--gate-steps", type=int, default=10, help="denoising steps of the gate's analysis")
    ap.add_argument("--out", default="sla/assets/wan8k")
    args = ap.parse_args()

    from sla.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset, collate
    from sla.models.small_wan import build_small_model, embedded_model, write_data_config
    from sla.training.flow_matching import noisy_input_and_target, predict, sample_sigmas

    preset = embedded_model(args.preset)
    model_config = {**preset.config, **json.loads(args.model_overrides)}
    data_config = SyntheticVideoConfig(**{**preset.data, **json.loads(args.data_overrides),
                                          "text_dim": model_config["text_dim"]})
    device = torch.device(args.device)
    autocast = device.type == "cuda" and not args.no_bf16
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_small_model(seed=args.seed, base=model_config).to(device).train()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; data {data_config}", flush=True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)

    train = SyntheticVideoDataset("train", size=100_000_000, config=data_config)
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
    ema_loss = heldout_loss(ema, device, data_config, n=args.eval_clips, autocast=False)
    raw_loss = heldout_loss(model.eval(), device, data_config, n=args.eval_clips, autocast=False)
    print(f"held-out flow-matching loss: ema {ema_loss:.5f} raw {raw_loss:.5f}", flush=True)
    ship = ema if ema_loss <= raw_loss else model
    ship.to("cpu", getattr(torch, args.save_dtype)).save_pretrained(args.out, safe_serialization=True)
    write_data_config(args.out, data_config)
    saved_loss = None
    if args.save_dtype != "float32":  # the shipped (rounded) weights are what users get: measure them too
        from sla.models.small_wan import load_small_model

        saved_loss = heldout_loss(load_small_model(args.out).to(device).eval(), device, data_config,
                                  n=args.eval_clips, autocast=False)
        print(f"held-out loss of the saved {args.save_dtype} weights: {saved_loss:.5f}", flush=True)
    info = dict(
        script="scripts/pretrain_small.py", args=vars(args), steps=step, clips_seen=step * args.batch_size,
        train_seconds=round(train_seconds, 1), shipped="ema" if ship is ema else "raw",
        heldout_loss_ema=ema_loss, heldout_loss_raw=raw_loss, heldout_loss_saved=saved_loss,
        save_dtype=args.save_dtype, heldout_sigmas=[0.1, 0.3, 0.5, 0.7, 0.9],
        heldout_clips=args.eval_clips, model_config={k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in model_config.items()},
        data_config=data_config.to_dict(),
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, bf16_autocast=autocast,
    )
    if args.gate:
        info["premise_gate"] = run_gate(args.out, device, data_config, args.gate_steps)
    with open(os.path.join(args.out, "pretrain_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "premise_gate"}, indent=2), flush=True)
    return 0


def run_gate(folder: str, device: torch.device, data_config, num_steps: int, token_tile=None,
             query_blocks: int = 8) -> dict:
    """``sla analyze`` on the saved model: every layer, every step of a ``num_steps`` Euler run, all heads
    (``token_tile``: blocks over 3D token tiles, as ``apply_sla(token_tile=...)``)."""
    from sla.analysis import AnalysisConfig, analyze_model, write_outputs
    from sla.analysis.gate import gate_summary_line, premise_gate
    from sla.analysis.models import run_flow_matching
    from sla.data.synthetic import SyntheticVideoDataset
    from sla.models.small_wan import load_small_model

    model = load_small_model(folder).to(device).eval()
    prompt = SyntheticVideoDataset("val", size=1, config=data_config)[0]["text_embeds"][None]
    size = (data_config.frames, data_config.height, data_config.width)

    def drive():
        run_flow_matching(model, num_steps=num_steps, latent_size=size, text_len=prompt.shape[1], seed=0,
                          shift=1.0, prompt_embeds=prompt, progress=False)

    patch = model.config.patch_size
    grid = tuple(n // p for n, p in zip(size, patch))
    result = analyze_model(model, drive, layers="all", steps="all", num_steps=num_steps, heads=None,
                           config=AnalysisConfig(token_tile=token_tile, query_blocks=query_blocks), device=device,
                           progress=False, token_grid=grid)
    result.meta.update({"model": folder, "num_steps": num_steps, "shift": 1.0})
    suffix = "_analysis" if token_tile is None else "_analysis_tile" + "x".join(map(str, token_tile))
    write_outputs(result, folder.rstrip("/") + suffix, plots=False)  # beside, not inside, the model folder
    gate = premise_gate(result.entries)
    print(gate_summary_line(gate), flush=True)
    return {k: v for k, v in gate.items() if k != "captures"}


if __name__ == "__main__":
    raise SystemExit(main())
