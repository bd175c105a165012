"""Save and load the SLA settings and weights of a diffusers model (``sla_config.json`` +
``sla_weights.safetensors``), checking everything before writing anything."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
from torch import nn

from ..._paths import atomic_path, atomic_write_text
from ...settings import check_backend_name
from .._common import SLA_ATTRIBUTE, check_integration_config, make_sla_module
from .apply import _controller, apply_sla, is_sla_applied, remove_sla, sla_modules
from .config import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    SLAConfig,
)
from .families import _head_dim, _unwrap, find_self_attention_layers


def _sla_state(model: nn.Module) -> dict:
    """``{full parameter name: tensor}`` of every SLA parameter, names as in ``model.state_dict()``."""
    state = {}
    for name, module in sla_modules(model).items():
        for pname, tensor in module.state_dict().items():
            state[f"{name}.{SLA_ATTRIBUTE}.{pname}"] = tensor
    return state


def save_sla(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the SLA settings and weights of ``model`` into directory ``path`` (created if missing):
    ``sla_config.json`` (settings, family, patched layer names) and ``sla_weights.safetensors`` (every
    ``...sla.proj.weight/bias``, in its stored dtype). Both files are written atomically. Only SLA's own
    parameters are saved: save the rest with ``model.save_pretrained(path)`` (same directory is fine)."""
    from safetensors.torch import save_file

    controller = _controller(model)
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"save_sla writes a directory, but {path!r} is a file; pass a directory path")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _sla_state(model).items()}
    from ... import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sla_version": __version__,
        "family": controller.family,
        "model_class": type(_unwrap(model)).__name__,
        "layers": list(controller.layer_names),
        "config": controller.config.to_dict(),
    }
    with atomic_path(os.path.join(path, WEIGHTS_NAME)) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(os.path.join(path, CONFIG_NAME), json.dumps(meta, indent=2) + "\n")


def read_sla_config(path: str | os.PathLike) -> dict:
    """Parse and check ``path/sla_config.json`` written by :func:`save_sla`.

    Raises ``ValueError`` naming the file for anything but a well-formed config of this format: a missing
    file, invalid JSON (with line and column), another format, or a missing or mistyped ``config``, ``family``
    or ``layers`` entry.
    """
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path!r} does not exist; save_sla(model, {os.fspath(path)!r}) writes it")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); it is "
                         f"damaged or was edited by hand: fix it, or write it again with sla.save_sla") from None
    except UnicodeDecodeError:
        raise ValueError(f"{cfg_path!r} is not UTF-8 text; it is not an SLA config written by sla.save_sla") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path!r} is not an SLA config of format {FORMAT} v{FORMAT_VERSION}")
    for key, kind in (("config", dict), ("family", str), ("layers", list)):
        if key not in meta:
            raise ValueError(f"{cfg_path!r} lacks {key!r}; it is incomplete: write it again with sla.save_sla")
        if not isinstance(meta[key], kind) or (key == "layers" and not all(isinstance(n, str) for n in meta[key])):
            what = "list of strings" if key == "layers" else kind.__name__
            raise ValueError(f"{cfg_path!r}: {key!r} must be a JSON {what}, got {meta[key]!r}")
    return meta


def _saved_settings(meta: dict, cfg_path: str) -> SLAConfig:
    """The ``config`` entry as an :class:`SLAConfig`, with every value checked as :func:`apply_sla` would."""
    try:
        saved = SLAConfig.from_dict(meta["config"])  # checks the SLA settings
        check_integration_config(saved.sla)
        check_backend_name(saved.backend)
        for idx in saved.dense_layers:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise TypeError(f"dense_layers must hold ints (layer indices), got {idx!r}")
        from ...ops.sla.tiles import check_token_tile

        check_token_tile(saved.token_tile)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path!r}: invalid SLA settings: {e}") from None
    return saved


