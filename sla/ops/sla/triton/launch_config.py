"""Launch configurations of the SLA Triton kernels: the ``num_warps`` and ``num_stages`` of every launch, and
whether the sparse loops read their tiles through TMA descriptors.

* :data:`LAUNCH_TABLE`: a fixed table, looked up by (kernel, block_q, block_k, head_dim, dtype). No autotuning:
  the same call always runs the same configuration, so runs are reproducible and nothing is timed at run time.
* :func:`estimate_shared_memory` and :func:`fit_shared_memory`: on a GPU, a configuration whose estimated shared
  memory exceeds the device's opt-in limit per block runs with fewer pipeline stages, or raises ``ValueError``
  when even one stage does not fit (:func:`device_shared_memory`).
* :func:`tma_loads`: whether the sparse kernels (``fwd``, ``dq``, ``dkdv``) gather their K/V (or Q/dO) tiles
  through host-side TMA tensor descriptors (compute capability 9.0 and newer) or with pointer loads. Both forms
  compute the same values (the loads differ, not the arithmetic); :data:`TMA_BY_DEFAULT` says which is the default
  where both can run.
* :func:`epilogue_chunk`: how many columns of ``H_i`` (rows of ``W^T``) the forward's epilogue takes at a time.
* :func:`launch_overrides`: benchmarks try other configurations inside a ``with`` block; they end with it.

Imports torch only, never Triton, and touches no GPU when imported; the device's limit is read at the first
launch on that device.
"""

from __future__ import annotations

import contextlib
import functools
from types import MappingProxyType
from typing import Iterator, Mapping, Optional

import torch

from .limits import interpreting

# The kernels of kernels.py, by the names the table, the estimate and the overrides use.
KERNELS = {
    "state": "sla_linear_state_kernel",
    "fwd": "sla_fwd_kernel",
    "fwd_mix": "sla_fwd_kernel",  # its PART 2 (linear branch, Proj, mix) when the forward is split (fwd_split)
    "dq": "sla_bwd_dq_kernel",
    "linear_q": "sla_bwd_linear_q_kernel",
    "dkdv": "sla_bwd_dkdv_kernel",
    "coarse_fwd": "sla_coarse_fwd_kernel",
    "coarse_dq": "sla_coarse_bwd_dq_kernel",
    "coarse_dkdv": "sla_coarse_bwd_dkdv_kernel",
}
CONFIG_KEYS = ("num_warps", "num_stages")
# Kernels whose sparse loops can read tiles through TMA descriptors, and the override key that picks the form.
TMA_KERNELS = ("fwd", "dq", "dkdv")
TMA_KEY = "tma"
# The override key that splits the forward in two launches (fwd_split), on kernel "fwd".
SPLIT_KEY = "split"
_BOOL_KEYS = {TMA_KEY: TMA_KERNELS, SPLIT_KEY: ("fwd",)}
# The override key of the epilogue's slice width (epilogue_chunk), on kernel "fwd" (both launches of the split
# forward take it from there).
CHUNK_KEY = "chunk"
# The keys beside CONFIG_KEYS, and the kernels whose overrides may carry them.
_FORM_KEYS = {**_BOOL_KEYS, CHUNK_KEY: ("fwd",)}
# With a projection and bf16 inputs, the forward's epilogue forms o_l and Proj(o_l) over this many columns of H_i
# (rows of W^T) at a time, so that neither D x D operand is held whole: at D = 128 that cut the kernel's register
# spills from 1128 to 432 bytes a thread and its time with the tensors backward keeps from 1.22 to 0.96 ms
# (one-process A/B on an H100; inference no different), bench/RESULTS.md "Register spills and the sliced
# epilogue". fp16 and fp32 inputs (fp32 states) take H_i whole: sliced, their compiled shared memory grows past
# the estimate (float32, head dim 64, 128x128: 262160 bytes, more than an H100 has), and they were not timed.
EPILOGUE_CHUNK = 32
# Whether the forward runs as two launches unless overridden: the sparse loop alone, then the rest ("fwd_mix").
# Off: in the same A/B it saved 0.05-0.09 ms of kernel time at 64x64 and lost at 128x64 with 4 warps, and its
# end-to-end forward times were no better (bench/RESULTS.md, "TMA loads and the split forward").
FWD_SPLIT_BY_DEFAULT = False
# Whether sm_90+ GPUs use the TMA form unless overridden: on, from the one-process A/B on an H100 (bench/ab_tma.py;
# bench/RESULTS.md, "TMA loads and the split forward"): the same outputs, faster kernels in every rule measured.
TMA_BY_DEFAULT = True
ANY = None  # a table key field that matches every value

