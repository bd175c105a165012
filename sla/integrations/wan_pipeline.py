"""A local diffusers Wan pipeline folder: checking its layout, loading it with SLA, generating and timing.

Used by ``sla prepare`` (its VAE and text encoder), ``sla sample --pipeline`` and ``bench/bench_pipeline.py``.
Accepted: text-to-video ``WanPipeline`` folders as the Wan-AI ``*-Diffusers`` repositories ship them (Wan2.1 T2V
1.3B/14B, Wan2.2 T2V A14B with ``transformer/`` + ``transformer_2/``, Wan2.2 TI2V 5B) and the folders
:func:`sla.testing.make_tiny_wan_pipeline` writes. What is tested (on CPU) is the Wan2.1 layout and the
two-transformer layout at tiny size; no real Wan weights are available offline.

The VAE is always loaded in float32, as the Wan authors and diffusers' examples do: its decode is sensitive to
precision, and it is a small part of the time.

Generation (:func:`generate_video`) calls the pipeline's own ``encode_prompt`` and ``__call__`` (with
``output_type="latent"``) and decodes the latents the way ``WanPipeline`` does (``z * latents_std +
latents_mean``, then ``vae.decode``), so that the three stages can be timed separately.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

TEXT_TO_VIDEO_CLASSES = ("WanPipeline",)
TRANSFORMER_SLOTS = ("transformer", "transformer_2")
ENCODING_COMPONENTS = ("vae", "text_encoder", "tokenizer")
SAMPLING_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def read_pipeline_index(path: str | os.PathLike, *, arg: str = "--pipeline",
                        need: tuple[str, ...] = SAMPLING_COMPONENTS, need_transformer: bool = True) -> dict:
    """Check that ``path`` is a text-to-video Wan pipeline folder with the components in ``need`` (and at least
    one transformer when ``need_transformer``); returns its ``model_index.json``. Errors name ``arg`` and the fix."""
    folder = Path(path)
    layout = ("a diffusers Wan pipeline folder: model_index.json plus transformer/, vae/, text_encoder/, "
              "tokenizer/ and scheduler/, as in Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    if not folder.is_dir():
        raise FileNotFoundError(f"{arg} {folder} does not exist or is not a folder; pass {layout}")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        hint = ""
        if (folder / "config.json").is_file():
            hint = (" It holds config.json: it is one model's folder (e.g. a transformer), not a pipeline; pass the "
                    "folder above it.")
        elif folder.parent != folder and (folder.parent / "model_index.json").is_file():
            hint = f" Its parent {folder.parent} is a pipeline folder; pass that."
        raise FileNotFoundError(f"{arg} {folder} has no model_index.json, so it is not a diffusers pipeline folder."
                                f"{hint} Expected {layout}")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{arg} {folder}: model_index.json is not valid JSON ({e})") from e
    cls = index.get("_class_name")
    if cls not in TEXT_TO_VIDEO_CLASSES:
        extra = (" Image-to-video and VACE pipelines need image or control inputs that this tool does not provide."
                 if isinstance(cls, str) and cls.startswith("Wan") else "")
        raise ValueError(f"{arg} {folder} holds a {cls!r} pipeline; this tool runs the text-to-video "
                         f"{' / '.join(TEXT_TO_VIDEO_CLASSES)} (Wan2.1 T2V, Wan2.2 T2V A14B and TI2V 5B).{extra}")
    wanted = list(need) + ([s for s in TRANSFORMER_SLOTS if _declared(index, s)] if need_transformer else [])
    missing = [c for c in need if not _declared(index, c)]
    if need_transformer and not any(_declared(index, s) for s in TRANSFORMER_SLOTS):
        missing.append("transformer")
    if missing:
        raise ValueError(f"{arg} {folder}: model_index.json declares no {', '.join(missing)}; expected {layout}")
    absent = [c for c in wanted if not (folder / c).is_dir()]
    if absent:
        plural = len(absent) > 1
        raise FileNotFoundError(f"{arg} {folder}: model_index.json names {', '.join(absent)} but the "
                                f"folder{'s' if plural else ''} {', '.join(c + '/' for c in absent)} "
                                f"{'are' if plural else 'is'} missing; copy the complete pipeline")
    return index


def _declared(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def transformer_slots(index: dict) -> list[str]:
    """``["transformer"]`` or ``["transformer", "transformer_2"]`` (Wan2.2 A14B)."""
    return [s for s in TRANSFORMER_SLOTS if _declared(index, s)]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is visible; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA (how Wan runs), float32 on CPU (bfloat16 matmuls are slow there)."""
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    return table[name]


