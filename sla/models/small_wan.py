"""The built-in video DiTs: small diffusers ``WanTransformer3DModel`` checkpoints for the synthetic video set.

Both have Wan2.1's architecture (patch embedding, 3D RoPE, QK-RMSNorm self-attention, dense cross-attention
to text, AdaLN-style modulation), scaled down, and work in pixel space (no VAE): input and output are
``(B, 3, F, H, W)``. Each lives in a ``save_pretrained`` folder under ``sla/assets/`` together with
``synthetic_data.json`` (the :class:`~sla.data.synthetic.SyntheticVideoConfig` it was trained on, so every
command feeds it clips of the right size), ``training_log.csv`` and ``pretrain_info.json``.

* ``"small"`` (the first testbed): 4,096 tokens (16 frames of 64x64 pixels, patch (1, 4, 4): 64 key
  blocks of 64 per attention row), on plain backgrounds. Its attention is flat: the 5% critical blocks hold
  about a quarter of the attention mass (docs/analysis.md), a hard case for 95% sparsity.
* ``"wan8k"``: 8,192 tokens (8 frames of 64x64, patch (1, 2, 2): 128 key blocks per row), 6 layers of 2 heads
  of 128, on textured, slowly panning backgrounds; pretrained on one H200 in 470 s. Its attention is local in
  layers 0-3 (with 4x4x4 token tiles the critical blocks hold 0.55-0.87 of the mass) and flat in layers 4-5,
  so it does not pass the premise gate (docs/results.md, "Testbed search"). It is the default of every command
  (``DEFAULT_MODEL``): the model on which SLA's rules were compared and its best result measured.

diffusers is imported lazily (it is an optional extra).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

DATA_CONFIG_NAME = "synthetic_data.json"

SMALL_WAN_CONFIG = dict(
    patch_size=(1, 4, 4),
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

WAN8K_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=128,
    in_channels=3,
    out_channels=3,
    text_dim=64,
    freq_dim=64,
    ffn_dim=1024,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

# What each model is trained on (keyword arguments of SyntheticVideoConfig).
SMALL_DATA = dict(frames=16, height=64, width=64)
WAN8K_DATA = dict(frames=8, height=64, width=64, background="texture", pan_speed=1.5)


@dataclass(frozen=True)
class EmbeddedModel:
    """A built-in model: its asset folder (under ``sla/assets``), architecture and training data."""

    name: str
    folder: str
    config: dict
    data: dict
    description: str = field(default="", compare=False)

    @property
    def path(self) -> Path:
        return Path(__file__).resolve().parent.parent / "assets" / self.folder


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "wan8k": EmbeddedModel(
        "wan8k", "wan8k", WAN8K_CONFIG, WAN8K_DATA,
        "the 8,192-token testbed (6 layers, 2 heads of 128; 8x64x64 textured panning clips, 128 key blocks per "
        "row; attention local in layers 0-3, flat in 4-5)"),
    "small": EmbeddedModel(
        "small", "small_wan", SMALL_WAN_CONFIG, SMALL_DATA,
        "the first 4,096-token testbed (4 layers, 2 heads of 64; 16x64x64 plain clips, flat attention)"),
}
DEFAULT_MODEL = "wan8k"

# Fine-tuned from a built-in model on a GPU (seed 0 of its experiment, docs/results.md) and shipped, so that the CPU
# quickstart can show what fine-tuning at 95% sparsity gives without hours of CPU: model -> arm names (folders).
SHIPPED_FINETUNED = {
    "wan8k": ("sparse_only", "sla_pooled_cov"),  # 4x4x4 token tiles; int8 deltas from wan8k (weight_delta.py)
    "small": ("sparse_only", "sla_paper", "sla_mass"),  # raster blocks; transformers in bfloat16
}
_FINETUNED_FOLDERS = {"wan8k": "wan8k_finetuned", "small": "small_wan_finetuned"}


def shipped_finetuned_path(arm: str, model: str = "small") -> Path:
    """Folder of a shipped fine-tuned model of the built-in ``model`` (an ``sla finetune`` ``final/`` folder)."""
    if arm not in SHIPPED_FINETUNED.get(model, ()):
        raise ValueError(f"no shipped fine-tuned model {arm!r} of {model!r}; there are "
                         + "; ".join(f"{m}: {', '.join(a)}" for m, a in SHIPPED_FINETUNED.items()))
    return Path(__file__).resolve().parent.parent / "assets" / _FINETUNED_FOLDERS[model] / arm


def shipped_experiment_results(model: str = "small") -> dict:
    """A controlled experiment's aggregated results (``scripts/quality_experiment.py report --ship``) shipped with
    the package: ``"small"``, the decisive experiment beside the fine-tuned small models; ``"wan8k"``, the
    experiments on the 8,192-token testbed (docs/results.md)."""
    folder = {"small": "small_wan_finetuned", "wan8k": "wan8k"}[model]
    path = Path(__file__).resolve().parent.parent / "assets" / folder / "experiment_results.json"
    return json.loads(path.read_text())


def embedded_model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; the built-in models are {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def small_model_path(name: str = "small") -> Path:
    """Folder of a shipped checkpoint (inside the installed package)."""
    path = embedded_model(name).path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the built-in model {name!r} has no checkpoint in this installation ({path}); "
                                f"train one with `python scripts/pretrain_small.py --preset {name} --out DIR` and pass "
                                f"DIR, or use the built-in 'small'")
    return path


def delta_base_folder(name: str) -> Path:
    """Folder of the model a weight delta (:mod:`sla.models.weight_delta`) is taken from: a built-in model only, so
    a shipped folder cannot point the loader at another file."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"a weight delta's base must be a built-in model ({sorted(EMBEDDED_MODELS)}), not {name!r}")
    return small_model_path(name)