# Key: (kernel, block_q, block_k, head_dim, dtype): the kernel's name (KERNELS), its query and key tile sizes (the
# state kernel has no query tile and the linear-q kernel no key tile: they are looked up with None there), the
# head dim and the inputs' dtype; ANY matches every value. Value: (num_warps, num_stages) for triton's launch.
# Rows are read top to bottom and the first whose fields all match wins, so a more specific row goes above the
# rows it refines; every kernel ends with a row of ANYs, its default.
#
# Chosen from the launch-config sweeps of bench/bench_kernels.py at (1, 12, 32760, 128) bf16, the best or within
# noise of it for each kernel and block shape, on two cards that agreed (bench/RESULTS.md, "Measurements behind
# code choices"). Head dims and dtypes other than 128 and bf16 use the same rows until measured.
LAUNCH_TABLE: tuple = (
    (("state", ANY, ANY, ANY, ANY), (8, 1)),  # 8 warps beat 4 (bench/RESULTS.md, "Backward experiments")
    (("fwd", 128, ANY, ANY, ANY), (8, 3)),
    (("fwd", ANY, ANY, ANY, ANY), (4, 3)),
    (("fwd_mix", ANY, ANY, ANY, ANY), (4, 1)),  # no loop: one stage
    (("dq", 128, ANY, ANY, ANY), (8, 2)),
    (("dq", ANY, ANY, ANY, ANY), (4, 2)),
    (("linear_q", 128, ANY, ANY, ANY), (8, 1)),
    (("linear_q", ANY, ANY, ANY, ANY), (4, 1)),
    (("dkdv", ANY, ANY, ANY, ANY), (4, 2)),
    # combine="pooled"'s coarse branch: block_k here is the chunk of key-block means one step of its loop reads
    # (launch.coarse_chunk). Swept on an H200 (bench/RESULTS.md, session 12): no other num_warps/num_stages was more
    # than 3% faster at 64-row tiles; at 128 rows the backward's chunk width mattered more than these.
    (("coarse_fwd", 128, ANY, ANY, ANY), (8, 2)),
    (("coarse_fwd", ANY, ANY, ANY, ANY), (4, 2)),
    (("coarse_dq", 128, ANY, ANY, ANY), (8, 2)),
    (("coarse_dq", ANY, ANY, ANY, ANY), (4, 2)),
    (("coarse_dkdv", ANY, ANY, ANY, ANY), (4, 2)),
)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; the SLA kernels are {sorted(KERNELS)}")


def table_config(kernel: str, block_q: Optional[int], block_k: Optional[int], head_dim: int,
                 dtype: torch.dtype) -> dict:
    """``{"num_warps": .., "num_stages": ..}`` of the first row of :data:`LAUNCH_TABLE` that matches, before any
    shared-memory check or override."""
    _check_kernel(kernel)
    key = (kernel, block_q, block_k, head_dim, dtype)
    for row, (num_warps, num_stages) in LAUNCH_TABLE:
        if all(want is ANY or want == got for want, got in zip(row, key)):
            return {"num_warps": num_warps, "num_stages": num_stages}
    raise ValueError(f"LAUNCH_TABLE has no row for {key}; every kernel needs a last row of ANYs")


