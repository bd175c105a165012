"""A folder of pre-encoded latents plus conditioning embeddings, one safetensors file per clip.

This is the usual format for fine-tuning Wan-style models: the VAE and the text encoder run once, ahead of
training (``sla prepare``, :mod:`sla.data.prepare`), and training reads small tensors instead of videos.

Format (each ``<name>.safetensors`` in the folder, sorted by file name):

- ``latents``: ``(C, F, H, W)`` float (fp32/fp16/bf16), the VAE latent of one clip, already normalised the
  way the model expects (for Wan: ``(z - latents_mean) / latents_std``).
- ``text_embeds``: ``(text_len, text_dim)`` float, the text encoder's output for the clip's caption.

Optional metadata (safetensors ``__metadata__``, strings): ``caption``, and ``sla_prepare``, a JSON object
that ``sla prepare`` writes: the pipeline, the VAE's ``latents_mean``/``latents_std``, the clip size, the
caption length and the source clip (:attr:`LatentsDataset.prepare_info` reads it; ``sla finetune`` checks it
against the model). All files must share shapes (one batch = one stack). Items are dicts with ``video``
(the latents, float32), ``text_embeds`` (float32), ``index``, ``caption``: the same keys as
:class:`~sla.data.synthetic.SyntheticVideoDataset`, so the trainer takes either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .._paths import atomic_path

REQUIRED_KEYS = ("latents", "text_embeds")
PREPARE_KEY = "sla_prepare"  # metadata entry written by `sla prepare`


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            missing = [k for k in REQUIRED_KEYS if k not in keys]
            if missing:
                raise ValueError(f"latents file {path} lacks the tensor(s) {missing}; each file needs "
                                 f"{REQUIRED_KEYS} (see docs/finetuning.md, 'latents format')")
            tensors = {k: f.get_tensor(k) for k in REQUIRED_KEYS}
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"latents file {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         "re-create it with `sla prepare`") from e
    return tensors, meta


class LatentsDataset(torch.utils.data.Dataset):
    """Clips from a folder of ``*.safetensors`` files (see the module docstring for the format).

    Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` for an empty folder, a corrupt file,
    missing tensors or shapes that differ from the first file's.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"latents folder {self.folder} does not exist; create it with "
                                    "`sla prepare` or pass --data synthetic")
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"latents folder {self.folder} holds no *.safetensors files; create them with "
                             "`sla prepare`")
        first, meta = _load_file(self.files[0])
        self.prepare_info = read_prepare_info(meta, self.files[0])
        self.latent_shape = tuple(first["latents"].shape)
        self.text_shape = tuple(first["text_embeds"].shape)
        if len(self.latent_shape) != 4 or len(self.text_shape) != 2:
            raise ValueError(f"{self.files[0]}: latents must be (C, F, H, W) and text_embeds (text_len, text_dim), "
                             f"got {self.latent_shape} and {self.text_shape}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        t, meta = _load_file(path)
        if tuple(t["latents"].shape) != self.latent_shape or tuple(t["text_embeds"].shape) != self.text_shape:
            raise ValueError(f"{path}: shapes {tuple(t['latents'].shape)}, {tuple(t['text_embeds'].shape)} differ "
                             f"from the folder's first file ({self.latent_shape}, {self.text_shape}); all clips "
                             "must share one size")
        return dict(video=t["latents"].float(), text_embeds=t["text_embeds"].float(), index=int(index),
                    caption=meta.get("caption", ""))


def read_prepare_info(meta: dict, path) -> dict | None:
    """The ``sla_prepare`` record of a file's metadata (``None`` if the file was written by other tools)."""
    raw = meta.get(PREPARE_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"latents file {path}: its {PREPARE_KEY!r} metadata is not JSON ({e}); "
                         "re-create the file with `sla prepare`") from e


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a latents file without reading its tensors (``ValueError`` if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise ValueError(f"latents file {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e


def write_latents_example(path: str | os.PathLike, latents: torch.Tensor, text_embeds: torch.Tensor,
                          caption: str = "", prepare_info: dict | None = None) -> None:
    """Write one clip in the latents format, atomically: a temp file in the same folder, fsynced, then
    ``os.replace``d, so a reader (or a resumed ``sla prepare``) sees the whole file or none of it."""
    from safetensors.torch import save_file

    if latents.ndim != 4 or text_embeds.ndim != 2:
        raise ValueError(f"latents must be (C, F, H, W) and text_embeds (text_len, text_dim), got "
                         f"{tuple(latents.shape)} and {tuple(text_embeds.shape)}")
    path = Path(path)
    metadata = {"caption": caption}
    if prepare_info is not None:
        metadata[PREPARE_KEY] = json.dumps(prepare_info, sort_keys=True)
    # The temp name does not end in .safetensors, so LatentsDataset never lists a half-written file (and a resumed
    # `sla prepare` finds a killed run's leftovers by it).
    with atomic_path(path, tmp_name=path.name + ".tmp") as tmp:
        save_file({"latents": latents.contiguous().cpu(), "text_embeds": text_embeds.contiguous().cpu()}, str(tmp),
                  metadata=metadata)
