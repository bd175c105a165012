"""Training checkpoints (exact resume) and exported fine-tuned models.

Training checkpoint (``<output_dir>/checkpoints/step-XXXXXXX.pt``, written atomically: temp file in the
same folder, fsync, ``os.replace``): trainable parameters, optimizer state, EMA, step, every RNG state
(Python, NumPy, torch CPU and CUDA) and the config. Data order and per-sample noise are pure functions of
``(seed, step, sample position)``, so restoring the step restores the data position.

Opening a checkpoint never runs code from it: everything in it is a tensor or plain data (dicts, lists,
numbers, strings; the RNG states are converted to tensors), and it is read with
``torch.load(weights_only=True)``, whose unpickler refuses any other object. Checkpoints of the first format
(v1) held NumPy's RNG state as an array; they are still read, with NumPy arrays as the only extra type
allowed (rebuilding an array runs no user code).

Sharded training checkpoint (``sla finetune --fsdp``; ``<output_dir>/checkpoints/step-XXXXXXX/``, a folder): the
trainable parameters, the optimizer's tensors and the EMA as written by ``torch.distributed.checkpoint`` (each rank
writes its shards, ``__<rank>_0.distcp``, plus the ``.metadata`` index), and ``sla_checkpoint.json`` with everything
else (step, config, world size, data- and context-parallel degrees, the optimizer's hyper-parameters, rank 0's RNG
states as numbers). The checkpoint names every tensor by parameter name and records how it was cut, so it loads on
any number of processes (``torch.distributed.checkpoint`` reads the pieces each rank's new shards need). All ranks
write into ``.tmp-step-XXXXXXX/``, which rank 0 renames to its final name once every rank is done: a killed save
leaves only the temp folder. Reading it runs no code from it either: the ``.metadata`` index (a pickle in
``torch.distributed.checkpoint``'s format) is read with an unpickler that accepts only the index's own classes,
tensors are read with ``torch.load(weights_only=True)`` (PyTorch's reader), and non-tensor entries (which
``torch.distributed.checkpoint`` would unpickle with full pickle) are refused: this library writes none.

Exported model (``<output_dir>/final``): ``config.json`` + ``diffusion_pytorch_model.safetensors`` loadable by
plain diffusers ``from_pretrained`` (SLA parameters are *not* in this file), plus, for attention modes with
parameters, ``sla_config.json`` + ``sla_weights.safetensors`` from :func:`sla.save_sla`, and
``finetune_info.json`` with the attention mode. :func:`load_finetuned` puts all of it back together.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from .._paths import TMP_PREFIX, atomic_path, atomic_write_text
from ..settings import SLASettings

CHECKPOINT_RE = re.compile(r"^step-(\d+)(\.pt)?$")  # a file: one process's checkpoint; a folder: sharded
INFO_NAME = "finetune_info.json"
_CKPT_FORMAT = "sla-finetune-checkpoint-v2"  # v2: RNG states as tensors, loadable with weights_only=True
_OLD_FORMATS = ("sla-finetune-checkpoint-v1",)  # NumPy's RNG state as an ndarray (see _numpy_array_globals)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers (so that ``torch.load(weights_only=True)`` reads it)."""
    py_version, py_words, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        # 625 words < 2**32 each: exact in int64
        "python": {"version": int(py_version), "words": torch.tensor(py_words, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the tuples that v1 checkpoints stored)."""
    py = state["python"]
    if isinstance(py, dict):
        random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss_next"]))
    else:
        random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached_gaussian"]))
    else:
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the checkpoints in ``output_dir/checkpoints``, oldest first: ``step-N.pt`` files and
    ``step-N`` folders (sharded, ``--fsdp``)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p.is_file() if m.group(2) else p.is_dir()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(output_dir, step: int, keep: int) -> None:
    """Delete all but the newest ``keep`` (0 = keep all) checkpoints up to ``step`` (see :func:`save_checkpoint`)."""
    if keep > 0:
        for _, old in [c for c in list_checkpoints(output_dir) if c[0] <= step][:-keep]:
            _remove(old)


def save_checkpoint(output_dir, step: int, payload: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step-XXXXXXX.pt`` atomically, then delete all but the newest ``keep`` (0 = keep all)
    checkpoints up to ``step``.

    Checkpoints of later steps (left when a run resumed from an earlier one because its newest was unreadable,
    see :func:`load_latest_checkpoint`) are neither counted nor deleted: counted, an unreadable one could push
    out the good checkpoints this run writes; this run overwrites them when it gets there.
    """
    path = Path(output_dir) / "checkpoints" / f"step-{step:07d}.pt"
    atomic_torch_save({"format": _CKPT_FORMAT, "step": step, **payload}, path)
    prune_checkpoints(output_dir, step, keep)
    return path


def remove_orphan_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.tmp-*`` files that a process killed during an atomic write left in ``folder``.

    Only this library writes them there, each under a name that :func:`list_checkpoints` never picks up, and a
    finished write renames its temp file away: one still present is garbage (a run is single-writer per output
    folder). Returns the deleted paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(TMP_PREFIX) and (p.is_file() or p.is_dir()):  # a folder: a sharded save's
            _remove(p)
            removed.append(p)
    return removed


def load_latest_checkpoint(output_dir: str | os.PathLike, report=None) -> tuple[dict, Path] | None:
    """The newest checkpoint of ``output_dir`` that loads, with its path; ``None`` if there is none at all.

    An unreadable one (truncated by a kill, corrupt, or refused as unsafe) is skipped for the one before it,
    and ``report`` (e.g. ``print``) gets one line saying so. If every checkpoint is unreadable, ``ValueError``
    lists why and how to start over.
    """
    found = list_checkpoints(output_dir)
    problems = []
    for i in range(len(found) - 1, -1, -1):
        path = found[i][1]
        try:
            return load_checkpoint(path), path
        except ValueError as e:
            problems.append(str(e))
            if report is not None:
                report(f"sla finetune: {e}; " + (f"resuming from {found[i - 1][1].name} instead" if i else
                                                  "and no earlier checkpoint is left"))
    if not found:
        return None
    folder = Path(output_dir) / "checkpoints"
    raise ValueError(f"no usable checkpoint in {folder}: {' | '.join(problems)}. To start over, delete {folder} "
                     "(or pass another --output-dir)")


def _numpy_array_globals() -> list:
    """What unpickling a plain NumPy array needs beyond weights-only's defaults (v1 checkpoints hold one).

    Rebuilding an array only allocates it and fills it from bytes; the array class and dtype come from this
    list, and an object-dtype array's elements would themselves pass the weights-only unpickler.
    """
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    # NumPy 2 pickles the function under numpy._core, NumPy 1 under numpy.core: allow both spellings.
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refusal_reason(err: BaseException) -> str:
    # torch's message suggests retrying with weights_only=False, which is exactly what must not happen here;
    # keep only the part that says what was refused.
    text = str(err)
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if m:
        return f"it names {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return m.group(1).strip() if m else type(err).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint without running code from it (see the module docstring).

    Raises ``FileNotFoundError`` if absent, ``ValueError`` for a corrupt, truncated, foreign or unsafe file (a
    pickle that would call anything is refused before it calls it).
    """
    path = Path(path)
    if path.is_dir():
        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler refused an object: not a file this library wrote (or a tampered one).
        raise ValueError(f"checkpoint {path} was not opened: it holds something other than tensors and plain data "
                         f"({_refusal_reason(e)}), and unpickling it could run code. `sla finetune` never writes "
                         "such files: delete it, or move it out of the checkpoints folder") from e
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({_first_line(e)})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (_CKPT_FORMAT, *_OLD_FORMATS):
        raise ValueError(f"{path} is not an `sla finetune` checkpoint (format {_CKPT_FORMAT})")
    for key in ("step", "trainable", "optimizer", "rng", "config"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    return ckpt


# ------------------------------------------------------------------------------------------------------------
# sharded checkpoints (--fsdp)
# ------------------------------------------------------------------------------------------------------------

_SHARDED_FORMAT = "sla-finetune-sharded-checkpoint-v1"
SHARDED_INFO_NAME = "sla_checkpoint.json"


def _rng_to_json(state: dict) -> dict:
    """:func:`rng_state` with its tensors as lists of numbers (JSON)."""
    out = {"python": dict(state["python"], words=state["python"]["words"].tolist()),
           "numpy": dict(state["numpy"], keys=state["numpy"]["keys"].tolist()),
           "torch": state["torch"].tolist()}
    if "cuda" in state:
        out["cuda"] = [t.tolist() for t in state["cuda"]]
    return out


def _rng_from_json(state: dict) -> dict:
    out = {"python": dict(state["python"], words=torch.tensor(state["python"]["words"], dtype=torch.int64)),
           "numpy": dict(state["numpy"], keys=torch.tensor(state["numpy"]["keys"], dtype=torch.int64)),
           "torch": torch.tensor(state["torch"], dtype=torch.uint8)}
    if "cuda" in state:
        out["cuda"] = [torch.tensor(t, dtype=torch.uint8) for t in state["cuda"]]
    return out


def _flat_leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def save_sharded_checkpoint(output_dir, step: int, tensors: dict, info: dict, *, rank: int, keep: int = 2) -> Path:
    """Write the sharded checkpoint of ``step`` (see the module docstring); a collective: call it on every rank with
    that rank's ``tensors`` (nested dicts of tensors and DTensors, the same names on every rank) and, on rank 0, the
    plain-data ``info``. Returns ``checkpoints/step-XXXXXXX``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    for name, value in _flat_leaves(tensors):
        if not isinstance(value, torch.Tensor):  # DCP would pickle it, and reading it back would unpickle it
            raise TypeError(f"sharded checkpoint entry {name!r} is a {type(value).__name__}, not a tensor; put plain "
                            "data into info")
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"step-{step:07d}"
    tmp = folder / f"{TMP_PREFIX}step-{step:07d}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            _remove(tmp)
    dist.barrier()
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))  # ends with its own barrier
    if rank == 0:
        with open(tmp / SHARDED_INFO_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": _SHARDED_FORMAT, "step": step, **info}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a later run that resumed from an earlier step writes this step again
            old = folder / f"{TMP_PREFIX}old-step-{step:07d}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        prune_checkpoints(output_dir, step, keep)
    dist.barrier()
    return final


# What the index of a torch.distributed.checkpoint folder may name (torch 2.4 - 2.13 write these): its own metadata
# classes, torch's size/dtype/layout/memory-format helpers and pathlib paths. Rebuilding any of them runs no user code.
_DCP_INDEX_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "PureWindowsPath")}