# Shared memory, estimated. Per kernel, the phases of one program (the loop, and the code before or after it);
# a phase lists the tiles that feed a tl.dot from shared memory at the same time, as (rows, cols, element type,
# loaded inside the pipelined loop). The estimate is the largest phase, a tile loaded inside the loop counted
# num_stages times (the software pipeline keeps one copy per stage). Element types: "input" (q's dtype),
# "state" (launch.state_dtype: bf16 for bf16 inputs, fp32 otherwise), "fp32", and "input_x2": an input tile that
# float32 inputs hold twice (the dQ kernel's Q_i and dO_i: the compiler keeps a second copy for the split "tf32x3"
# products; compiled for sm_90 it needs exactly those bytes more than the "input" count, at every block shape and
# head dim, bench/RESULTS.md "The TMA form ... compiled offline"), once in the half dtypes.
#
# It is an estimate, not what the compiler allocates: tiles computed in registers that are the first operand of
# a dot (P, dS, phi(Q_i)) are not counted, as the tensor cores read them from registers; neither are the
# compiler's layout-conversion scratch, barriers, or the extra copies of float32 tiles that "tf32x3" dots make
# (which is why float32 has its own head-dim limit, limits.MAX_FP32_HEAD_DIM_ON_GPU). For the half dtypes at
# the table's stages it is at or above (or within 2 KB of) what the compiler allocates, and for every launch the
# input checks accept it fits the cards the table was tuned on, so the table runs unchanged there
# (bench/RESULTS.md, "Shared memory of the kernels, compiled offline"; tests/test_launch_config.py).
_SMEM_PHASES = {
    "state": (
        (("BN", "D", "input", False), ("BN", "D", "input", False)),  # phi(K_j)^T (a transpose) and V_j
        (("D", "D", "state", False),),  # h_j on its way to memory (a layout change)
    ),
    "fwd": (
        (("BM", "D", "input", False), ("BN", "D", "input", True), ("BN", "D", "input", True)),  # Q_i; K_j, V_j
        (("D", "DC", "state", False), ("DC", "D", "fp32", False)),  # a slice of H_i, then of Proj's W^T
    ),
    "fwd_mix": (
        (("D", "DC", "state", False), ("DC", "D", "fp32", False)),  # a slice of H_i, then of Proj's W^T
        (("BM", "D", "fp32", False),),  # a row tile changing layout (compiled for sm_90: this is what it takes)
    ),
    "dq": (
        (("BM", "D", "input_x2", False), ("BM", "D", "input_x2", False),  # Q_i, dO_i
         ("BN", "D", "input", True), ("BN", "D", "input", True)),  # K_j, V_j
        (("D", "D", "fp32", False),),  # Proj(o_l) for combine="mass", before the loop
    ),
    "linear_q": (
        (("D", "D", "fp32", False),),  # dO W
        (("D", "D", "state", False),),  # dO_l H_i^T
        (("BM", "D", "state", False), ("BM", "D", "state", False)),  # (phi(Q_i) / den)^T (a transpose), dO_l
        (("BM", "D", "state", False), ("D", "D", "state", False)),  # dH_i on its way to memory, phi(Q_i) / den
    ),
    "dkdv": (
        (("BN", "D", "input", False), ("BN", "D", "input", False),  # K_j, V_j
         ("BM", "D", "input", True), ("BM", "D", "input", True)),  # Q_i, dO_i of each query block that chose j
        (("BN", "D", "input", False), ("BN", "D", "input", False),  # K_j, V_j, still held
         ("D", "D", "state", False), ("D", "D", "state", False)),  # dh_j and its transpose
    ),
    "coarse_fwd": (
        (("BM", "D", "input", False), ("BN", "D", "input", True), ("BN", "D", "input", True)),  # Q_i; means of K, V
    ),
    "coarse_dq": (
        (("BM", "D", "input", False), ("BM", "D", "input", False),  # Q_i, dO_c
         ("BN", "D", "input", True), ("BN", "D", "input", True)),  # means of K, V
    ),
    "coarse_dkdv": (
        (("BN", "D", "input", False), ("BN", "D", "input", False),  # means of K, V
         ("BM", "D", "input", True), ("BM", "D", "input", True)),  # Q_i, dO_c of each query block
    ),
}


def _element_size(kind: str, dtype: torch.dtype) -> int:
    if kind == "input":
        return dtype.itemsize
    if kind == "input_x2":
        return 2 * dtype.itemsize if dtype == torch.float32 else dtype.itemsize
    if kind == "state":  # launch.state_dtype, which imports Triton
        return 2 if dtype == torch.bfloat16 else 4
    return 4