def _quiet_loading():
    # Loading prints a progress bar per component and per weights file; the tools print their own progress.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# ------------------------------------------------------------------------------------------------------------
# loading for encoding (sla prepare)
# ------------------------------------------------------------------------------------------------------------

def load_encoding_pipeline(path: str | os.PathLike, device: torch.device, text_dtype: torch.dtype,
                           arg: str = "--pipeline"):
    """The pipeline with its VAE (float32), text encoder (``text_dtype``) and tokenizer, without loading any
    transformer (the largest part of a real pipeline, not needed to encode)."""
    read_pipeline_index(path, arg=arg, need=ENCODING_COMPONENTS, need_transformer=False)
    from ..models.small_wan import dtype_kwargs, require_pretrained_loading

    require_pretrained_loading(f"loading the pipeline {arg} {path}")
    from diffusers import AutoencoderKLWan, WanPipeline

    _quiet_loading()
    vae = AutoencoderKLWan.from_pretrained(str(path), subfolder="vae", **dtype_kwargs(torch.float32))
    pipe = WanPipeline.from_pretrained(str(path), vae=vae, transformer=None, transformer_2=None,
                                       **dtype_kwargs(text_dtype))
    pipe.vae.to(device).eval()
    pipe.text_encoder.to(device).eval()
    return pipe


def latent_stats(vae, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the VAE's latents, shaped ``(1, z_dim, 1, 1, 1)``: model space is ``(z - mean) / std``."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=device).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=device).view(1, z, 1, 1, 1)
    return mean, std


# ------------------------------------------------------------------------------------------------------------
# loading for sampling, with SLA
# ------------------------------------------------------------------------------------------------------------

def describe_sla_source(spec: str | os.PathLike, arg: str) -> str:
    """What ``--sla DIR`` holds: ``"finetuned"`` (an ``sla finetune`` ``final/`` folder, or any transformer folder
    with ``sla_config.json`` beside ``config.json``: the whole transformer is replaced) or ``"sla_only"`` (a
    :func:`sla.save_sla` folder: the SLA settings and projections go onto the pipeline's own transformer)."""
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{arg} {folder} does not exist; pass the final/ folder of `sla finetune` or a "
                                "folder written by sla.save_sla")
    has_config = (folder / "config.json").is_file()
    if (folder / "finetune_info.json").is_file() or (has_config and (folder / "sla_config.json").is_file()):
        return "finetuned"
    if (folder / "sla_config.json").is_file():
        return "sla_only"
    hint = ""
    if (folder / "final" / "config.json").is_file():
        hint = f" It looks like an `sla finetune` output folder: pass {folder / 'final'}."
    elif has_config:
        hint = " It holds a transformer without SLA (no sla_config.json, no finetune_info.json)."
    raise ValueError(f"{arg} {folder} holds neither an `sla finetune` export (finetune_info.json) nor SLA weights "
                     f"(sla_config.json).{hint}")


# Configuration keys that decide whether a fine-tuned transformer fits the pipeline's own (same architecture).
_ARCH_KEYS = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
              "ffn_dim", "num_layers", "image_dim", "added_kv_proj_dim")


def _check_same_architecture(finetuned: Path, base: Path, arg: str) -> None:
    a = json.loads((finetuned / "config.json").read_text())
    b = json.loads((base / "config.json").read_text())
    diff = [k for k in _ARCH_KEYS if a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{arg} {finetuned} is a transformer with another architecture than the pipeline's "
                         f"{base} ({', '.join(f'{k}: {a.get(k)} vs {b.get(k)}' for k in diff)}); pass the "
                         "fine-tuning of this pipeline's transformer")


