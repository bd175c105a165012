"""Models that ``sla analyze`` can load by name or path, and the denoising loop that drives them.

* Built-in names live in :data:`BUILTIN_MODELS`. ``"tiny-random"`` is a deterministic, randomly
  initialised ``WanTransformer3DModel`` (seeded) whose default input gives 4096 video tokens, i.e. 64 key
  blocks of 64, so block sparsity up to 98% means something. Its weights are random: its attention
  statistics describe an untrained network, not a video model.
* A folder: a diffusers transformer saved with ``save_pretrained`` (``config.json`` + weights), or a
  pipeline folder with a ``transformer/`` subfolder (only the transformer is loaded).

The driver :func:`run_flow_matching` runs a plain Euler flow-matching loop (Wan's sampler family) from
seeded Gaussian latents, one model call per step, with text conditioning that is either seeded random
vectors or a saved ``prompt_embeds`` tensor. It needs no text encoder and no VAE, which is what makes
the analysis cheap; attention statistics depend on the conditioning, so pass real prompt embeddings
(``--prompt-embeds``) when you want numbers for real prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

TINY_RANDOM_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=256,
    num_layers=2,
    rope_max_seq_len=64,
)


@dataclass
class BuiltinModel:
    """A model ``sla analyze --model NAME`` can build. ``load(seed)`` returns the transformer (float32, CPU);
    ``latent_size`` is the default ``(frames, height, width)`` of its input, ``text_len`` its text length."""

    load: Callable[[int], torch.nn.Module]
    latent_size: tuple[int, int, int]
    text_len: int
    description: str
    # Optional: conditioning (1, text_len, text_dim) for the analysis; None = seeded random vectors.
    prompt_embeds: Callable[[], torch.Tensor] | None = field(default=None)
    # Sigma shift of the sampler the model was trained for.
    shift: float = 3.0


def build_tiny_random_wan(seed: int = 0) -> torch.nn.Module:
    """The ``tiny-random`` model: ``WanTransformer3DModel(**TINY_RANDOM_WAN_CONFIG)`` initialised under
    ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**TINY_RANDOM_WAN_CONFIG).eval()


def _embedded(name: str) -> BuiltinModel:
    """A shipped model (sla/models/small_wan.py), driven at the clip size it was trained on and conditioned on
    the caption of held-out synthetic clip 0, embedded exactly as in training."""
    from ..models.small_wan import data_config_for, embedded_model

    entry = embedded_model(name)

    def load(seed: int) -> torch.nn.Module:
        from ..models import load_small_model

        return load_small_model(name).eval()

    def prompt_embeds() -> torch.Tensor:
        from dataclasses import replace

        from ..data import SyntheticVideoDataset

        data = replace(data_config_for(entry.path), text_dim=entry.config["text_dim"])
        return SyntheticVideoDataset("val", size=1, config=data)[0]["text_embeds"][None]

    d = entry.data
    return BuiltinModel(load=load, latent_size=(d["frames"], d["height"], d["width"]), text_len=32,
                        prompt_embeds=prompt_embeds, shift=1.0,
                        description=f"the shipped Wan DiT `{name}` ({entry.description}; pixel space, pretrained "
                                    f"with full attention on the synthetic video set), conditioned on the caption "
                                    f"of held-out synthetic clip 0")


# Name -> model. Add an entry to make a model available as `sla analyze --model NAME`.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "small": _embedded("small"),
    "wan8k": _embedded("wan8k"),
    "tiny-random": BuiltinModel(
        load=build_tiny_random_wan, latent_size=(4, 64, 64), text_len=16,
        description="randomly initialised WanTransformer3DModel (2 layers, 4 heads of 32), 4096 video tokens; "
                    "random weights, so its statistics describe an untrained network"),
}


def load_transformer(spec: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> tuple[torch.nn.Module, BuiltinModel | None]:
    """Load ``spec`` (a built-in name or a folder). Returns ``(model, builtin)`` (``builtin`` None for a folder).

    Raises ``ValueError`` for an unknown name or a folder without a diffusers model in it.
    """
    if spec in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[spec]
        model = entry.load(seed).to(device)
        if dtype != torch.float32:
            model = model.to(dtype)
        return model.eval(), entry
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"--model {spec!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a folder; "
                         f"pass a folder written by save_pretrained (config.json + weights)")
    if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {str(folder)!r} has no config.json; pass a diffusers transformer folder "
                         f"(save_pretrained layout) or a pipeline folder with a transformer/ subfolder")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    from ..models.small_wan import require_pretrained_loading

    require_pretrained_loading(f"--model {str(folder)!r}")
    import diffusers

    cls = getattr(diffusers, class_name, None) if class_name else None
    if cls is None:
        raise ValueError(f"{config_path} names class {class_name!r}, which this diffusers ({diffusers.__version__}) "
                         f"does not have")
    model = cls.from_pretrained(str(folder), torch_dtype=dtype)
    return model.to(device).eval(), None


def check_drivable(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless :func:`run_flow_matching` knows how to call ``model``."""
    cfg = getattr(model, "config", {})
    needed = ("patch_size", "in_channels", "text_dim")
    if not all(k in cfg for k in needed) or len(cfg["patch_size"]) != 3:
        raise ValueError(
            f"sla analyze drives Wan-family video transformers (config with patch_size (t, h, w), in_channels, "
            f"text_dim); {type(model).__name__} is not one. Use the Python API instead: "
            f"sla.analysis.analyze_model(model, run_fn, ...) with run_fn calling your pipeline")


def token_count(model: torch.nn.Module, latent_size: tuple[int, int, int]) -> int:
    """Video tokens per sample for a latent ``(frames, height, width)``, after patching."""
    pt, ph, pw = model.config["patch_size"]
    f, h, w = latent_size
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent_size {latent_size} must be divisible by the patch size "
                         f"{tuple(model.config['patch_size'])}")
    return (f // pt) * (h // ph) * (w // pw)


@torch.no_grad()
def run_flow_matching(model: torch.nn.Module, *, num_steps: int, latent_size: tuple[int, int, int], text_len: int,
                      seed: int = 0, shift: float = 3.0, prompt_embeds: torch.Tensor | None = None,
                      progress: bool = True) -> torch.Tensor:
    """Denoise seeded Gaussian latents with ``num_steps`` Euler flow-matching steps, one model call per step.

    Sigmas run from 1 to 0, warped by ``shift`` as in Wan's scheduler (``s' = shift*s / (1 + (shift-1)*s)``);
    the model gets ``timestep = 1000 * sigma``. ``prompt_embeds`` ``(1, text_len, text_dim)`` conditions the
    model; without it, seeded standard-normal vectors stand in for text. Returns the final latents.
    """
    from tqdm.auto import tqdm

    check_drivable(model)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = latent_size
    token_count(model, latent_size)
    latents = torch.randn(1, cfg["in_channels"], frames, height, width, generator=gen).to(device, dtype)
    if prompt_embeds is None:
        prompt_embeds = torch.randn(1, text_len, cfg["text_dim"], generator=gen)
    elif prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cfg["text_dim"]:
        raise ValueError(f"prompt_embeds must be (batch, text_len, {cfg['text_dim']}), "
                         f"got {tuple(prompt_embeds.shape)}")
    prompt_embeds = prompt_embeds[:1].to(device, dtype)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    for i in tqdm(range(num_steps), desc="denoising", disable=not progress, leave=False):
        t = torch.tensor([float(sigmas[i]) * 1000.0], device=device)
        velocity = model(latents, t, prompt_embeds, return_dict=False)[0]
        latents = latents + float(sigmas[i + 1] - sigmas[i]) * velocity
    return latents