def estimate_shared_memory(kernel: str, block_q: Optional[int], block_k: Optional[int], head_dim: int,
                           dtype: torch.dtype, num_stages: int) -> int:
    """Estimated shared memory in bytes of one launch of ``kernel`` (a name of :data:`KERNELS`) with tiles
    ``block_q x head_dim`` and ``block_k x head_dim``, inputs of ``dtype`` and ``num_stages`` pipeline stages:
    the largest of the kernel's phases in ``_SMEM_PHASES`` (the comment above it says what is counted)."""
    _check_kernel(kernel)
    sizes = {"BM": block_q, "BN": block_k, "D": head_dim, "DC": _default_chunk(head_dim, dtype)}

    def tile_bytes(rows: str, cols: str, kind: str, pipelined: bool) -> int:
        if sizes[rows] is None or sizes[cols] is None:
            raise ValueError(f"the {kernel!r} kernel has a {rows} x {cols} tile: pass its block size")
        return sizes[rows] * sizes[cols] * _element_size(kind, dtype) * (num_stages if pipelined else 1)

    return max(sum(tile_bytes(*tile) for tile in phase) for phase in _SMEM_PHASES[kernel])


def fit_shared_memory(kernel: str, block_q: Optional[int], block_k: Optional[int], head_dim: int,
                      dtype: torch.dtype, config: Mapping[str, int], limit: int) -> dict:
    """``config`` with ``num_stages`` lowered to the largest whose estimate fits ``limit`` bytes (pure: the limit
    is an argument). Fewer stages are the only smaller setting: ``num_warps`` does not change the tiles.

    Raises:
        ValueError: even one stage does not fit; it names the launch and what to change.
    """
    for num_stages in range(config["num_stages"], 0, -1):
        if estimate_shared_memory(kernel, block_q, block_k, head_dim, dtype, num_stages) <= limit:
            return {**config, "num_stages": num_stages}
    need = estimate_shared_memory(kernel, block_q, block_k, head_dim, dtype, 1)
    raise ValueError(
        f"backend='triton': the {kernel!r} kernel with block_q={block_q}, block_k={block_k}, head_dim={head_dim} and "
        f"{dtype} inputs needs an estimated {need} bytes of shared memory even with num_stages=1, more than this "
        f"GPU's {limit} per block; use smaller block_q/block_k, a smaller head dim or bfloat16 inputs, or "
        f"backend='torch'")


@functools.lru_cache(maxsize=None)
def _shared_memory_of(index: int) -> Optional[int]:
    # Older torch builds and ROCm have no opt-in figure: no check there (the launch fails as before if too big).
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)