def feature_net_for(data) -> Path:
    """The evaluation feature network for clips of ``data`` (a :class:`~sla.data.synthetic.SyntheticVideoConfig`):
    the one trained on the wan8k clips (8 textured, panning frames) for those, else the first testbed's
    (``sla/assets/feature_net.safetensors``, trained on 16 plain frames)."""
    from dataclasses import replace

    from ..data.synthetic import SyntheticVideoConfig

    assets = Path(__file__).resolve().parent.parent / "assets"
    if data == replace(SyntheticVideoConfig(**WAN8K_DATA), text_dim=data.text_dim):
        return assets / "feature_net_wan8k.safetensors"
    return assets / "feature_net.safetensors"


def data_config_for(folder: str | os.PathLike | None):
    """The :class:`~sla.data.synthetic.SyntheticVideoConfig` a model folder was trained on: its
    ``synthetic_data.json`` if present (written by the pretraining script and copied by ``sla finetune``),
    otherwise the first testbed's clips (16 x 64 x 64, plain backgrounds)."""
    from ..data.synthetic import SyntheticVideoConfig

    if folder is not None:
        path = Path(folder) / DATA_CONFIG_NAME
        if path.is_file():
            try:
                values = json.loads(path.read_text())
                return SyntheticVideoConfig(**values)
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"{path} is not a valid synthetic data description ({e}); it should hold "
                                 f"SyntheticVideoConfig fields such as frames, height, width") from e
    return SyntheticVideoConfig(**SMALL_DATA)


def write_data_config(folder: str | os.PathLike, config) -> Path:
    """Write ``config`` (a SyntheticVideoConfig) as ``folder/synthetic_data.json``."""
    path = Path(folder) / DATA_CONFIG_NAME
    data = config.to_dict()
    data.pop("text_dim", None)  # follows the model's text_dim
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError("the built-in models are diffusers WanTransformer3DModel checkpoints; install the extra: "
                          "pip install 'sparse-linear-attention[diffusers]'") from e
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def require_pretrained_loading(what: str = "loading a diffusers model folder") -> None:
    """Raise ``ImportError`` naming the install command unless diffusers and accelerate are installed.

    diffusers' ``from_pretrained`` keeps some of a Wan transformer's modules in float32
    (``_keep_in_fp32_modules``), which only its accelerate-based loader can do; without accelerate it fails deep
    inside with "`low_cpu_mem_usage` cannot be False when `keep_in_fp32_modules` is True". Checked before loading
    so the error says what to install instead.
    """
    missing = [name for name in ("diffusers", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                          f"installed (diffusers loads Wan transformers only through accelerate); install "
                          f"{'it' if len(missing) == 1 else 'them'} with pip install 'sparse-linear-attention[diffusers]'")


def build_small_model(seed: int | None = 0, base: str | dict = "small", **overrides):
    """A randomly initialised Wan transformer (float32) with a built-in model's architecture (``base``: a name
    or a config dict); ``overrides`` change config entries."""
    import torch

    Wan = _require_diffusers()
    cfg = dict(embedded_model(base).config if isinstance(base, str) else base)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown model config key(s) {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(overrides)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Wan(**cfg)
    return Wan(**cfg)


def dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}`` for diffusers' ``from_pretrained``: newer releases
    renamed the argument and warn on the old name, older ones know only the old name (feature-detected from the
    deprecation message the renaming release added)."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else {"torch_dtype": dtype}


def load_small_model(path: str | os.PathLike | None = None, *, device=None, dtype=None, torch_dtype=None):
    """Load a shipped model (``path`` None = ``"small"``; or a built-in name) or any ``save_pretrained`` folder
    of a Wan transformer, as float32 unless ``torch_dtype``/``dtype`` say otherwise (checkpoints may be stored
    in bfloat16).

    ``torch_dtype`` is passed to ``from_pretrained``, which keeps the modules diffusers wants in float32 (time
    embedding, norms) in float32; ``dtype`` casts everything after loading.

    Raises ``FileNotFoundError`` with a hint when the folder or its weights are missing, ``ValueError``
    when the weights file is unreadable.
    """
    import torch

    Wan = _require_diffusers()
    require_pretrained_loading()
    if path is None:
        folder = small_model_path("small")
    elif isinstance(path, str) and path in EMBEDDED_MODELS:
        folder = small_model_path(path)
    else:
        folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model at {folder} (config.json missing); pass the folder written by "
                                "save_pretrained, or reinstall the package to get the shipped checkpoint")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in {folder}; re-run scripts/pretrain_small.py "
                                "or pass another folder")
    from .weight_delta import DELTA_WEIGHTS_NAME, WEIGHTS_NAME, delta_base_name, read_delta

    kwargs = dtype_kwargs(torch.float32 if torch_dtype is None else torch_dtype)
    if (folder / DELTA_WEIGHTS_NAME).is_file() and not (folder / WEIGHTS_NAME).is_file():
        # Stored as a difference from a built-in model (sla.models.weight_delta): build the base's module (so
        # from_pretrained's dtype rules apply as for any folder), then load base + delta into it.
        base = delta_base_folder(delta_base_name(folder))
        state = read_delta(folder, base)
        model = Wan.from_pretrained(str(base), **kwargs)
        model.load_state_dict(state, strict=True)
        model.register_to_config(_name_or_path=str(folder))
    else:
        try:
            model = Wan.from_pretrained(str(folder), **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"could not load the model in {folder}: {e}") from e
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
