"""End-to-end speed of a diffusers Wan2.1 transformer with dense attention vs SLA (one GPU).

Builds the full-size ``WanTransformer3DModel`` from its configuration with random weights in bfloat16 (the
modules diffusers keeps in float32 when loading with ``torch_dtype=torch.bfloat16`` are kept in float32 here
too), and times, at batch 1:

* one denoising forward (``torch.no_grad``), and
* one training step (forward + backward of an MSE loss; gradient checkpointing per block by default, as
  fine-tuning at 32K+ tokens needs it; no optimizer step),

for each attention mode:

* ``flash``  dense SDPA, FlashAttention backend (diffusers ``_native_flash``) for self- and cross-attention;
* ``cudnn``  dense SDPA, cuDNN backend (``_native_cudnn``);
* ``sla``    SLA in every self-attention layer (``sla.apply_sla``: critical, negligible, blocks as given; the
  Triton kernels under ``backend="auto"``), cross-attention on the flash backend;
* ``sla_tiled``  the same with SLA's blocks over 3D token tiles (``apply_sla(token_tile=--token-tile)``), the
  setting the library recommends for Wan; with ``--combine auto`` it runs the ``pooled_cov`` rule (the default
  with tiles), where ``sla`` runs the mass rule;
* ``noop``   self-attention core replaced by returning v (q/k/v projections, norms, RoPE and everything else
  still run). Self-attention time of a mode = its step time minus the noop step time; its share = that / step.

Reports median time per step, self-attention time and share, speedups and peak memory, as a Markdown table
(printed, and written next to ``--out`` with suffix ``.md``) and JSON (``--out``).

    python bench/bench_e2e.py --out bench/e2e_wan13b.json                  # Wan2.1-1.3B, 480p, 81 frames
    python bench/bench_e2e.py --model 14b --out bench/e2e_wan14b.json      # Wan2.1-14B, 720p, forward only
    python bench/bench_e2e.py --tiny --out /tmp/e2e_tiny.json              # seconds on CPU: checks the script

On a machine without diffusers, install the carried wheels first (see docs/integration.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/ helpers, also when imported
from provenance import git_commit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import sla  # noqa: E402
from sla._paths import atomic_write_text  # noqa: E402
from sla.commands._argtypes import token_tile  # noqa: E402
from sla.integrations.diffusers import SLA_ATTRIBUTE, sla_modules  # noqa: E402

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)  # 40 heads x 128 = 5120 wide
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2, text_dim=64)
MODELS = {"1.3b": WAN_1_3B, "14b": WAN_14B}
# (frames, height, width) in pixels; the Wan VAE compresses 4x in time (+1 frame) and 8x in space.
RESOLUTIONS = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}
DEFAULT_RESOLUTION = {"1.3b": "480p", "14b": "720p"}
MODES = ("flash", "cudnn", "sla", "sla_tiled", "noop")
TEXT_TOKENS = 512


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight Wan transformer, created directly in ``dtype`` on ``device`` (no fp32 copy of 14B)."""
    from diffusers import WanTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    # What from_pretrained(torch_dtype=bf16) does: these modules stay in float32.
    keep = tuple(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in keep for part in name.split(".")[:-1]):
                param.data = param.data.float()
    return model