def _device_index(device: torch.device) -> int:
    """The index of a CUDA ``device`` (the current device for a bare ``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_shared_memory(device: torch.device) -> Optional[int]:
    """The opt-in shared memory per block of a CUDA ``device`` in bytes (what a kernel may use), read once per
    device index; None for other devices, or where torch does not report it."""
    if device.type != "cuda":
        return None
    return _shared_memory_of(_device_index(device))


@functools.lru_cache(maxsize=None)
def _fitted(kernel, block_q, block_k, head_dim, dtype, limit) -> tuple:
    config = table_config(kernel, block_q, block_k, head_dim, dtype)
    if limit is not None:
        config = fit_shared_memory(kernel, block_q, block_k, head_dim, dtype, config, limit)
    return tuple(config.items())


# kernel name -> {"num_warps": .., "num_stages": ..}: the overrides in force, read-only mappings. Changed only by
# launch_overrides, which restores the previous value when its block ends. Process-wide on purpose, not a
# ContextVar: on CUDA the autograd engine runs a backward in a device thread of its own, which would not see a
# ContextVar set in the caller's thread (torch copies the caller's context there only for compiled backwards).
_overrides: Mapping[str, Mapping[str, int]] = MappingProxyType({})


def active_overrides() -> Mapping[str, Mapping[str, int]]:
    """The overrides in force (read-only): ``{kernel: {"num_warps": .., "num_stages": ..}}``."""
    return _overrides


def _checked_overrides(overrides: Mapping) -> dict:
    if not isinstance(overrides, Mapping):
        raise ValueError(f"launch overrides are a dict {{kernel: {{'num_warps': .., 'num_stages': ..}}}}, got "
                         f"{type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(KERNELS))
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown} in launch overrides; the SLA kernels are {sorted(KERNELS)}")
    checked = {}
    for kernel, config in overrides.items():
        if not isinstance(config, Mapping):
            raise ValueError(f"launch override of {kernel!r} must be a dict with keys {CONFIG_KEYS}, got "
                             f"{type(config).__name__}")
        allowed = CONFIG_KEYS + tuple(key for key, kernels in _FORM_KEYS.items() if kernel in kernels)
        bad = sorted(set(config) - set(allowed))
        if bad:
            raise ValueError(f"unknown key(s) {bad} in the launch override of {kernel!r}; allowed: {allowed}")
        for key, value in config.items():
            if key in _BOOL_KEYS:
                if not isinstance(value, bool):
                    raise ValueError(f"launch override {kernel!r} {key} must be True or False, got {value!r}")
            elif key == CHUNK_KEY:
                if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                    raise ValueError(f"launch override {kernel!r} {key} must be a power of two >= 16 (the smallest "
                                     f"dot), got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"launch override {kernel!r} {key} must be a positive int, got {value!r}")
        checked[kernel] = MappingProxyType(dict(config))
    return checked


def launch_overrides(overrides: Mapping[str, Mapping[str, int]]) -> contextlib.AbstractContextManager:
    """A context manager that runs the kernels named in ``overrides`` with other launch settings while its
    ``with`` block runs, e.g. ``with launch_overrides({"fwd": {"num_warps": 8, "num_stages": 2}}):``. For
    benchmarks and tuning.

    ``overrides`` maps kernel names (:data:`KERNELS`) to ``num_warps`` and/or ``num_stages``, for the kernels of
    :data:`TMA_KERNELS` ``tma`` (True or False: TMA descriptor loads or pointer loads, see :func:`tma_loads`) and
    for ``"fwd"`` ``split`` (True or False: the forward in two launches or one, see :func:`fwd_split`); a key left
    out keeps the default. An override is used as given, without the shared-memory check (a sweep times exactly what
    it asked for; Triton raises if it does not fit). Nested blocks: the inner one's kernels replace the outer
    one's, the others stay. It applies to every launch in the process while the block runs (autograd's
    backward included, which runs in a thread of its own on CUDA), so it is not for concurrent use from several
    threads; it ends with the block, also on an exception. Under Triton's interpreter ``num_warps`` and
    ``num_stages`` are ignored, overrides included; ``tma`` is honoured (the interpreter runs descriptor loads, which
    is how the CPU tests cover that form), and so is ``"fwd"``'s ``chunk`` (a power of two >= 16: the epilogue's
    slice width, see :func:`epilogue_chunk`).

    Raises:
        ValueError: an unknown kernel or key, or a value that is not a positive int (checked here, before the
            block runs).
    """
    return _overriding(_checked_overrides(overrides))


@contextlib.contextmanager
def _overriding(checked: Mapping[str, Mapping[str, int]]) -> Iterator[None]:
    global _overrides
    before = _overrides
    _overrides = MappingProxyType({**before, **checked})
    try:
        yield
    finally:
        _overrides = before


def launch_config(kernel: str, block_q: Optional[int], block_k: Optional[int], head_dim: int,
                  dtype: torch.dtype, device: torch.device) -> dict:
    """The ``num_warps``/``num_stages`` keyword arguments of one launch: an active override
    (:func:`launch_overrides`) over the table's row (:func:`table_config`), the latter with its stages lowered to
    fit ``device``'s shared memory (:func:`fit_shared_memory`). ``{}`` under Triton's interpreter, which ignores
    them. Arguments as the table's key; ``device`` that of the launch's tensors.
    """
    if interpreting():
        return {}
    override = {k: v for k, v in _overrides.get(kernel, {}).items() if k in CONFIG_KEYS}
    if override:
        return {**table_config(kernel, block_q, block_k, head_dim, dtype), **override}
    return dict(_fitted(kernel, block_q, block_k, head_dim, dtype, device_shared_memory(device)))


def _descriptor_ready(x: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``x`` (``(B, H, L, D)``, any strides): a 16-byte aligned base, the last
    dimension contiguous and every other stride a multiple of 16 bytes (the hardware's rules)."""
    size = x.element_size()
    return (x.data_ptr() % 16 == 0 and x.stride(-1) == 1
            and all((stride * size) % 16 == 0 for stride in x.stride()[:-1]))