def _plan_load(model: nn.Module, path: str | os.PathLike, meta: dict, saved: SLAConfig) -> dict:
    """Check everything :func:`load_sla` will write, changing nothing: the family, the patched layers, every
    tensor's name, shape, dtype (floating) and values (finite). Returns ``{parameter name: tensor}``."""
    from safetensors.torch import load_file

    folder = os.fspath(path)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    root = _unwrap(model)
    layers = find_self_attention_layers(root)
    if not layers:
        raise ValueError(f"{type(root).__name__} has no self-attention layer that SLA recognises (Wan, CogVideoX), "
                         f"but {cfg_path!r} was saved from a {meta['family']!r} model; load it into that model")
    families = {family for _, _, family in layers}
    if families != {meta["family"]}:
        raise ValueError(f"{cfg_path!r} was saved from a {meta['family']!r} model, but {type(root).__name__} is a "
                         f"{'/'.join(sorted(families))!r} model; load it into the kind of model it was saved from")
    n = len(layers)
    if is_sla_applied(root):
        names = list(_controller(root).layer_names)
    else:
        for idx in saved.dense_layers:
            if not -n <= idx < n:
                raise ValueError(f"{cfg_path!r}: dense_layers index {idx} is out of range for this model's {n} "
                                 f"self-attention layers; was it saved from another architecture?")
        dense = {idx % n for idx in saved.dense_layers}
        names = [name for i, (name, _, _) in enumerate(layers) if i not in dense]
    if names != list(meta["layers"]):
        raise ValueError(f"the model's SLA layers {names[:3]}... differ from the saved ones {meta['layers'][:3]}... in "
                         f"{cfg_path!r}; was it saved from another architecture?")

    weights_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise ValueError(f"{weights_path!r} does not exist; save_sla writes it next to {CONFIG_NAME}")
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # noqa: BLE001 - whatever safetensors raises, the file cannot be used
        raise ValueError(f"{weights_path!r} is not a readable safetensors file ({e}); write it again with "
                         f"sla.save_sla") from None

    # What each layer holds: its SLA module's state_dict (a template of the layer's head_dim, built on the meta
    # device so that nothing is allocated), named as in model.state_dict().
    attn_by_name = {name: attn for name, attn, _ in layers}
    expected = {}
    for name in names:
        template = make_sla_module(_head_dim(attn_by_name[name]), saved.sla, backend=saved.backend,
                                   keep_proj_fp32=saved.keep_proj_fp32, num_heads=attn_by_name[name].heads,
                                   device="meta")
        for pname, tensor in template.state_dict().items():
            expected[f"{name}.{SLA_ATTRIBUTE}.{pname}"] = tuple(tensor.shape)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"SLA weights in {weights_path!r} do not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, shape in expected.items():
        src = tensors[name]
        if tuple(src.shape) != shape:
            raise ValueError(f"{name} in {weights_path!r}: saved shape {tuple(src.shape)} != model shape {shape}")
        if not src.is_floating_point():
            raise ValueError(f"{name} in {weights_path!r} has dtype {src.dtype}; SLA projections are floating point, "
                             f"so this file was not written by sla.save_sla or is damaged")
        bad = int((~torch.isfinite(src)).sum())
        if bad:
            raise ValueError(f"{name} in {weights_path!r} holds {bad} NaN/Inf value(s); loading them would make every "
                             f"output NaN. Re-export the weights from a healthy run")
    return {name: tensors[name] for name in expected}


def load_sla(model: nn.Module, path: str | os.PathLike, *, backend: str | None = None) -> nn.Module:
    """Restore SLA from a directory written by :func:`save_sla`.

    Everything is checked before anything is written: the config (valid JSON, this format, valid settings,
    the model's family), the patched layers, and every tensor's name, shape, dtype (floating point) and
    values (no NaN/Inf). Any problem raises ``ValueError`` naming the file, and the model is left exactly as
    it came in, whether or not it already had SLA: there is no partial load.

    If ``model`` has no SLA yet, :func:`apply_sla` is called with the saved settings; if it has, the settings
    must match the saved ones. Then every saved ``proj`` tensor is copied into the model (into the parameter's
    dtype and device). ``backend`` (default: the saved one) picks the implementation; it is a run-time choice,
    not part of the weights, so it is not compared with an SLA already applied. Returns ``model``.
    """
    meta = read_sla_config(path)
    cfg_path = os.path.join(os.fspath(path), CONFIG_NAME)
    saved = _saved_settings(meta, cfg_path)
    if backend is not None:
        check_backend_name(backend)
    if is_sla_applied(model):
        current = _controller(model).config
        if replace(current, backend=None) != replace(saved, backend=None):
            raise ValueError(f"model already has SLA with settings {current} but {os.fspath(path)!r} holds {saved}; "
                             f"call sla.remove_sla(model) before load_sla")
    tensors = _plan_load(model, path, meta, saved)
    if is_sla_applied(model):
        _write_sla_weights(model, tensors)
        return model
    apply_sla(model, **saved.sla.to_dict(), dense_layers=saved.dense_layers,
              dense_timestep_threshold=saved.dense_timestep_threshold, keep_proj_fp32=saved.keep_proj_fp32,
              backend=saved.backend if backend is None else backend, token_tile=saved.token_tile)
    try:
        _write_sla_weights(model, tensors)
    except BaseException:
        remove_sla(model)  # leave the model as it came in, not patched with zero projections
        raise
    return model


def _write_sla_weights(model: nn.Module, tensors: dict) -> None:
    """Copy checked tensors (see :func:`_plan_load`) into the model's SLA parameters."""
    root = _unwrap(model)
    with torch.no_grad():
        for name, src in tensors.items():
            root.get_parameter(name).copy_(src)
