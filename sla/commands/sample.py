"""``sla sample``: generate videos, in one of two modes.

--pipeline DIR: a local diffusers Wan text-to-video pipeline (Wan2.1, or Wan2.2 with two transformers) through
diffusers' WanPipeline, with SLA from --sla (the final/ folder of `sla finetune`, or a folder written by
sla.save_sla; with Wan2.2 A14B also --sla-2 for transformer_2), writes --out (an mp4), a PNG contact sheet and a
JSON report, and prints the time of text encoding, of each denoising step and of the VAE decode, and the
attention sparsity SLA achieved. Without --sla the pipeline runs dense (the baseline to compare against).

--model (the default mode): a built-in model (default wan8k) or a fine-tuned one on held-out synthetic captions,
written as a PNG grid and a GIF. Noise is keyed by the clip index, so the same command gives the same clips.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  # a Wan pipeline with the SLA model `sla finetune --model PIPELINE` wrote
  sla sample --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --sla runs/wan_sla/final \\
      --prompt "a red fox runs through fresh snow" --out fox_sla.mp4
  # the same pipeline dense, same seed: the baseline for quality and speed
  sla sample --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --prompt "a red fox runs through fresh snow" --out fox_dense.mp4
  # Wan2.2 A14B: SLA in both transformers
  sla sample --pipeline /ckpt/Wan2.2-T2V-A14B-Diffusers --sla runs/high/final --sla-2 runs/low/final \\
      --prompt "..." --out out.mp4
  # speed check before any fine-tuning: fresh SLA (zero projections = sparse-only attention) everywhere
  sla sample --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers --sla-untrained --prompt "..." --out check.mp4
  # the small synthetic model
  sla sample --model runs/sla/final --count 8 --out runs/samples
  # one video on two GPUs: Ulysses context parallelism, each GPU holds half of the tokens
  torchrun --nproc_per_node 2 -m sla.cli sample --context-parallel 2 --pipeline /ckpt/Wan2.1-T2V-1.3B-Diffusers \
      --sla runs/wan_sla/final --prompt "..." --out out.mp4
"""

# Flags of one mode only; giving one in the other mode is an error, not silently ignored.
PIPELINE_ONLY = ("sla", "sla_2", "sla_untrained", "prompt", "negative_prompt", "frames", "height", "width",
                 "guidance_scale", "seed", "fps", "dtype", "sheet", "text_len", "critical", "negligible", "block_q",
                 "block_k", "sla_backend")