@functools.lru_cache(maxsize=None)
def _has_host_descriptors() -> bool:
    try:
        from triton.tools import tensor_descriptor  # Triton >= 3.3; imported at the first launch, not with sla
    except ImportError:
        return False
    return hasattr(tensor_descriptor, "TensorDescriptor")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def tma_loads(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether the launch of ``kernel`` (one of :data:`TMA_KERNELS`) reads the gathered tiles of ``tensors`` through
    TMA descriptors. Default, where :data:`TMA_BY_DEFAULT` is set: on CUDA devices of compute capability 9.0 or
    newer when Triton has host-side descriptors and every tensor meets the descriptor's alignment rules (pointer
    loads otherwise, with the same results); never under Triton's interpreter; with it unset, pointer loads
    everywhere. An override (:func:`launch_overrides`, key ``"tma"``) decides instead; forcing ``True`` where a
    descriptor cannot be made raises ``ValueError``.
    """
    if kernel not in TMA_KERNELS:
        raise ValueError(f"kernel must be one of {TMA_KERNELS} for tma_loads, got {kernel!r}")

    def ready() -> bool:
        return _has_host_descriptors() and all(_descriptor_ready(x) for x in tensors)

    forced = _overrides.get(kernel, {}).get(TMA_KEY)
    if forced is not None:
        if forced and not ready():
            raise ValueError(f"launch override {kernel!r} tma=True, but Triton has no host-side tensor descriptors "
                             "or an input is not 16-byte aligned (base and every stride but the last); run with "
                             "tma=False")
        return forced
    device = tensors[0].device
    if not TMA_BY_DEFAULT or interpreting() or device.type != "cuda":
        return False
    return _capability(_device_index(device)) >= (9, 0) and ready()


def fwd_split() -> bool:
    """Whether the forward runs as two launches of ``sla_fwd_kernel``: the sparse loop alone (``"fwd"``, writing
    o_s and the LSE), then the linear branch, projection and mix (``"fwd_mix"``, reading them back), instead of one
    launch that does both. The same arithmetic either way, except that the split mixes o_s as rounded to the
    inputs' dtype. An override (:func:`launch_overrides`, ``{"fwd": {"split": ..}}``) decides, else
    :data:`FWD_SPLIT_BY_DEFAULT`."""
    forced = _overrides.get("fwd", {}).get(SPLIT_KEY)
    return FWD_SPLIT_BY_DEFAULT if forced is None else forced


def _default_chunk(head_dim: int, dtype: torch.dtype) -> int:
    return min(head_dim, EPILOGUE_CHUNK) if dtype == torch.bfloat16 else head_dim


def epilogue_chunk(head_dim: int, dtype: torch.dtype) -> int:
    """The width of the slices in which the forward's epilogue takes ``H_i``'s columns and ``W^T``'s rows when there
    is a projection (``sla_fwd_kernel``'s ``DC``), for inputs of ``dtype``: an override (:func:`launch_overrides`,
    ``{"fwd": {"chunk": ..}}``, any dtype), else :data:`EPILOGUE_CHUNK` for bfloat16 and the whole head dim
    (no slicing) otherwise; never more than ``head_dim``. The same values either way up to the fp32 summation of
    the projection's slices; under the interpreter too."""
    forced = _overrides.get("fwd", {}).get(CHUNK_KEY)
    return _default_chunk(head_dim, dtype) if forced is None else min(head_dim, forced)
