"""Seconds per video of diffusers' ``WanPipeline`` at the Wan2.1-1.3B configuration: dense attention vs SLA.

Builds the whole text-to-video pipeline with random weights, nothing downloaded:

* transformer: ``WanTransformer3DModel`` at Wan2.1-1.3B's configuration, bf16 (the fp32 modules diffusers keeps
  in fp32 stay fp32), built as in ``bench_e2e.py``;
* VAE: ``AutoencoderKLWan`` at its default configuration, which is Wan2.1's VAE, float32 (as Wan runs it);
* text encoder: ``UMT5EncoderModel`` at umt5-xxl's size (24 layers, width 4096, 64 heads, FFN 10240,
  vocabulary 256384; 5.7B parameters), bf16, with the small tokenizer of ``sla.testing`` (token ids then
  cover only the start of the vocabulary: a table lookup, so the time does not depend on which ids);
* scheduler: ``UniPCMultistepScheduler`` as the Wan2.1 Diffusers folders configure it (flow shift 3).

and generates one video (default 480p, 81 frames, 50 steps, classifier-free guidance 5: two transformer calls
per step) per attention mode, timing each stage separately with ``sla.integrations.wan_pipeline.generate_video``
(the code behind ``sla sample --pipeline``): text encoding (prompt and negative prompt), every denoising step,
and the VAE decode. Modes:

* ``flash``  dense SDPA, FlashAttention backend (diffusers ``_native_flash``) for self- and cross-attention;
* ``cudnn``  dense SDPA, cuDNN backend (``_native_cudnn``);
* ``sla``    ``sla.apply_sla`` in every self-attention layer (critical 0.05, negligible 0.10, Triton kernels under
  ``backend="auto"``; zero projections, the speed is that of a fine-tuned model), cross-attention on flash.

Before the timed video of each mode, ``--warmup-steps`` denoising steps run untimed (Triton compiles, cuDNN picks
its plans); the text encoder and the VAE decode are warmed up once at the start. Writes JSON (``--out``) and a
Markdown table (same stem, ``.md``); prints the table.

    python bench/bench_pipeline.py --out bench/pipeline_wan13b.json     # GPU: Wan2.1-1.3B, 480p, 81 frames
    python bench/bench_pipeline.py --tiny --out /tmp/pipeline_tiny.json  # seconds on CPU: checks the script

Needs diffusers and transformers (on the GPU machine: carry the diffusers wheel, see docs/integration.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers, also when imported
from provenance import git_commit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import sla  # noqa: E402
from bench_e2e import (  # noqa: E402
    RESOLUTIONS,
    WAN_1_3B,
    _is_oom,
    _sla_block_counts,
    write_results,
    build_model,
)

MODES = ("flash", "cudnn", "sla")
# umt5-xxl's encoder, the text encoder of every Wan2.1/2.2 pipeline.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)
PROMPT = "A red fox runs through fresh snow in a pine forest at dawn, the camera tracking it from the side."
NEGATIVE = "blurry, low quality, static, distorted"


def _build_on(device, dtype, fn):
    """``fn()`` with new tensors created directly on ``device`` in ``dtype`` (no float32 copy on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return fn()
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(args, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from sla.testing import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE, WAN_SCHEDULER, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(0)
    if args.tiny:
        transformer = WanTransformer3DModel(**TINY_TRANSFORMER).to(device, dtype)
        vae = AutoencoderKLWan(**TINY_VAE).to(device)
        enc_cfg = UMT5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                             **TINY_TEXT_ENCODER)
    else:
        transformer = build_model(WAN_1_3B, device, dtype)
        vae = _build_on(device, torch.float32, AutoencoderKLWan)  # the default config is Wan2.1's VAE
        enc_cfg = UMT5Config(**(UMT5_XXL if args.text_encoder == "umt5-xxl" else
                                dict(UMT5_XXL, num_layers=1, d_ff=256, vocab_size=len(tokenizer))))
    text_encoder = _build_on(device, dtype, lambda: UMT5EncoderModel(enc_cfg))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_mode(pipe, mode: str, args, dense_default: str):
    """Put the transformer in ``mode`` from its plain dense state; returns the function that undoes it."""
    model = pipe.transformer
    if mode in ("flash", "cudnn", "native"):
        model.set_attention_backend({"flash": "_native_flash", "cudnn": "_native_cudnn", "native": "native"}[mode])
        return model.reset_attention_backend
    if mode == "sla":
        model.set_attention_backend(dense_default)  # cross-attention stays dense, on flash
        sla.apply_sla(model, critical=args.critical, negligible=args.negligible, block_q=args.block_q,
                      block_k=args.block_k, backend=args.backend)
        return lambda: (sla.remove_sla(model), model.reset_attention_backend())
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    from diffusers.utils import logging as diffusers_logging

    from sla.integrations.wan_pipeline import decode_latents, generate_video
    from sla.ops.sla.interface import resolve_backend

    diffusers_logging.set_verbosity_error()  # the per-call "attention backends are experimental" note
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames, height, width = (args.frames, args.height, args.width)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if device.type != "cuda":
        # SDPA's flash/cuDNN backends exist on CUDA only; on CPU the dense baseline is PyTorch's default SDPA.
        modes = list(dict.fromkeys("native" if m in ("flash", "cudnn") else m for m in modes))
    dense_default = "_native_flash" if device.type == "cuda" else "native"

    t0 = time.perf_counter()
    pipe = build_pipeline(args, device, dtype)
    build_s = time.perf_counter() - t0
    cfg = pipe.transformer.config
    latent = (cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = latent[1] * (latent[2] // cfg.patch_size[1]) * (latent[3] // cfg.patch_size[2])

    # One-time warm-up of the stages that do not depend on the attention mode.
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(PROMPT, NEGATIVE, do_classifier_free_guidance=args.guidance_scale > 1,
                                    max_sequence_length=args.text_len, device=device)
        if args.vae_warmup:
            decode_latents(pipe, torch.zeros(1, *latent, device=device))
    _sync(device)

    result = {
        "benchmark": "bench_pipeline",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "model": "tiny" if args.tiny else "Wan2.1-T2V-1.3B (random weights)",
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "text_encoder_params": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "vae_params": sum(p.numel() for p in pipe.vae.parameters()),
        "text_encoder": "tiny" if args.tiny else args.text_encoder,
        "dtype": str(dtype).replace("torch.", ""),
        "video": {"frames": frames, "height": height, "width": width},
        "latent_shape": list(latent),
        "tokens": tokens,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "text_len": args.text_len,
        "warmup_steps": args.warmup_steps,
        "sla": {"critical": args.critical, "negligible": args.negligible, "block_q": args.block_q,
                "block_k": args.block_k, "backend": args.backend,
                "resolved_backend": resolve_backend(args.backend, device) if args.backend == "auto" else args.backend},
        "sla_blocks": _sla_block_counts(tokens, args),
        "build_seconds": round(build_s, 2),
        "rows": [],
    }
    for mode in modes:
        undo = set_mode(pipe, mode, args, dense_default)
        row = {"mode": mode}
        try:
            try:
                if args.warmup_steps:
                    pipe.set_progress_bar_config(disable=True)
                    with torch.no_grad():
                        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=height, width=width,
                             num_frames=frames, num_inference_steps=args.warmup_steps,
                             guidance_scale=args.guidance_scale, output_type="latent",
                             generator=torch.Generator().manual_seed(args.seed))
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = generate_video(pipe, PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                                     num_frames=frames, steps=args.steps, guidance_scale=args.guidance_scale,
                                     seed=args.seed, max_sequence_length=args.text_len, sparsity=mode == "sla",
                                     progress=not args.quiet)
                video = res.pop("frames")
                row.update(res)
                row["video_shape"] = list(video.shape)
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                row["error"] = "out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        finally:
            undo()
        result["rows"].append(row)
        if not args.quiet:
            print(f"{mode:>6}: " + (f"{row['total_seconds']:.2f} s per video (denoising {row['denoising_seconds']:.2f}"
                                    f" s, median step {row['median_step_seconds']:.3f} s)" if "error" not in row
                                    else row["error"]), flush=True)
    _derive(result)
    return result


def _derive(result: dict) -> None:
    """Speedups of the denoising and of the whole video against the dense baselines of the same run."""
    by = {r["mode"]: r for r in result["rows"] if "error" not in r}
    for r in result["rows"]:
        if "error" in r:
            continue
        for base in ("flash", "cudnn", "native"):
            b = by.get(base)
            if b is not None and r["mode"] != base:
                r[f"denoising_speedup_vs_{base}"] = b["denoising_seconds"] / r["denoising_seconds"]
                r[f"video_speedup_vs_{base}"] = b["total_seconds"] / r["total_seconds"]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def to_markdown(result: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    s, v = result["sla"], result["video"]
    lines = [
        f"### WanPipeline, {result['model']}, {v['frames']} frames {v['width']}x{v['height']} "
        f"({result['tokens']} tokens), {result['steps']} steps, guidance {result['guidance_scale']}, "
        f"{result['dtype']} (VAE fp32)",
        "",
        f"{result['device']}, torch {result['torch']}, diffusers {result['diffusers']}, transformers "
        f"{result['transformers']}, commit {result['commit']}; text encoder {result['text_encoder']} "
        f"({_count(result['text_encoder_params'])} parameters), {result['text_len']} tokens; SLA "
        f"critical={s['critical']}, negligible={s['negligible']}, blocks {s['block_q']}x{s['block_k']}, backend "
        f"{s['resolved_backend']} ({result['sla_blocks']['critical']} of {result['sla_blocks']['key_blocks']} key "
        f"blocks critical); {result['warmup_steps']} untimed warm-up steps per mode; one video per mode.",
        "",
        "| mode | text encoding (s) | median step (s) | denoising (s) | VAE decode (s) | seconds per video "
        "| denoising vs flash (CPU: native) | vs cuDNN | video vs flash (CPU: native) | vs cuDNN | sparsity "
        "| peak mem (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} |" + " - |" * 10)
            continue
        sp = (r.get("sparsity") or {}).get("transformer")
        lines.append(
            f"| {r['mode']} | {r['text_encoding_seconds']:.2f} | {r['median_step_seconds']:.3f} | "
            f"{r['denoising_seconds']:.2f} | {r['vae_decode_seconds']:.2f} | {r['total_seconds']:.2f} | "
            f"{f(r.get('denoising_speedup_vs_flash') or r.get('denoising_speedup_vs_native'), '.2f')} | "
            f"{f(r.get('denoising_speedup_vs_cudnn'), '.2f')} | "
            f"{f(r.get('video_speedup_vs_flash') or r.get('video_speedup_vs_native'), '.2f')} | "
            f"{f(r.get('video_speedup_vs_cudnn'), '.2f')} | {f(sp and sp['mean'], '.3f')} | "
            f"{f(r.get('peak_gib'), '.1f')} |")
    lines += ["", "A step is one scheduler step: with guidance > 1 the transformer runs twice (prompt and negative "
                  "prompt). Seconds per video = text encoding + denoising + VAE decode of that mode's video. "
                  "Sparsity: share of query-key pairs the exact branch skips, measured on the first transformer "
                  "call (mean over layers). Random weights: the speed is representative, the video is noise."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Seconds per video of WanPipeline (Wan2.1-1.3B configuration, random weights): text encoding, "
                    "denoising steps and VAE decode timed separately, dense SDPA (flash, cuDNN) vs SLA. Writes JSON "
                    "(--out) and a Markdown table (same path, .md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path; the Markdown table goes to the same stem + .md")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="480p", help="video size (81 frames)")
    p.add_argument("--frames", type=int, default=None, help="override the resolution's frame count (4k+1)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of the timed video (default: 50, WanPipeline's; 2 with --tiny)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="> 1: two transformer calls per step")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed denoising steps per mode before its video")
    p.add_argument("--vae-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="decode once untimed before the first mode")
    p.add_argument("--text-encoder", choices=("umt5-xxl", "small"), default="umt5-xxl",
                   help="umt5-xxl: the real size (5.7B); small: 1 layer (times the rest only; not for results)")
    p.add_argument("--text-len", type=int, default=512, help="prompt tokens (WanPipeline's default)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES}")
    p.add_argument("--critical", type=float, default=0.05)
    p.add_argument("--negligible", type=float, default=0.10)
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--backend", default="auto", help="SLA backend: auto (Triton on CUDA), triton, torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true",
                   help="the tiny pipeline of sla.testing at 9x64x64 and 2 steps: checks the script on a CPU")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    frames, args.height, args.width = RESOLUTIONS[args.resolution]
    args.frames = args.frames or frames
    args.steps = args.steps or (2 if args.tiny else 50)
    if args.tiny:
        args.frames, args.height, args.width = 9, 64, 64
        if args.block_q == 64 and args.block_k == 64:
            args.block_q = args.block_k = 16  # the tiny video has 48 tokens
    if (args.frames - 1) % 4:
        p.error(f"--frames must be 4k+1, got {args.frames}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
