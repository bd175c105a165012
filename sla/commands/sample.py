"""``sla sample``: generate clips for held-out synthetic captions and write a PNG grid and a GIF.

``--model`` is a folder from ``sla finetune`` (``final/``), a diffusers transformer folder, or ``small``.
Noise is keyed by the clip index, so the same command gives the same clips; models compared with the
same ``--first``/``--count`` start from identical noise.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._argtypes import finite_float, non_negative_int, positive_int

    p.description = __doc__
    p.epilog = "example:\n  sla sample --model runs/sla/final --count 8 --out runs/samples\n"
    p.add_argument("--model", default="small", help="fine-tuned folder, diffusers folder or 'small' (default)")
    p.add_argument("--count", type=positive_int, default=8, help="clips to generate (default: 8)")
    p.add_argument("--first", type=non_negative_int, default=0, help="first held-out caption index (default: 0)")
    p.add_argument("--steps", type=positive_int, default=20, help="Euler steps (default: 20)")
    p.add_argument("--shift", type=finite_float, default=1.0, help="timestep shift (default: 1.0)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="clips per model call")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--out", default="runs/samples", help="output folder (default: runs/samples)")


def run(args: argparse.Namespace) -> int:
    import os

    from sla._paths import prepare_output_dir

    prepare_output_dir(args.out, "--out")  # before loading the model and sampling

    from sla.commands.eval import resolve_device
    from sla.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset
    from sla.eval.evaluate import generate
    from sla.eval.media import save_gif, save_grid_png
    from sla.training.checkpoint import load_finetuned

    device = resolve_device(args.device)
    model, info = load_finetuned(args.model)
    model.to(device)
    val = SyntheticVideoDataset("val", size=args.first + args.count,
                                config=SyntheticVideoConfig(text_dim=model.config.text_dim))
    idx = range(args.first, args.first + args.count)
    clips = generate(model, val, idx, steps=args.steps, shift=args.shift, batch_size=args.batch_size, device=device,
                     progress=True)
    captions = [val[i]["caption"] for i in idx]
    png = save_grid_png(clips, os.path.join(args.out, "samples.png"), row_labels=captions)
    gif = save_gif(clips, os.path.join(args.out, "samples.gif"))
    with open(os.path.join(args.out, "captions.txt"), "w") as f:
        for i, caption in zip(idx, captions):
            f.write(f"{i}\t{caption}\n")
    print(f"attention: {info.get('attention')}; wrote {png}, {gif} and captions.txt")
    return 0
