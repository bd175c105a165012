"""Training checkpoints (exact resume) and exported fine-tuned models.

Training checkpoint (``<output_dir>/checkpoints/step-XXXXXXX.pt``, written atomically: temp file in the
same folder, fsync, ``os.replace``): trainable parameters, optimizer state, EMA, step, every RNG state
(Python, NumPy, torch CPU and CUDA) and the config. Data order and per-sample noise are pure functions of
``(seed, step, sample position)``, so restoring the step restores the data position.

Exported model (``<output_dir>/final``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` loadable by
plain diffusers ``from_pretrained`` (SLA parameters are *not* in this file), plus, for attention modes with
parameters, ``sla_config.json`` + ``sla_weights.safetensors`` from :func:`sla.save_sla`, and
``finetune_info.json`` with the attention mode. :func:`load_finetuned` puts all of it back together.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")
INFO_NAME = "finetune_info.json"
_CKPT_FORMAT = "sla-finetune-checkpoint-v1"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(output_dir, step: int, payload: dict, keep: int = 2) -> Path:
    path = Path(output_dir) / "checkpoints" / f"step-{step:07d}.pt"
    atomic_torch_save({"format": _CKPT_FORMAT, "step": step, **payload}, path)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint; ``ValueError`` for a corrupt or foreign file, ``FileNotFoundError`` if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # Full unpickling: the file holds Python and NumPy RNG states besides tensors, which the
        # weights-only loader rejects. Resume only from checkpoints you wrote yourself.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it to resume "
                         "from the previous one, or start over without --resume") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CKPT_FORMAT:
        raise ValueError(f"{path} is not an `sla finetune` checkpoint (format {_CKPT_FORMAT})")
    for key in ("step", "trainable", "optimizer", "rng", "config"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    return ckpt


def _base_state_dict(model) -> dict:
    # Everything except SLA's own parameters (they go to sla_weights.safetensors via save_sla).
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".sla." not in k}


def export_model(model, folder: str | os.PathLike, info: dict) -> Path:
    """Write a fine-tuned model (see the module docstring). LoRA adapters must be fused before this call."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = model.module if hasattr(model, "module") else model
    root.save_config(str(folder))
    tmp = folder / ".tmp-diffusion_pytorch_model.safetensors"
    save_file(_base_state_dict(root), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "diffusion_pytorch_model.safetensors")
    from ..integrations.diffusers import is_sla_applied, save_sla

    if is_sla_applied(root) and any(p.numel() for n, p in root.named_parameters() if ".sla." in n):
        save_sla(root, folder)
    tmp_info = folder / f".tmp-{INFO_NAME}"
    tmp_info.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp_info, folder / INFO_NAME)
    return folder


def resolve_model_folder(spec: str) -> Path:
    """The transformer folder named by ``spec``: ``"small"``, a transformer folder (``config.json`` + weights,
    ``save_pretrained`` layout) or a diffusers pipeline folder, whose ``transformer/`` is taken. A pipeline
    with two transformers (Wan2.2 A14B) is refused: its transformers denoise different noise levels, so the
    caller must name one."""
    if spec == "small":
        from ..models.small_wan import small_model_path

        return small_model_path()
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"model {spec!r} does not exist; pass 'small', a diffusers transformer folder "
                                "(config.json + weights) or a Wan pipeline folder (the one with model_index.json "
                                "and transformer/)")
    if (folder / "transformer" / "config.json").is_file() and not (folder / "config.json").is_file():
        if (folder / "transformer_2" / "config.json").is_file():
            raise ValueError(
                f"model {spec!r} is a pipeline with two transformers (Wan2.2 A14B: transformer/ denoises the "
                f"high-noise steps, transformer_2/ the low-noise ones); fine-tune one at a time: pass "
                f"{folder / 'transformer'} or {folder / 'transformer_2'}")
        folder = folder / "transformer"  # a full pipeline folder: take its transformer
    if not (folder / "config.json").is_file():
        if (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"model {spec!r} is a pipeline folder without transformer/config.json; pass a "
                                    "pipeline that has its transformer, or the transformer folder itself")
        raise FileNotFoundError(f"model {spec!r}: no config.json in {folder}; pass 'small', a diffusers "
                                "transformer folder (save_pretrained layout) or a pipeline folder with transformer/")
    return folder


def pipeline_of(spec: str) -> Path | None:
    """The pipeline folder when ``spec`` names one or the ``transformer``/``transformer_2`` folder inside one
    (that is where the VAE's latent statistics live), else ``None``."""
    if spec == "small":
        return None
    folder = Path(spec)
    for candidate in (folder, folder.parent):
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def load_base_model(spec: str):
    """The transformer named by ``spec`` ("small" or a folder), with no SLA applied, float32."""
    folder = resolve_model_folder(spec)
    if (folder / INFO_NAME).is_file():
        raise ValueError(f"{folder} holds a fine-tuned model (it has {INFO_NAME}); load it with "
                         "sla.training.load_finetuned, or fine-tune from the original base model")
    from ..models.small_wan import load_small_model

    return load_small_model(folder)


def load_finetuned(folder: str | os.PathLike, torch_dtype=None):
    """Load a model written by :func:`export_model` (or a plain base model folder: then dense). Returns
    ``(model, info)``; ``info["attention"]`` names the attention mode installed. ``torch_dtype`` (default
    float32) is passed to ``from_pretrained``; the SLA projections stay float32 either way."""
    from ..models.small_wan import load_small_model
    from .variants import apply_attention_mode

    folder = resolve_model_folder(os.fspath(folder))
    model = load_small_model(folder, torch_dtype=torch_dtype)
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        return model, {"attention": "full"}
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path} is not valid JSON ({e})") from e
    s = info.get("sla", {})
    apply_attention_mode(model, info["attention"], **s)
    if (folder / "sla_config.json").is_file():
        from ..integrations.diffusers import load_sla

        load_sla(model, folder)
    return model, info