MODEL_ONLY = ("model", "count", "first", "shift", "batch_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._argtypes import finite_float, non_negative_int, positive_int

    p.description = __doc__
    p.epilog = EPILOG
    g = p.add_argument_group("Wan pipeline mode (--pipeline)")
    g.add_argument("--pipeline", help="local diffusers Wan text-to-video pipeline folder (with model_index.json); "
                                      "selects this mode (default: none, the --model mode)")
    g.add_argument("--sla", help="SLA for the transformer: the final/ folder of `sla finetune` (its fine-tuned "
                                 "transformer replaces the pipeline's) or a sla.save_sla folder (loaded onto the "
                                 "pipeline's transformer) (default: dense attention)")
    g.add_argument("--sla-2", dest="sla_2",
                   help="the same for transformer_2 of a Wan2.2 A14B pipeline (required with --sla there; "
                        "'dense' keeps it dense) (default: none)")
    g.add_argument("--sla-untrained", action="store_true", default=None,
                   help="apply fresh SLA (zero projections: sparse-only attention) to every transformer with "
                        "--critical/--negligible/--block-q/--block-k: a speed check before fine-tuning (default: off)")
    g.add_argument("--critical", type=float, help="with --sla-untrained: fraction of key blocks computed exactly "
                                                  "(default: 0.05)")
    g.add_argument("--negligible", type=float, help="with --sla-untrained: fraction skipped (default: 0.10)")
    g.add_argument("--block-q", type=int, help="with --sla-untrained: query block size (default: 64)")
    g.add_argument("--block-k", type=int, help="with --sla-untrained: key block size (default: 64)")
    g.add_argument("--sla-backend", help="with --sla-untrained: auto (Triton on CUDA, PyTorch on CPU) | torch | "
                                         "triton (default: auto)")
    g.add_argument("--prompt", help="what to generate (required with --pipeline, no default)")
    g.add_argument("--negative-prompt", help="what to avoid, used with --guidance-scale > 1 (default: '')")
    g.add_argument("--frames", type=int, help="video frames, 4k+1 (default: 81)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 16 (default: 480)")
    g.add_argument("--width", type=int, help="pixels, a multiple of 16 (default: 832)")
    g.add_argument("--guidance-scale", type=float,
                   help="classifier-free guidance; > 1 runs the transformer twice per step (default: 5.0)")
    g.add_argument("--seed", type=int, help="noise seed, drawn on the CPU: the same on every device (default: 0)")
    g.add_argument("--fps", type=int, help="frame rate written into the mp4 (default: 16, Wan2.1's)")
    g.add_argument("--dtype", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32 for the transformer and "
                                   "text encoder; the VAE always runs in fp32 (default: auto)")
    g.add_argument("--sheet", help="contact-sheet PNG path (default: --out with .png)")
    g.add_argument("--text-len", type=int, help="prompt tokens, as in `sla prepare` (default: 512)")
    g.add_argument("--no-sparsity", dest="sparsity", action="store_false",
                   help="do not replay the first transformer call to measure the attention sparsity (default: "
                        "measure it)")
    m = p.add_argument_group("small synthetic model mode (--model)")
    m.add_argument("--model", help="fine-tuned folder, diffusers folder or a built-in model, 'wan8k' or 'small' "
                                   "(default: wan8k)")
    m.add_argument("--count", type=positive_int, help="clips to generate (default: 8)")
    m.add_argument("--first", type=non_negative_int, help="first held-out caption index (default: 0)")
    m.add_argument("--shift", type=finite_float, help="timestep shift (default: 1.0)")
    m.add_argument("--batch-size", type=positive_int, help="clips per model call (default: 4)")
    c = p.add_argument_group("both modes")
    c.add_argument("--steps", type=positive_int, help="denoising steps (default: 50 with --pipeline, 20 with --model)")
    c.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    c.add_argument("--context-parallel", dest="context_parallel", type=positive_int,
                   help="Ulysses context parallelism over N processes (launch exactly N with torchrun "
                        "--nproc_per_node N): each holds 1/N of the tokens, attention exchanges them; N must divide "
                        "the heads and the tokens. Rank 0 writes the outputs (default: 1, one process)")
    c.add_argument("--out", help="--pipeline: the mp4 to write (required); --model: output folder "
                                 "(default: runs/samples)")


def _context_parallel(args, device):
    """``(mesh, device, rank)`` for ``--context-parallel N`` (N > 1: the process group is started here, and a CUDA
    ``device`` becomes this process's GPU), ``(None, device, 0)`` for one process. All N processes generate the same
    clips together; only rank 0 writes."""
    import os

    import torch

    degree = args.context_parallel or 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if degree == 1:
        if world > 1:
            raise ValueError(f"sla sample runs on one process, but {world} were launched; pass --context-parallel "
                             f"{world} to share the work, or launch one")
        return None, device, 0
    if world != degree:
        raise ValueError(f"--context-parallel {degree} needs exactly {degree} processes (torchrun --nproc_per_node "
                         f"{degree} -m sla.cli sample ...), got {world}")
    import torch.distributed as dist

    from sla.integrations.context_parallel import parallel_mesh

    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        args._started_process_group = True
    return parallel_mesh(degree, device.type), device, dist.get_rank()


def _enable_context_parallel(model, mesh, device, tokens: int) -> None:
    from sla.integrations.context_parallel import check_divisible, enable_context_parallel

    check_divisible(heads=model.config.num_attention_heads, tokens=tokens, degree=mesh["ulysses"].size(),
                    what=f"the {type(model).__name__}")
    enable_context_parallel(model, mesh, device)


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def run(args: argparse.Namespace) -> int:
    if args.pipeline is not None:
        wrong = _given(args, MODEL_ONLY)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} belong to the --model mode; with --pipeline drop them")
        return _finish(run_pipeline, args)
    wrong = _given(args, PIPELINE_ONLY) + ([] if args.sparsity else ["--no-sparsity"])
    if wrong:
        raise ValueError(f"{', '.join(wrong)} need --pipeline DIR (the Wan pipeline mode); without it `sla sample` "
                         "runs the small synthetic model")
    return _finish(run_small, args)