def load_pipeline(path: str | os.PathLike, *, sla: str | None = None, sla_2: str | None = None,
                  untrained_sla: dict | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, arg: str = "--pipeline"):
    """Load a text-to-video Wan pipeline and install SLA in its transformer(s).

    ``sla`` / ``sla_2``: SLA for ``transformer`` / ``transformer_2``: an ``sla finetune`` ``final/`` folder
    (replaces the transformer with the fine-tuned one) or an :func:`sla.save_sla` folder (loaded onto the
    pipeline's transformer with :func:`sla.load_sla`); ``"dense"`` keeps that transformer dense on purpose.
    ``untrained_sla``: :func:`sla.apply_sla` settings for every transformer (zero projections: sparse-only
    attention), for speed checks before fine-tuning. Returns ``(pipe, attention)`` where ``attention`` maps each
    transformer slot to a description of what it runs.
    """
    device = torch.device(device)
    index = read_pipeline_index(path, arg=arg)
    slots = transformer_slots(index)
    specs = {"transformer": sla, "transformer_2": sla_2}
    if untrained_sla is not None and (sla is not None or sla_2 is not None):
        raise ValueError("--sla-untrained applies fresh SLA to every transformer; do not combine it with --sla/--sla-2")
    if sla_2 is not None and "transformer_2" not in slots:
        raise ValueError(f"--sla-2 {sla_2} given, but {arg} {path} has one transformer (no transformer_2/); drop "
                         "--sla-2")
    if "transformer_2" in slots and sla not in (None, "dense") and sla_2 is None:
        raise ValueError(f"{arg} {path} has two transformers (Wan2.2 A14B: transformer/ for the high-noise steps, "
                         "transformer_2/ for the low-noise ones) and only --sla was given; pass --sla-2 for the second "
                         "as well (or --sla-2 dense to keep it dense on purpose)")
    if sla == "dense":
        specs["transformer"] = None
    kinds = {}
    for slot in slots:
        spec = specs[slot]
        if spec is None or spec == "dense":
            continue
        flag = "--sla" if slot == "transformer" else "--sla-2"
        kinds[slot] = describe_sla_source(spec, flag)
        if kinds[slot] == "finetuned":
            _check_same_architecture(Path(spec), Path(path) / slot, flag)

    from ..models.small_wan import dtype_kwargs, require_pretrained_loading

    require_pretrained_loading(f"loading the pipeline {path}")
    from diffusers import AutoencoderKLWan, WanPipeline

    from ..training.checkpoint import load_finetuned
    from .diffusers import apply_sla, load_sla

    _quiet_loading()
    overrides, infos = {}, {}
    for slot, kind in kinds.items():
        if kind == "finetuned":
            # Loading the fine-tuned transformer instead of the pipeline's own avoids reading the base weights.
            overrides[slot], infos[slot] = load_finetuned(specs[slot], torch_dtype=dtype)
    vae = AutoencoderKLWan.from_pretrained(str(path), subfolder="vae", **dtype_kwargs(torch.float32))
    pipe = WanPipeline.from_pretrained(str(path), vae=vae, **dtype_kwargs(dtype), **overrides)
    attention = {}
    for slot in slots:
        model = getattr(pipe, slot)
        if slot in infos:
            mode = infos[slot].get("attention", "full")
            attention[slot] = f"fine-tuned ({mode}) from {specs[slot]}"
        elif kinds.get(slot) == "sla_only":
            load_sla(model, specs[slot])
            attention[slot] = f"sla from {specs[slot]}"
        elif untrained_sla is not None:
            apply_sla(model, **untrained_sla)
            attention[slot] = "sla, untrained (zero projections: sparse-only)"
        else:
            attention[slot] = "dense"
    pipe.to(device)
    return pipe, attention


# ------------------------------------------------------------------------------------------------------------
# generation, timed by stage
# ------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> video ``(B, 3, F, H, W)`` in [-1, 1], as ``WanPipeline`` decodes them."""
    vae = pipe.vae
    mean, std = latent_stats(vae, device=latents.device, dtype=vae.dtype)
    z = latents.to(vae.dtype) * std + mean
    return vae.decode(z, return_dict=False)[0]


def to_uint8_frames(video: torch.Tensor):
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _sla_probe_modules(model) -> list:
    return [(n, m) for n, m in model.named_modules() if n.endswith(".sla")]


@torch.no_grad()
def measure_sparsity(model, call_kwargs: dict) -> dict | None:
    """Run ``model(**call_kwargs)`` once with a hook on every SLA module that classifies its q/k blocks the way
    the operator does; returns the token-pair sparsity of the exact branch (mean / min / max over layers), or
    ``None`` when the model runs no SLA."""
    from ..ops.sla.blockmap import build_block_map

    modules = _sla_probe_modules(model)
    if not modules:
        return None
    values = []

    def hook(module, args):
        q, k = args[0], args[1]
        if hasattr(module, "critical"):
            bm = build_block_map(q, k, critical=module.critical, negligible=module.negligible,
                                 block_q=module.block_q, block_k=module.block_k)
            values.append(bm.sparsity())
        else:  # linear-only attention: no exact branch at all
            values.append(1.0)

    handles = [m.register_forward_pre_hook(hook) for _, m in modules]
    try:
        model(**call_kwargs)
    finally:
        for h in handles:
            h.remove()
    from .context_parallel import ulysses_group

    group = ulysses_group(getattr(model, "_parallel_config", None), "measure_sparsity")
    if group is not None:
        # Under Ulysses context parallelism each rank's SLA layers hold 1/N of the heads (with every token): the
        # layer's sparsity is the mean of its ranks' (equal head counts).
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=next(model.parameters()).device)
        dist.all_reduce(t, group=group)
        values = (t / dist.get_world_size(group)).tolist()
    return dict(mean=sum(values) / len(values), min=min(values), max=max(values), sla_layers=len(values),
                self_attention_layers=model.config.num_layers)


