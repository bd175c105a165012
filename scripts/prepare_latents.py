"""Prepare a latents folder for ``sla finetune --data FOLDER`` (format: sla/data/latents.py).

A thin wrapper kept for existing commands; the implementation is ``sla.data.prepare``.

1. Your own videos, encoded with a Wan pipeline's VAE and text encoder: the same as ``sla prepare``, whose
   arguments it takes (``--input`` is accepted for ``--videos``):

       python scripts/prepare_latents.py videos --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers \\
           --videos /data/clips --out /data/latents --frames 81 --height 480 --width 832

   See ``sla prepare --help`` and docs/finetuning.md.

2. The built-in synthetic set, written in the same format (pixel space, no VAE: "latents" are the clips),
   e.g. to test a data pipeline or to train from files instead of on the fly:

       python scripts/prepare_latents.py synthetic --count 1000 --out runs/synthetic_latents
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "videos":
        from sla.cli import main as sla_main

        rest = ["--videos" if a == "--input" else a for a in argv[1:]]
        return sla_main(["prepare", *rest])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    sub.add_parser("videos", help="encode your videos with a Wan pipeline's VAE and text encoder (= sla prepare)")
    s = sub.add_parser("synthetic", help="write the built-in synthetic set in the latents format")
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--split", choices=("train", "val"), default="train")
    s.add_argument("--out", required=True)
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--text-dim", type=int, default=64)
    args = ap.parse_args(argv)
    from sla.data.prepare import export_synthetic

    n = export_synthetic(args.out, args.count, split=args.split, frames=args.frames, height=args.height,
                         width=args.width, text_dim=args.text_dim)
    print(f"wrote {n} clips to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