def make_inputs(config: dict, frames: int, height: int, width: int, device, dtype, batch: int = 1):
    latent_frames = (frames - 1) // 4 + 1
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(batch, config["in_channels"], latent_frames, height // 8, width // 8, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, config["text_dim"], generator=g)
    p_t, p_h, p_w = config["patch_size"]
    tokens = (latent_frames // p_t) * (height // 8 // p_h) * (width // 8 // p_w)
    return dict(hidden_states=hidden.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                timestep=torch.tensor([999.0] * batch, device=device)), tokens


class _ValueOnly(torch.nn.Module):
    """Stands in for a layer's SLA module: the attention core returns v, so what remains is everything else."""

    def forward(self, q, k, v, **kwargs):
        return v


def install_noop_self_attention(model):
    """SLA's processors in every self-attention layer (their q/k/v projections, norms, RoPE, output projection),
    with each layer's ``attn.sla`` module, the core they call on ``(B, H, L, D)`` tensors, replaced by
    :class:`_ValueOnly`. Undone by ``sla.remove_sla(model)``."""
    sla.apply_sla(model, backend="torch")
    root = getattr(model, "_orig_mod", model)
    for name in sla_modules(model):
        setattr(root.get_submodule(name), SLA_ATTRIBUTE, _ValueOnly())
    return model


def set_mode(model, mode: str, args, dense_backend_default: str):
    """Put ``model`` in ``mode`` from the plain dense state; returns a function that undoes it."""
    if mode in ("flash", "cudnn", "native"):
        model.set_attention_backend({"flash": "_native_flash", "cudnn": "_native_cudnn", "native": "native"}[mode])
        return model.reset_attention_backend
    model.set_attention_backend(dense_backend_default)  # cross-attention (and dense layers) in these modes
    if mode in ("sla", "sla_tiled"):
        sla.apply_sla(model, critical=args.critical, negligible=args.negligible, block_q=args.block_q,
                      block_k=args.block_k, feature_map=args.feature_map, linear_scope=args.linear_scope,
                      backend=args.backend, combine=args.combine,
                      token_tile=args.token_tile if mode == "sla_tiled" else None)
        return lambda: (sla.remove_sla(model), model.reset_attention_backend())
    if mode == "noop":
        install_noop_self_attention(model)
        return lambda: (sla.remove_sla(model), model.reset_attention_backend())
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, warmup: int, iters: int):
    """Median / min wall time of ``fn`` over ``iters`` runs after ``warmup`` runs, and the peak memory of the
    timed runs (GPU only)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), min(times), peak


def forward_step(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def train_step(model, inputs, target):
    out = model(**inputs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    for p in model.parameters():  # the next step starts clean (as optimizer.zero_grad(set_to_none=True))
        p.grad = None
    return loss


def _sla_block_counts(tokens: int, args) -> dict:
    """Key blocks per row in each class for this sequence (the operator's counting rule, issue 2)."""
    from sla.ops.sla.blockmap import class_counts

    t_n = -(-tokens // args.block_k)
    n_crit, n_negl = class_counts(args.critical, args.negligible, t_n)
    return {"query_blocks": -(-tokens // args.block_q), "key_blocks": t_n, "critical": n_crit,
            "negligible": n_negl, "marginal": t_n - n_crit - n_negl, "block_sparsity": 1 - n_crit / t_n}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def run(args) -> dict:
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    diffusers_logging.set_verbosity_error()  # silences the per-call "attention backends are experimental" note

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        config, (frames, height, width) = TINY, (9, 128, 128)
    else:
        config = MODELS[args.model]
        frames, height, width = RESOLUTIONS[args.resolution or DEFAULT_RESOLUTION[args.model]]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if device.type != "cuda":
        # SDPA's flash/cuDNN backends exist on CUDA only; on CPU the dense baseline is PyTorch's default SDPA.
        modes = ["native" if m in ("flash", "cudnn") else m for m in modes]
        modes = list(dict.fromkeys(modes))
    dense_backend_default = "_native_flash" if device.type == "cuda" else "native"

    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    inputs, tokens = make_inputs(config, frames, height, width, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    train = args.train if args.train is not None else (args.model == "1.3b" or args.tiny)
    if train and args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    from sla.ops.sla.interface import resolve_backend

    result = {
        "benchmark": "bench_e2e",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "model": "tiny" if args.tiny else f"Wan2.1-{args.model.upper()}",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "params": n_params,
        "dtype": str(dtype).replace("torch.", ""),
        "video": {"frames": frames, "height": height, "width": width},
        "latent_shape": list(inputs["hidden_states"].shape),
        "tokens": tokens,
        "text_tokens": TEXT_TOKENS,
        "sla": {"critical": args.critical, "negligible": args.negligible, "block_q": args.block_q,
                "block_k": args.block_k, "feature_map": args.feature_map, "linear_scope": args.linear_scope,
                "backend": args.backend, "resolved_backend": resolve_backend(args.backend, device)
                if args.backend == "auto" else args.backend, "combine": args.combine,
                "token_tile_of_sla_tiled": list(args.token_tile)},
        "sla_blocks": _sla_block_counts(tokens, args),
        "gradient_checkpointing": bool(train and args.grad_checkpointing),
        "warmup": args.warmup,
        "iters": args.iters,
        "build_seconds": round(build_s, 2),
        "rows": [],
    }
    target = torch.randn(inputs["hidden_states"].shape, device=device, dtype=torch.float32,
                         generator=torch.Generator(device=device).manual_seed(1)) if train else None
    steps = [("forward", lambda: forward_step(model, inputs))]
    if train:
        model.train()
        steps.append(("train", lambda: train_step(model, inputs, target)))
    for mode in tqdm(modes, desc="modes", disable=args.quiet):
        undo = set_mode(model, mode, args, dense_backend_default)
        try:
            for step, fn in steps:
                row = {"mode": mode, "step": step}
                try:
                    med, best, peak = time_steps(fn, device, args.warmup, args.iters)
                    row.update(ms=med * 1e3, min_ms=best * 1e3, peak_gib=peak)
                    if step == "forward":
                        row["finite"] = bool(torch.isfinite(forward_step(model, inputs)).all())
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not _is_oom(err):
                        raise
                    row.update(ms=None, error="out of memory")
                    for p in model.parameters():  # drop partial gradients before the next mode
                        p.grad = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                result["rows"].append(row)
                if not args.quiet:
                    tqdm.write(f"{mode:>6} {step:>7}: " + (f"{row['ms']:.1f} ms" if row.get("ms") else row["error"]))
        finally:
            undo()
    _derive(result)
    return result


def _derive(result: dict) -> None:
    """Self-attention time (mode - noop), its share, and speedups vs the dense baselines, per step kind."""
    by = {(r["mode"], r["step"]): r for r in result["rows"]}
    for r in result["rows"]:
        noop = by.get(("noop", r["step"]))
        if r["mode"] != "noop" and r.get("ms") and noop and noop.get("ms"):
            r["self_attention_ms"] = max(r["ms"] - noop["ms"], 0.0)
            r["self_attention_share"] = r["self_attention_ms"] / r["ms"]
        for base in ("flash", "cudnn", "native"):
            b = by.get((base, r["step"]))
            if b and b.get("ms") and r.get("ms") and r["mode"] not in (base, "noop"):
                r[f"speedup_vs_{base}"] = b["ms"] / r["ms"]


def to_markdown(result: dict) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    s = result["sla"]
    lines = [
        f"### {result['model']} end to end, {result['video']['frames']} frames "
        f"{result['video']['width']}x{result['video']['height']} ({result['tokens']} tokens), batch 1, "
        f"{result['dtype']}, random weights",
        "",
        f"{result['device']}, torch {result['torch']}, diffusers {result['diffusers']}, commit {result['commit']}; "
        f"SLA critical={s['critical']}, negligible={s['negligible']}, blocks {s['block_q']}x{s['block_k']}, "
        f"{s['feature_map']}/{s['linear_scope']}, backend {s['resolved_backend']} "
        f"({result['sla_blocks']['critical']} of {result['sla_blocks']['key_blocks']} key blocks critical, "
        f"{result['sla_blocks']['negligible']} negligible); median of {result['iters']} "
        f"after {result['warmup']} warm-up; train step = forward + backward"
        + (" with gradient checkpointing" if result["gradient_checkpointing"] else "") + ".",
        "",
        "| mode | step | time/step (ms) | self-attention (ms) | self-attn share | vs flash (CPU: native) | vs cuDNN "
        "| peak mem (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        share = r.get("self_attention_share")
        lines.append(
            f"| {r['mode']} | {r['step']} | {f(r.get('ms'), '.1f') if r.get('ms') else r.get('error', '-')} | "
            f"{f(r.get('self_attention_ms'), '.1f')} | {'-' if share is None else f'{100 * share:.0f}%'} | "
            f"{f(r.get('speedup_vs_flash') or r.get('speedup_vs_native'), '.2f')} | "
            f"{f(r.get('speedup_vs_cudnn'), '.2f')} | {f(r.get('peak_gib'), '.1f')} |")
    lines.append("")
    lines.append("Self-attention time = step time minus the `noop` step time (self-attention core replaced by "
                 "returning v; projections, norms, RoPE, cross-attention and MLP still run). In `sla`, `sla_tiled` "
                 "and `noop` cross-attention runs on the flash backend. Peak memory = max allocated during the timed runs, "
                 "weights included.")
    return "\n".join(lines) + "\n"


def write_results(out: str, result: dict, md: str) -> None:
    """``result`` as JSON to ``out`` and ``md`` beside it (same stem, ``.md``), each written atomically; prints
    the table and both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    md_path = os.path.splitext(out)[0] + ".md"
    atomic_write_text(md_path, md)
    print(md)
    print(f"wrote {out} and {md_path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="End-to-end Wan2.1 transformer step time: dense SDPA (flash, cuDNN) vs SLA, forward and "
                    "training step, with the self-attention share and peak memory. Writes JSON (--out) and a "
                    "Markdown table (same path, .md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path; the Markdown table goes to the same stem + .md")
    p.add_argument("--model", choices=sorted(MODELS), default="1.3b", help="Wan2.1 transformer configuration")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default=None,
                   help="video size (81 frames); default 480p for 1.3b, 720p for 14b")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {MODES}")
    p.add_argument("--train", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a training step (default: on for 1.3b, off for 14b)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="checkpoint each block in the training step, as fine-tuning at 32K+ tokens does (without it "
                        "the activations of every block stay in memory)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs per mode and step, Triton compiles here (default 2; 1 for 14b)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs per mode and step, median reported (default 5; 2 for 14b)")
    p.add_argument("--critical", type=float, default=0.05)
    p.add_argument("--negligible", type=float, default=0.10)
    p.add_argument("--block-q", type=int, default=64)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--feature-map", default="softmax")
    p.add_argument("--linear-scope", default="marginal")
    p.add_argument("--backend", default="auto", help="SLA backend: auto (Triton on CUDA), triton, torch")
    p.add_argument("--combine", default="auto",
                   help="SLA combination rule (default auto: mass in `sla`, pooled_cov in `sla_tiled`)")
    p.add_argument("--token-tile", type=token_tile, default=(4, 4, 4),
                   help="F,H,W token tile of the `sla_tiled` mode (default: 4,4,4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true",
                   help="2-layer model and a 9x128x128 video (192 tokens): checks the script fast")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    big = args.model == "14b" and not args.tiny
    args.warmup = (1 if big else 2) if args.warmup is None else args.warmup
    args.iters = (2 if big else 5) if args.iters is None else args.iters
    if args.tiny and args.block_q == 64 and args.block_k == 64:
        args.block_q = args.block_k = 16  # the tiny video has 192 tokens
    result = run(args)
    write_results(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