@torch.no_grad()
def generate_video(pipe, prompt: str, *, negative_prompt: str = "", height: int = 480, width: int = 832,
                   num_frames: int = 81, steps: int = 50, guidance_scale: float = 5.0, seed: int = 0,
                   max_sequence_length: int = 512, sparsity: bool = True, progress: bool = True) -> dict:
    """Generate one video; returns ``frames`` ``(F, H, W, 3)`` uint8 and the timings in seconds.

    Stages, each synchronised on CUDA: ``text_encoding`` (prompt and, with guidance, negative prompt),
    ``denoising`` (every step, ``step_seconds`` per step: a step is one transformer call, two with
    classifier-free guidance, plus the scheduler), ``vae_decode``. The noise comes from a CPU generator
    seeded with ``seed``, so a seed gives the same video on every device up to arithmetic. With
    ``sparsity`` the first call of each transformer is replayed afterwards (not timed) with hooks that measure
    the attention sparsity SLA achieves on it.
    """
    device = pipe._execution_device
    if (num_frames - 1) % pipe.vae_scale_factor_temporal:
        raise ValueError(f"--frames must be 4k+1 for the Wan VAE (e.g. 81, 49, 17), got {num_frames}")
    multiple = pipe.vae_scale_factor_spatial * 2  # the transformer's 2x2 patches
    for name, v in (("height", height), ("width", width)):
        if v % multiple:
            raise ValueError(f"--{name} must be a multiple of {multiple} (VAE factor x patch), got {v}")
    pipe.set_progress_bar_config(disable=not progress, desc="denoising")
    use_cfg = guidance_scale > 1.0
    _sync(device)
    t0 = time.perf_counter()
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompt, negative_prompt if use_cfg else None, do_classifier_free_guidance=use_cfg,
        max_sequence_length=max_sequence_length, device=device)
    _sync(device)
    text_s = time.perf_counter() - t0

    slots = [s for s in TRANSFORMER_SLOTS if getattr(pipe, s, None) is not None]
    first_call, first_inputs, handles = [], {}, []

    def make_pre_hook(slot):
        def pre_hook(module, args, kwargs):
            if not first_call:
                _sync(device)
                first_call.append(time.perf_counter())
            if sparsity and slot not in first_inputs:
                first_inputs[slot] = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        return pre_hook

    for slot in slots:
        handles.append(getattr(pipe, slot).register_forward_pre_hook(make_pre_hook(slot), with_kwargs=True))
    step_ends = []

    def on_step_end(_pipe, i, t, callback_kwargs):
        _sync(device)
        step_ends.append(time.perf_counter())
        return {}

    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        _sync(device)
        t0 = time.perf_counter()
        latents = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, height=height,
                       width=width, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=generator, output_type="latent", callback_on_step_end=on_step_end).frames
        _sync(device)
        denoise_s = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    starts = first_call[:1] + step_ends[:-1]
    step_s = [end - start for start, end in zip(starts, step_ends)]

    _sync(device)
    t0 = time.perf_counter()
    video = decode_latents(pipe, latents)
    _sync(device)
    decode_s = time.perf_counter() - t0

    result = dict(frames=to_uint8_frames(video[0]), text_encoding_seconds=text_s, denoising_seconds=denoise_s,
                  step_seconds=step_s, vae_decode_seconds=decode_s, total_seconds=text_s + denoise_s + decode_s,
                  latent_shape=list(latents.shape), finite=bool(torch.isfinite(latents).all()), steps=steps,
                  guidance_scale=guidance_scale,
                  transformer_calls_per_step=2 if use_cfg else 1)
    if step_s:
        ordered = sorted(step_s)
        result["median_step_seconds"] = ordered[len(ordered) // 2]
    if sparsity:
        result["sparsity"] = {slot: measure_sparsity(getattr(pipe, slot), first_inputs[slot])
                              for slot in slots if slot in first_inputs}
    return result