def _read_dcp_index(path: Path):
    """The ``.metadata`` index of a ``torch.distributed.checkpoint`` folder, unpickled with only the classes of
    ``_DCP_INDEX_GLOBALS`` and torch dtypes allowed, each storage entry checked to stay inside the folder."""
    class IndexUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _DCP_INDEX_GLOBALS or (
                    module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"it names {module}.{name}")

    with open(path / ".metadata", "rb") as f:
        index = IndexUnpickler(f).load()
    storage = getattr(index, "storage_data", None)
    if not isinstance(storage, dict):
        raise ValueError("its index holds no storage table")
    for item in storage.values():
        rel = getattr(item, "relative_path", None)
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise ValueError(f"its index points outside the folder ({rel!r})")
        if getattr(item, "transform_descriptors", None):
            raise ValueError("its index asks for stream transforms, which sla finetune never writes")
        size = (path / rel).stat().st_size if (path / rel).is_file() else -1
        if size < item.offset + item.length:
            raise ValueError(f"{rel} is missing or shorter than its index says (truncated)")
    return index


def read_sharded_checkpoint(path: str | os.PathLike) -> dict:
    """The plain data of a sharded checkpoint folder (``sla_checkpoint.json``, RNG states as tensors) plus
    ``"sharded": path``, after checking that its index reads safely and every shard file is whole. Raises
    ``ValueError`` (naming the folder) for anything else, like :func:`load_checkpoint`."""
    path = Path(path)
    try:
        info = json.loads((path / SHARDED_INFO_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} lacks {SHARDED_INFO_NAME}; it is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt ({SHARDED_INFO_NAME}: {_first_line(e)})") from e
    if not isinstance(info, dict) or info.get("format") != _SHARDED_FORMAT:
        raise ValueError(f"{path} is not an `sla finetune --fsdp` checkpoint (format {_SHARDED_FORMAT})")
    for key in ("step", "config", "rng", "param_groups", "world_size"):
        if key not in info:
            raise ValueError(f"checkpoint {path} lacks {key!r}; it is incomplete")
    try:
        _read_dcp_index(path)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path} was not opened: its .metadata index holds something other than "
                         f"torch.distributed.checkpoint's index ({e}), and unpickling it could run code. `sla finetune`"
                         " never writes such files: delete the folder, or move it out of the checkpoints folder") from e
    except (OSError, ValueError, EOFError, AttributeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({_first_line(e)})") from e
    info["rng"] = _rng_from_json(info["rng"])
    info["sharded"] = str(path)
    return info


def load_sharded_tensors(path: str | os.PathLike, tensors: dict) -> None:
    """Fill ``tensors`` (nested dicts of this rank's tensors/DTensors, named as when saved) in place from a sharded
    checkpoint, whatever the number of processes that wrote it; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            index = _read_dcp_index(Path(self.path))
            if getattr(index, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise ValueError(f"checkpoint {path}: entry {read_item.dest_index.fqn!r} is not a tensor; sla finetune "
                             "never writes such entries, and reading one would unpickle it")

    try:
        dcp.load(tensors, storage_reader=SafeReader(str(path)), planner=TensorsOnlyPlanner())
    except dcp.api.CheckpointException as err:
        # DCP gathers every rank's exception into one; report the first, ours (a refusal) as it was raised.
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(err, "failures", {}).values()]
        first = failures[0] if failures else err
        if isinstance(first, ValueError) and str(first).startswith(f"checkpoint {path}:"):
            raise ValueError(str(first)) from err
        raise ValueError(f"checkpoint {path} could not be read into this run's parameters ({_first_line(first)}); "
                         "was it made with other settings?") from err


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
    from ..models.weight_delta import WEIGHTS_NAME

    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(_base_state_dict(root), str(tmp), metadata={"format": "pt"})
    from ..integrations.diffusers import is_sla_applied, save_sla

    if is_sla_applied(root) and any(p.numel() for n, p in root.named_parameters() if ".sla." in n):
        save_sla(root, folder)
    base = info.get("base_model")
    if base is not None:  # keep the clip description with the model, so eval/sample feed it clips of its size
        from ..models.small_wan import DATA_CONFIG_NAME

        try:
            source = resolve_model_folder(base) / DATA_CONFIG_NAME
        except (FileNotFoundError, ValueError):
            source = None
        if source is not None and source.is_file():
            atomic_write_text(folder / DATA_CONFIG_NAME, source.read_text())
    atomic_write_text(folder / INFO_NAME, json.dumps(info, indent=2) + "\n")
    return folder


def resolve_model_folder(spec: str) -> Path:
    """The transformer folder named by ``spec``: a built-in model name (``"small"``, ``"wan8k"``; see
    :mod:`sla.models.small_wan`), a transformer folder (``config.json`` + weights, ``save_pretrained`` layout) or
    a diffusers pipeline folder, whose ``transformer/`` is taken. A pipeline with two transformers (Wan2.2 A14B)
    is refused: its transformers denoise different noise levels, so the caller must name one."""
    from ..models.small_wan import EMBEDDED_MODELS, small_model_path

    if spec in EMBEDDED_MODELS:
        return small_model_path(spec)
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


def synthetic_data_config(spec: str, model=None):
    """The :class:`~sla.data.synthetic.SyntheticVideoConfig` of the clips model ``spec`` (a built-in name or a
    folder) was trained on, from its ``synthetic_data.json`` (``sla finetune`` copies it into ``final/``), with
    ``text_dim`` from ``model`` when given."""
    from dataclasses import replace

    from ..models.small_wan import data_config_for

    config = data_config_for(resolve_model_folder(spec))
    return replace(config, text_dim=model.config.text_dim) if model is not None else config


def pipeline_of(spec: str) -> Path | None:
    """The pipeline folder when ``spec`` names one or the ``transformer``/``transformer_2`` folder inside one
    (that is where the VAE's latent statistics live), else ``None``."""
    from ..models.small_wan import EMBEDDED_MODELS

    if spec in EMBEDDED_MODELS:
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


def meta_base_model(spec: str):
    """The architecture of :func:`load_base_model`'s model on the ``meta`` device: no memory, no weights read (FSDP
    builds every rank's model this way and fills only its shards)."""
    folder = resolve_model_folder(spec)
    if (folder / INFO_NAME).is_file():
        raise ValueError(f"{folder} holds a fine-tuned model (it has {INFO_NAME}); load it with "
                         "sla.training.load_finetuned, or fine-tune from the original base model")
    from ..models.small_wan import _require_diffusers

    wan = _require_diffusers()
    with torch.device("meta"):
        return wan.from_config(wan.load_config(str(folder)))


def apply_saved_attention(model, info: dict):
    """Install in ``model`` (in place) the attention mode and SLA settings a ``finetune_info.json`` ``info``
    records, with freshly initialised SLA parameters (:func:`load_finetuned` then loads the trained ones)."""
    from .variants import apply_attention_mode

    s = dict(info.get("sla", {}))
    s.setdefault("combine", "paper")  # models fine-tuned before the option existed used the paper's rule
    return apply_attention_mode(model, info["attention"], SLASettings.of(s), backend=s.get("backend", "auto"),
                                token_tile=s.get("token_tile"))


def load_finetuned(folder: str | os.PathLike, torch_dtype=None):
    """Load a model written by :func:`export_model` (or a plain base model folder: then dense). Returns
    ``(model, info)``; ``info["attention"]`` names the attention mode installed. ``torch_dtype`` (default
    float32) is passed to ``from_pretrained``; the SLA projections stay float32 either way."""
    from ..models.small_wan import load_small_model

    folder = resolve_model_folder(os.fspath(folder))
    model = load_small_model(folder, torch_dtype=torch_dtype)
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        return model, {"attention": "full"}
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{info_path} is not valid JSON ({e})") from e
    apply_saved_attention(model, info)
    if (folder / "sla_config.json").is_file():
        from ..integrations.diffusers import load_sla

        load_sla(model, folder)
    return model, info
