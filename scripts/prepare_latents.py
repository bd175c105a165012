"""Prepare a latents folder for ``sla finetune --data FOLDER`` (format: sla/data/latents.py).

Two sources:

1. Your own videos, encoded with the model's own VAE and text encoder from a local diffusers Wan pipeline
   folder (``vae/``, ``text_encoder/``, ``tokenizer/``, as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` ships them):

       python scripts/prepare_latents.py videos --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers \\
           --input /data/clips --out /data/latents --frames 81 --height 480 --width 832

   ``--input`` holds one clip per ``<name>.gif`` / ``<name>.mp4`` (mp4 needs ``imageio[ffmpeg]``) or a
   folder ``<name>/`` of frame images, each with a caption in ``<name>.txt``. Frames are resized and
   centre-cropped to ``--height x --width``, the first ``--frames`` are kept (Wan needs ``4k + 1``),
   pixels go to [-1, 1], the VAE's posterior mean is normalised with the VAE's ``latents_mean`` /
   ``latents_std`` (as the Wan pipeline does), and the UMT5 embedding of the caption (512 tokens,
   zeroed after the caption's length, as the Wan pipeline does) is stored beside it.

2. The built-in synthetic set, written in the same format (pixel space, no VAE: "latents" are the clips),
   e.g. to test a data pipeline or to train from files instead of on the fly:

       python scripts/prepare_latents.py synthetic --count 1000 --out runs/synthetic_latents
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def _read_clip(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """-> ``(3, F, H, W)`` float32 in [-1, 1]."""
    import numpy as np
    from PIL import Image, ImageSequence

    images = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        images = [Image.open(p).convert("RGB") for p in files]
    elif path.suffix.lower() == ".gif":
        images = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(path))]
    elif path.suffix.lower() in (".mp4", ".webm", ".mov", ".avi"):
        try:
            import imageio.v3 as iio
        except ImportError as e:
            raise ImportError(f"reading {path.suffix} needs imageio with ffmpeg: pip install 'imageio[ffmpeg]'") from e
        images = [Image.fromarray(f) for f in iio.imread(path)]
    else:
        raise ValueError(f"{path}: unsupported clip type (use .gif, .mp4 or a folder of frame images)")
    if len(images) < frames:
        raise ValueError(f"{path} has {len(images)} frames, fewer than --frames {frames}")
    out = []
    for img in images[:frames]:
        s = max(width / img.width, height / img.height)
        img = img.resize((max(width, round(img.width * s)), max(height, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        out.append(np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32))
    video = torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2)  # (3, F, H, W)
    return video / 127.5 - 1.0


def encode_videos(args) -> int:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from sla.data.latents import write_latents_example

    pipe = Path(args.pipeline)
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (pipe / sub).is_dir():
            raise FileNotFoundError(f"{pipe / sub} missing: --pipeline must be a diffusers Wan pipeline folder")
    if (args.frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1 for the Wan VAE (e.g. 81, 49, 17), got {args.frames}")
    src = Path(args.input)
    if not src.is_dir():
        raise FileNotFoundError(f"--input {src} is not a folder; it must hold <name>.gif/.mp4 or <name>/ clips "
                                "plus <name>.txt captions")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKLWan.from_pretrained(pipe / "vae", torch_dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(pipe / "tokenizer")
    enc = UMT5EncoderModel.from_pretrained(pipe / "text_encoder", torch_dtype=dtype).to(device).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(device)
    # The VAE's strided convolutions drop the remainder (36 rows encode like 32): a height that is not a
    # multiple of its spatial factor would silently lose pixel rows instead of being encoded whole.
    factor = int(vae.spatial_compression_ratio)
    for name in ("height", "width"):
        if getattr(args, name) % factor:
            raise ValueError(f"--{name} must be a multiple of the VAE's spatial factor {factor} (and of "
                             f"{2 * factor} for the Wan transformer's 2x2 patches), got {getattr(args, name)}")
    clips = sorted(p for p in src.iterdir() if (p.is_dir() or p.suffix.lower() in (".gif", ".mp4", ".webm", ".mov", ".avi"))
                   and (src / f"{p.stem}.txt").is_file())
    if not clips:
        raise ValueError(f"no clips with captions in {src} (expected <name>.gif/.mp4 or <name>/ plus <name>.txt)")
    os.makedirs(args.out, exist_ok=True)
    from tqdm.auto import tqdm

    for p in tqdm(clips, desc="encoding"):
        caption = (src / f"{p.stem}.txt").read_text().strip()
        video = _read_clip(p, args.frames, args.height, args.width).unsqueeze(0).to(device)
        with torch.no_grad():
            z = vae.encode(video).latent_dist.mode()
            z = (z - mean) / std
            t = tok([caption], padding="max_length", max_length=args.text_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            emb = enc(t.input_ids.to(device), t.attention_mask.to(device)).last_hidden_state[0].float()
            emb[int(t.attention_mask.sum()):] = 0  # the Wan pipeline zeroes the padding positions
        write_latents_example(Path(args.out) / f"{p.stem}.safetensors", z[0].float().cpu(), emb.cpu(), caption)
    print(f"wrote {len(clips)} clips to {args.out}")
    return 0


def export_synthetic(args) -> int:
    from tqdm.auto import tqdm

    from sla.data.latents import write_latents_example
    from sla.data.synthetic import SyntheticVideoConfig, SyntheticVideoDataset

    ds = SyntheticVideoDataset(args.split, size=args.count, config=SyntheticVideoConfig(
        frames=args.frames, height=args.height, width=args.width, text_dim=args.text_dim))
    os.makedirs(args.out, exist_ok=True)
    for i in tqdm(range(args.count), desc="writing"):
        item = ds[i]
        write_latents_example(Path(args.out) / f"{args.split}-{i:07d}.safetensors", item["video"], item["text_embeds"],
                              item["caption"])
    print(f"wrote {args.count} clips to {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)
    v = sub.add_parser("videos", help="encode your videos with a Wan pipeline's VAE and text encoder")
    v.add_argument("--pipeline", required=True,
                   help="local diffusers Wan pipeline folder with vae/, text_encoder/ and tokenizer/")
    v.add_argument("--input", required=True,
                   help="folder of clips (<name>.gif/.mp4 or <name>/ of frame images) with <name>.txt captions")
    v.add_argument("--out", required=True, help="output folder, one <name>.safetensors per clip")
    v.add_argument("--frames", type=int, default=81, help="frames kept per clip, 4k+1 (default 81, as Wan 2.1)")
    v.add_argument("--height", type=int, default=480, help="pixel height after resize + centre crop (default 480)")
    v.add_argument("--width", type=int, default=832, help="pixel width after resize + centre crop (default 832)")
    v.add_argument("--text-len", type=int, default=512,
                   help="caption tokens kept; the embedding is zero after the caption (default 512, as Wan)")
    v.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the VAE and text encoder (default: cuda if available)")
    s = sub.add_parser("synthetic", help="write the built-in synthetic set in the latents format")
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--split", choices=("train", "val"), default="train")
    s.add_argument("--out", required=True)
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--width", type=int, default=64)
    s.add_argument("--text-dim", type=int, default=64)
    args = ap.parse_args(argv)
    return encode_videos(args) if args.source == "videos" else export_synthetic(args)


if __name__ == "__main__":
    raise SystemExit(main())