def _finish(mode, args) -> int:
    """Run ``mode``; then, also after an error, end the process group that ``--context-parallel`` started, if it
    did (NCCL warns at exit otherwise), after every rank is done (rank 0 writes the outputs while the others wait)."""
    try:
        return mode(args)
    finally:
        if getattr(args, "_started_process_group", False):
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def run_pipeline(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from sla._paths import atomic_write_text
    from sla.data.video import require_av, write_mp4
    from sla.eval.media import save_contact_sheet
    from sla.integrations.wan_pipeline import generate_video, load_pipeline, resolve_device, resolve_dtype

    if not args.prompt:
        raise ValueError("--prompt is required with --pipeline, e.g. --prompt \"a red fox runs through fresh snow\"")
    if not args.out or Path(args.out).suffix.lower() != ".mp4":
        raise ValueError(f"--out must name the .mp4 file to write with --pipeline (e.g. --out fox.mp4), got "
                         f"{args.out!r}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    fresh_flags = _given(args, ("critical", "negligible", "block_q", "block_k", "sla_backend"))
    if fresh_flags and not args.sla_untrained:
        raise ValueError(f"{', '.join(fresh_flags)} set the settings of --sla-untrained; a --sla folder brings its "
                         "own settings: drop them or add --sla-untrained")
    require_av()  # fail before minutes of generation, not at the end
    out = Path(args.out)
    sheet = Path(args.sheet) if args.sheet else out.with_suffix(".png")
    report_path = out.with_suffix(".json")
    mesh, device, rank = _context_parallel(args, resolve_device(args.device))
    dtype = resolve_dtype(args.dtype or "auto", device)
    untrained = None
    if args.sla_untrained:
        untrained = dict(critical=0.05 if args.critical is None else args.critical,
                         negligible=0.10 if args.negligible is None else args.negligible,
                         block_q=args.block_q or 64, block_k=args.block_k or 64, backend=args.sla_backend or "auto")
    pipe, attention = load_pipeline(args.pipeline, sla=args.sla, sla_2=args.sla_2, untrained_sla=untrained,
                                    device=device, dtype=dtype)
    height, width, num_frames = args.height or 480, args.width or 832, args.frames or 81
    if mesh is not None:
        for slot in attention:
            model = getattr(pipe, slot)
            pt, ph, pw = model.config.patch_size
            spatial = pipe.vae_scale_factor_spatial
            tokens = (((num_frames - 1) // pipe.vae_scale_factor_temporal + 1) // pt
                      * (height // spatial // ph) * (width // spatial // pw))
            _enable_context_parallel(model, mesh, device, tokens)
    if rank == 0:
        for slot, what in attention.items():
            print(f"{slot}: {what}" + (f" (context parallel over {mesh.size()} processes)" if mesh is not None else ""))
    # Every rank runs the whole pipeline (text encoder and VAE replicated, the transformers split by tokens), so
    # every rank ends with the same video; rank 0 writes it.
    res = generate_video(pipe, args.prompt, negative_prompt=args.negative_prompt or "",
                         height=height, width=width, num_frames=num_frames, steps=args.steps or 50,
                         guidance_scale=5.0 if args.guidance_scale is None else args.guidance_scale,
                         seed=args.seed or 0, max_sequence_length=args.text_len or 512, sparsity=args.sparsity,
                         progress=rank == 0)
    if rank != 0:
        return 0
    frames = res.pop("frames")
    write_mp4(frames, out, fps=args.fps or 16)
    save_contact_sheet(frames, sheet)
    report = dict(pipeline=str(args.pipeline), attention=attention, prompt=args.prompt,
                  negative_prompt=args.negative_prompt or "", seed=args.seed or 0, device=str(device),
                  dtype=str(dtype).replace("torch.", ""), context_parallel=args.context_parallel or 1,
                  video=str(out), contact_sheet=str(sheet),
                  frames=int(frames.shape[0]), height=int(frames.shape[1]), width=int(frames.shape[2]), **res)
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    print(format_timings(report))
    print(f"wrote {out} ({frames.shape[0]} frames), {sheet} and {report_path}")
    return 0


def format_timings(r: dict) -> str:
    steps = r["step_seconds"]
    lines = [f"text encoding  {r['text_encoding_seconds']:.3f} s",
             f"denoising      {r['denoising_seconds']:.3f} s over {len(steps)} steps "
             f"({r['transformer_calls_per_step']} transformer call(s) per step): "
             f"median {r.get('median_step_seconds', 0.0):.3f} s/step"
             + (f", first {steps[0]:.3f} s (the first also warms up: Triton compiles there on GPUs)" if steps else ""),
             f"VAE decode     {r['vae_decode_seconds']:.3f} s",
             f"total          {r['total_seconds']:.3f} s"]
    for slot, sp in (r.get("sparsity") or {}).items():
        if sp is None:
            lines.append(f"sparsity       {slot}: dense (no SLA layer)")
        else:
            lines.append(f"sparsity       {slot}: {sp['mean']:.3f} of query-key pairs skipped by the exact branch "
                         f"(min {sp['min']:.3f}, max {sp['max']:.3f} over {sp['sla_layers']} of "
                         f"{sp['self_attention_layers']} self-attention layers; measured on its first call)")
    return "\n".join(lines)


def run_small(args: argparse.Namespace) -> int:
    import os

    from sla._paths import prepare_output_dir

    count = 8 if args.count is None else args.count
    first = args.first or 0
    out = args.out or "runs/samples"
    from sla.commands.eval import resolve_device

    mesh, device, rank = _context_parallel(args, resolve_device(args.device))
    if rank == 0:
        prepare_output_dir(out, "--out")  # before loading the model and sampling

    from sla.data.synthetic import SyntheticVideoDataset
    from sla.eval.evaluate import generate
    from sla.eval.media import save_gif, save_grid_png
    from sla.models.small_wan import DEFAULT_MODEL
    from sla.training.checkpoint import load_finetuned, synthetic_data_config

    spec = args.model or DEFAULT_MODEL
    model, info = load_finetuned(spec)
    model.to(device)
    val = SyntheticVideoDataset("val", size=first + count, config=synthetic_data_config(spec, model))
    if mesh is not None:
        _, f, h, w = val[first]["video"].shape
        pt, ph, pw = model.config.patch_size
        _enable_context_parallel(model, mesh, device, (f // pt) * (h // ph) * (w // pw))
    idx = range(first, first + count)
    # Under context parallelism every rank samples the same clips (same noise, tokens split), and ends with them all.
    clips = generate(model, val, idx, steps=args.steps or 20, shift=1.0 if args.shift is None else args.shift,
                     batch_size=args.batch_size or 4, device=device, progress=rank == 0)
    if rank != 0:
        return 0
    captions = [val[i]["caption"] for i in idx]
    png = save_grid_png(clips, os.path.join(out, "samples.png"), row_labels=captions)
    gif = save_gif(clips, os.path.join(out, "samples.gif"))
    with open(os.path.join(out, "captions.txt"), "w") as f:
        for i, caption in zip(idx, captions):
            f.write(f"{i}\t{caption}\n")
    print(f"attention: {info.get('attention')}; wrote {png}, {gif} and captions.txt")
    return 0
