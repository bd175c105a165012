"""Fine-tuned transformers stored as a compact difference from a built-in model.

A short fine-tune moves every weight a little (on ``wan8k``, 400 steps at lr 2e-4: at most ~0.02), so the
package ships a fine-tuned model as ``base + delta`` with the delta of each weight matrix quantised to int8 with
one float32 scale per output row (``scale = max|delta_row| / 127``). That is half the bytes of a bfloat16 copy and,
because the delta is small, more exact: on the shipped wan8k models the rms weight error is ~1.2e-5 against
~8e-5 for rounding the whole weights to bfloat16 (docs/results.md, "The shipped wan8k checkpoints"). Vectors
(biases, norms) are stored as float32 deltas.

The file is ``diffusion_pytorch_model.int8_delta.safetensors`` beside the model's ``config.json``; its metadata
name the format and the base, which must be a built-in model (a name, never a path, so a shipped folder cannot
point the loader at another file). Layout of the tensors, for a base weight ``name``:

- ``name``: int8 ``q`` of the base weight's shape, with ``name:scale``: float32 ``(rows, 1, ...)``; or
- ``name``: the float32 delta itself (tensors of fewer than two dimensions).

:func:`load_small_model` reads such a folder like any other; nothing else needs to know.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DELTA_WEIGHTS_NAME = "diffusion_pytorch_model.int8_delta.safetensors"
DELTA_FORMAT = "sla-int8-row-delta/1"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCALE_SUFFIX = ":scale"


def quantize_delta(final: dict, base: dict) -> dict:
    """The stored tensors of ``final - base`` (both ``name -> tensor`` with the same names and shapes)."""
    import torch

    if final.keys() != base.keys():
        extra, missing = sorted(final.keys() - base.keys()), sorted(base.keys() - final.keys())
        raise ValueError(f"the fine-tuned weights and the base's differ in names (only fine-tuned: {extra[:3]}, "
                         f"only base: {missing[:3]}); was it fine-tuned from this base?")
    out = {}
    for name, w in final.items():
        b = base[name]
        if w.shape != b.shape:
            raise ValueError(f"{name}: fine-tuned shape {tuple(w.shape)} but base {tuple(b.shape)}")
        delta = w.double() - b.double()
        if delta.dim() < 2:
            out[name] = delta.float().contiguous()
            continue
        scale = delta.abs().flatten(1).amax(1) / 127
        scale = scale.view(-1, *[1] * (delta.dim() - 1))
        # A row that did not move has scale 0; dividing by 1 there stores zeros.
        q = torch.where(scale > 0, delta / torch.where(scale > 0, scale, 1.0), 0.0).round().clamp(-127, 127)
        out[name] = q.to(torch.int8).contiguous()
        out[name + SCALE_SUFFIX] = scale.float().contiguous()
    return out


def dequantize_delta(stored: dict, base: dict) -> dict:
    """``base + delta`` in float32 for every base weight (the inverse of :func:`quantize_delta`)."""
    import torch

    names = {k for k in stored if not k.endswith(SCALE_SUFFIX)}
    if names != base.keys():
        raise ValueError(f"the delta's weights and the base's differ in names ({len(names ^ base.keys())} differ, "
                         f"e.g. {sorted(names ^ base.keys())[:3]}); it was written for another base model")
    out = {}
    for name, b in base.items():
        d = stored[name]
        if d.dtype == torch.int8:
            if name + SCALE_SUFFIX not in stored:
                raise ValueError(f"the delta of {name} is int8 but has no {name + SCALE_SUFFIX}")
            d = d.float() * stored[name + SCALE_SUFFIX]
        if d.shape != b.shape:
            raise ValueError(f"{name}: delta shape {tuple(d.shape)} but base {tuple(b.shape)}")
        out[name] = b.float() + d.float()
    return out


def write_delta(final: dict, base_name: str, base_folder: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write ``final``'s delta from the built-in model ``base_name`` (whose folder is ``base_folder``,
    :func:`sla.models.small_wan.delta_base_folder`) into ``folder`` (its ``config.json`` must already be there and
    equal the base's)."""
    from safetensors.torch import save_file

    base = _base_state(Path(base_folder), Path(folder))
    path = Path(folder) / DELTA_WEIGHTS_NAME
    save_file(quantize_delta(final, base), str(path), metadata={"format": "pt", "sla_format": DELTA_FORMAT,
                                                                "base": base_name})
    return path


def delta_base_name(folder: str | os.PathLike) -> str:
    """The name of the built-in model the delta in ``folder`` was taken from (checks the format)."""
    from safetensors import safe_open

    path = Path(folder) / DELTA_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("sla_format") != DELTA_FORMAT:
        raise ValueError(f"{path}: unknown weight-delta format {meta.get('sla_format')!r} (this version reads "
                         f"{DELTA_FORMAT!r}); upgrade the package")
    return meta.get("base", "")


def read_delta(folder: str | os.PathLike, base_folder: str | os.PathLike) -> dict:
    """The float32 state dict of the fine-tuned transformer in ``folder`` (written by :func:`write_delta`), from
    its delta and the base model's folder (:func:`sla.models.small_wan.delta_base_folder` of
    :func:`delta_base_name`)."""
    from safetensors.torch import load_file

    stored = load_file(str(Path(folder) / DELTA_WEIGHTS_NAME))
    return dequantize_delta(stored, _base_state(Path(base_folder), Path(folder)))


def _base_state(base_folder: Path, folder: Path) -> dict:
    from safetensors.torch import load_file

    mine, theirs = (_architecture(f / "config.json") for f in (folder, base_folder))
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ValueError(f"{folder / 'config.json'} differs from the base model's ({base_folder}) in {diff}; the "
                         "delta only applies to the architecture it was taken from")
    return load_file(str(base_folder / WEIGHTS_NAME))


def _architecture(config: Path) -> dict:
    # Keys diffusers adds about where and with which version a config was written say nothing about the weights.
    return {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
