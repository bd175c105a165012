"""The built-in small video DiT: a small diffusers ``WanTransformer3DModel`` for the synthetic set.

Same architecture as Wan2.1 (patch embedding, 3D RoPE, QK-RMSNorm self-attention, dense cross-attention to
text, AdaLN-style modulation), scaled down so it trains on a CPU: 4 layers, width 128, 2 heads of 64. It
works in pixel space (no VAE): input and output are ``(B, 3, F, H, W)``; at the synthetic defaults
(16 x 64 x 64) and patch ``(1, 4, 4)`` one clip is 4096 tokens (64 blocks of 64 per attention row).

The checkpoint in ``sla/assets/small_wan/`` (``save_pretrained`` layout: ``config.json`` +
``diffusion_pytorch_model.safetensors``) was pretrained with full attention by ``scripts/pretrain_small.py``;
``training_log.csv`` and ``pretrain_info.json`` beside it say how.

diffusers is imported lazily (it is an optional extra).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def small_model_path() -> Path:
    """Folder of the shipped checkpoint (inside the installed package)."""
    return Path(__file__).resolve().parent.parent / "assets" / "small_wan"


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        raise ImportError("the small model is a diffusers WanTransformer3DModel; install the extra: "
                          "pip install 'sparse-linear-attention[diffusers]'") from e
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel


def build_small_model(seed: int | None = 0, **overrides):
    """A randomly initialised small Wan transformer (float32). ``overrides`` change config entries."""
    import torch

    Wan = _require_diffusers()
    unknown = set(overrides) - set(SMALL_WAN_CONFIG)
    if unknown:
        raise ValueError(f"unknown small-model config key(s) {sorted(unknown)}; known: {sorted(SMALL_WAN_CONFIG)}")
    cfg = {**SMALL_WAN_CONFIG, **overrides}
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
    """Load the shipped pretrained small model (or a ``save_pretrained`` folder at ``path``).

    ``torch_dtype`` is passed to ``from_pretrained``, which keeps the modules diffusers wants in float32 (time
    embedding, norms) in float32; ``dtype`` casts everything after loading.

    Raises ``FileNotFoundError`` with a hint when the folder or its weights are missing, ``ValueError``
    when the weights file is unreadable.
    """
    Wan = _require_diffusers()
    folder = Path(path) if path is not None else small_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model at {folder} (config.json missing); pass the folder written by "
                                "save_pretrained, or reinstall the package to get the shipped checkpoint")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors weights in {folder}; re-run scripts/pretrain_small.py "
                                "or pass another folder")
    try:
        model = Wan.from_pretrained(str(folder), **dtype_kwargs(torch_dtype))
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"could not load the model in {folder}: {e}") from e
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
