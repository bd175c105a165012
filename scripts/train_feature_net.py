"""Train the evaluation feature network (sla/eval/features.py) on the synthetic set.

Multi-label classification of which attribute values (shape, colour, texture, motion, size) appear in a
clip; the 64-wide penultimate layer becomes the feature space of ``sla eval``'s Frechet distance.

    python scripts/train_feature_net.py --seconds 190 --steps 1200 --batch-size 64 --workers 4 \
        --out sla/assets/feature_net.safetensors

For the wan8k testbed's clips (8 x 64 x 64, textured backgrounds) add ``--data wan8k`` and write
``sla/assets/feature_net_wan8k.safetensors``.

The first weights (feature_net.safetensors) came from that command on one NVIDIA H200 (1,200 steps, 95 s; held-out attribute
accuracy 0.7965, see sla/assets/feature_net_training.log).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seconds", type=float, default=None, help="stop after this wall time")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="small", choices=["small", "wan8k"],
                    help="train on the clips of this built-in model (sla/models/small_wan.py)")
    ap.add_argument("--out", default="sla/assets/feature_net.safetensors")
    args = ap.parse_args()

    from safetensors.torch import save_file

    from sla.data.synthetic import ATTRIBUTE_NAMES, SyntheticVideoConfig, SyntheticVideoDataset, collate
    from sla.eval.features import VideoFeatureNet
    from sla.models.small_wan import embedded_model

    torch.manual_seed(args.seed)
    data = SyntheticVideoConfig(**embedded_model(args.data).data)
    train = SyntheticVideoDataset("train", size=10_000_000, config=data)
    val = SyntheticVideoDataset("val", size=256, config=data)
    sampler = torch.utils.data.RandomSampler(train, replacement=True, num_samples=args.steps * args.batch_size,
                                             generator=torch.Generator().manual_seed(args.seed + 1))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, collate_fn=collate, persistent_workers=args.workers > 0)
    net = VideoFeatureNet(n_attributes=len(ATTRIBUTE_NAMES)).to(args.device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    t0 = time.time()
    step = 0
    for batch in loader:
        _, logits = net(batch["video"].to(args.device))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"].to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:
            print(f"feature-net step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if args.seconds is not None and time.time() - t0 > args.seconds:
            break
    net.eval()
    vb = collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        _, logits = net(vb["video"].to(args.device))
    acc = ((logits.sigmoid() > 0.5).float().cpu() == vb["labels"]).float().mean().item()
    print(f"feature-net held-out attribute accuracy {acc:.4f} after {step} steps", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from sla._paths import atomic_path

    with atomic_path(args.out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"steps": str(step), "val_attribute_accuracy": f"{acc:.4f}",
                            "data": json.dumps(data.to_dict()), "attributes": json.dumps(ATTRIBUTE_NAMES)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
