"""``sla prepare``: encode your captioned videos with a Wan pipeline's VAE and text encoder, once, into the
latents folder that ``sla finetune --data`` trains on.

--videos holds video files (mp4, mov, mkv, webm, avi, m4v, gif; decoded with PyAV) and folders of frame images
(png, jpg, webp, bmp; natural name order), each with a caption: <name>.txt beside it, or one --captions file
(CSV with a header naming a file/video/path/name column and a caption/text/prompt column, or JSONL with the same
keys) for all. Each clip becomes <out>/<name>.safetensors: the normalised VAE latent and the caption's text
embedding, exactly as WanPipeline computes both (details: docs/finetuning.md).

A clip that cannot be used (unreadable or corrupt file, fewer frames than needed, no caption or an empty one)
is reported by name and skipped; the others are encoded, and the list is in <out>/prepare_report.json.
Run the same command again to resume: finished clips are skipped, the rest encoded.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  # Wan2.1 1.3B at its native 480p, 81 frames (5 s at 16 fps), captions in <name>.txt files
  sla prepare --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --videos /data/clips --out /data/latents
  # 30 fps sources: every 2nd frame (about 15 fps), shorter clips, captions from one CSV
  sla prepare --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --videos /data/clips --captions /data/captions.csv \\
      --frames 49 --stride 2 --out /data/latents_49
  # then fine-tune on them
  sla finetune --model /ckpt/Wan2.1-T2V-1.3B-Diffusers --data /data/latents --bf16 --gradient-checkpointing

exit status: 0 when the run finished (skipped clips are listed); 1 when no clip could be encoded, or with
--strict when any clip was skipped.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.epilog = EPILOG
    p.add_argument("--pipeline", required=True,
                   help="local diffusers Wan pipeline folder (model_index.json, vae/, text_encoder/, tokenizer/), "
                        "e.g. Wan2.1-T2V-1.3B-Diffusers; its transformer is not loaded")
    p.add_argument("--videos", required=True, help="folder of clips (video files or folders of frame images)")
    p.add_argument("--out", required=True, help="output folder, one <name>.safetensors per clip")
    p.add_argument("--captions", default=None,
                   help="one CSV or JSONL file with the captions of all clips (default: <name>.txt beside each clip)")
    p.add_argument("--frames", type=int, default=81,
                   help="frames per clip, 4k+1 as the Wan VAE needs (81 = Wan's 5 s at 16 fps; 49, 33, 17 ...) "
                        "(default: 81)")
    p.add_argument("--stride", type=int, default=1,
                   help="keep every n-th source frame, e.g. 2 for 30 fps sources (default: 1)")
    p.add_argument("--height", type=int, default=480, help="height after resize + centre crop, a multiple of 16 "
                                                           "(default: 480)")
    p.add_argument("--width", type=int, default=832, help="width after resize + centre crop, a multiple of 16 "
                                                          "(default: 832)")
    p.add_argument("--text-len", type=int, default=512,
                   help="caption tokens kept; embeddings are zero after the caption (default: 512, as WanPipeline)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="clips per VAE / text-encoder call; raise it only if GPU memory allows (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="threads decoding the next batch while the GPU encodes "
                                                          "(0: decode in the main thread)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any clip was skipped, after encoding all the others (default: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a tqdm bar)")


def run(args: argparse.Namespace) -> int:
    import sys

    from sla.data.prepare import PrepareSettings, prepare_latents, summarize

    settings = PrepareSettings(pipeline=args.pipeline, videos=args.videos, out=args.out, frames=args.frames,
                               height=args.height, width=args.width, stride=args.stride, text_len=args.text_len,
                               batch_size=args.batch_size, captions=args.captions, device=args.device,
                               workers=args.workers, strict=args.strict, progress=args.progress)
    report = prepare_latents(settings, log=lambda m: print(m, file=sys.stderr))
    print(summarize(report))
    if not report.encoded and not report.already_done:
        print(f"error: no clip of --videos {args.videos} could be encoded (see the reasons above)", file=sys.stderr)
        return 1
    if args.strict and report.skipped:
        print(f"error: --strict and {len(report.skipped)} clip(s) skipped", file=sys.stderr)
        return 1
    return 0
