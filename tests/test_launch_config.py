"""Launch configurations of the Triton kernels (``sla/ops/sla/triton/launch_config.py``): the table, the
shared-memory check and the benchmarks' overrides. Pure functions with fake device limits: no GPU needed.

Under Triton's interpreter (how CI runs) ``launch_config`` returns ``{}``; tests that look at what a GPU launch
gets set ``TRITON_INTERPRET=0`` for themselves (read at call time) and launch nothing.
"""

import threading

import pytest
import torch

from sla.ops.sla.triton import launch_config as lc
from sla.ops.sla.triton.limits import (
    MAX_FP32_HEAD_DIM_ON_GPU,
    SUPPORTED_BLOCKS,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
)

H100_H200_OPTIN = 232448  # shared_memory_per_block_optin of the H100 and H200 (227 KB)
CPU = torch.device("cpu")

# What the if-chain `_launch_config` in launch.py returned before the table (commit eb0afdd), as (num_warps,
# num_stages) per kernel and block_q (it read nothing else; the state kernel was looked up with block_q = block_k).
OLD_CHAIN = {
    "fwd": {16: (4, 3), 32: (4, 3), 64: (4, 3), 128: (8, 3)},
    "state": {16: (8, 1), 32: (8, 1), 64: (8, 1), 128: (8, 1)},
    "dkdv": {16: (4, 2), 32: (4, 2), 64: (4, 2), 128: (4, 2)},
    "linear_q": {16: (4, 1), 32: (4, 1), 64: (4, 1), 128: (8, 1)},
    "dq": {16: (4, 2), 32: (4, 2), 64: (4, 2), 128: (8, 2)},
}
# The coarse kernels of combine="pooled" came after the table (chosen there, not from the chain), by block_q.
COARSE_ROWS = {
    "coarse_fwd": {16: (4, 2), 32: (4, 2), 64: (4, 2), 128: (8, 2)},
    "coarse_dq": {16: (4, 2), 32: (4, 2), 64: (4, 2), 128: (8, 2)},
    "coarse_dkdv": {16: (4, 2), 32: (4, 2), 64: (4, 2), 128: (4, 2)},
}
# The split forward's second launch (linear branch, Proj, mix: no loop) came after the table too.
LATER_ROWS = {"fwd_mix": {16: (4, 1), 32: (4, 1), 64: (4, 1), 128: (4, 1)}}
# launch.COARSE_CHUNK and COARSE_CHUNK_BWD_WIDE, the coarse kernels' block_k (launch.py imports Triton; this file does
# not): 64, and 32 in the backward kernels with 128-row query tiles.
COARSE_CHUNK, COARSE_CHUNK_BWD_WIDE = 64, 32


def _blocks(kernel):
    """The (block_q, block_k) pairs a launch of ``kernel`` passes: None for the axis the kernel does not tile."""
    for bq in SUPPORTED_BLOCKS:
        for bk in SUPPORTED_BLOCKS:
            if kernel == "state":
                if bq == bk:
                    yield None, bk
            elif kernel == "linear_q":
                if bk == SUPPORTED_BLOCKS[0]:
                    yield bq, None
            elif kernel.startswith("coarse"):
                if bk == SUPPORTED_BLOCKS[0]:
                    yield bq, COARSE_CHUNK_BWD_WIDE if kernel != "coarse_fwd" and bq >= 128 else COARSE_CHUNK
            else:
                yield bq, bk


def _all_launches(max_fp32_head_dim=None):
    for kernel in lc.KERNELS:
        for bq, bk in _blocks(kernel):
            for d in SUPPORTED_HEAD_DIMS:
                for dtype in SUPPORTED_DTYPES:
                    if max_fp32_head_dim is None or dtype != torch.float32 or d <= max_fp32_head_dim:
                        yield kernel, bq, bk, d, dtype


@pytest.fixture
def on_gpu_path(monkeypatch):
    """``launch_config`` as on a GPU (not the interpreter's ``{}``), with no override left active."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not lc.active_overrides()


# --- the table ---------------------------------------------------------------------------------------------------


def test_the_table_reproduces_the_old_chain_for_every_supported_launch():
    assert set(OLD_CHAIN) | set(COARSE_ROWS) | set(LATER_ROWS) == set(lc.KERNELS)
    n = 0
    for kernel, bq, bk, d, dtype in _all_launches():
        # the old chain's argument: block_q, and block_k for the state kernel
        expected = {**OLD_CHAIN, **COARSE_ROWS, **LATER_ROWS}[kernel][bk if kernel == "state" else bq]
        got = lc.table_config(kernel, bq, bk, d, dtype)
        assert got == {"num_warps": expected[0], "num_stages": expected[1]}, (kernel, bq, bk, d, dtype)
        n += 1
    assert n == 3 * 4 * (2 * 16 + 4 + 16 + 4 + 16 + 3 * 4)  # dtypes x head dims x the nine kernels' block shapes


def test_every_kernel_ends_with_its_default_row():
    rows = [key for key, _ in lc.LAUNCH_TABLE]
    assert {key[0] for key in rows} == set(lc.KERNELS)
    for kernel in lc.KERNELS:
        own = [key for key in rows if key[0] == kernel]
        # a row below the default could never match
        assert own[-1] == (kernel, lc.ANY, lc.ANY, lc.ANY, lc.ANY), kernel
    assert len(set(rows)) == len(rows)
    for _, (num_warps, num_stages) in lc.LAUNCH_TABLE:
        assert num_warps in (1, 2, 4, 8, 16) and num_stages >= 1


def test_unknown_kernel_is_named():
    with pytest.raises(ValueError, match="'fwd2'"):
        lc.table_config("fwd2", 64, 64, 64, torch.float16)
    with pytest.raises(ValueError, match="'fwd2'"):
        lc.estimate_shared_memory("fwd2", 64, 64, 64, torch.float16, 1)


def test_interpreter_gets_no_launch_settings(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lc.launch_config("fwd", 64, 64, 64, torch.float32, CPU) == {}
    with lc.launch_overrides({"fwd": {"num_warps": 2}}):
        assert lc.launch_config("fwd", 64, 64, 64, torch.float32, CPU) == {}


def test_launch_config_off_cuda_is_the_table(on_gpu_path):
    # no CUDA device: no shared-memory limit to check against
    for kernel, bq, bk, d, dtype in _all_launches():
        assert lc.launch_config(kernel, bq, bk, d, dtype, CPU) == lc.table_config(kernel, bq, bk, d, dtype)


def test_the_launchers_look_up_each_kernel_with_its_own_tiles(monkeypatch):
    # The table test above assumes these calls: state without a query tile, linear_q without a key tile.
    pytest.importorskip("triton")
    import sla
    from sla.ops.sla.triton import launch

    calls = []

    def recording(*args):
        calls.append(args)
        return {}

    monkeypatch.setattr(launch, "launch_config", recording)
    q, k, v = (torch.randn(1, 1, 40, 32, requires_grad=True) for _ in range(3))
    o = sla.sparse_linear_attention(q, k, v, critical=0.5, negligible=0.0, block_q=32, block_k=16,
                                    backend="triton")
    o.sum().backward()
    paper = {("state", None, 16, 32, torch.float32, CPU), ("fwd", 32, 16, 32, torch.float32, CPU),
             ("dq", 32, 16, 32, torch.float32, CPU), ("linear_q", 32, None, 32, torch.float32, CPU),
             ("dkdv", 32, 16, 32, torch.float32, CPU)}
    assert set(calls) == paper
    # combine="pooled" adds the coarse kernels, whose key tile is a chunk of key-block means.
    assert (launch.COARSE_CHUNK, launch.COARSE_CHUNK_BWD_WIDE) == (COARSE_CHUNK, COARSE_CHUNK_BWD_WIDE)
    calls.clear()
    o = sla.sparse_linear_attention(q, k, v, critical=0.5, negligible=0.0, block_q=32, block_k=16, combine="pooled",
                                    backend="triton")
    o.sum().backward()
    assert set(calls) == paper | {(kernel, 32, COARSE_CHUNK, 32, torch.float32, CPU)
                                  for kernel in ("coarse_fwd", "coarse_dq", "coarse_dkdv")}


# --- the shared-memory estimate and check ------------------------------------------------------------------------


def test_estimate_counts_the_largest_phase_with_pipelined_tiles_per_stage():
    bf16, fp16 = torch.bfloat16, torch.float16
    # fwd, 64x64, D = 128, bf16, 3 stages: the loop (q tile once, k and v tiles per stage) is the larger phase
    loop = 64 * 128 * 2 + 3 * 2 * 64 * 128 * 2
    epilogue = 128 * 32 * 2 + 32 * 128 * 4  # 32-column slices of H_i (bf16 state) and W^T (fp32)
    assert loop > epilogue
    assert lc.estimate_shared_memory("fwd", 64, 64, 128, bf16, 3) == loop == 114688
    # with fp16 inputs the states are fp32 and the epilogue is the larger phase at one stage
    assert lc.estimate_shared_memory("fwd", 64, 64, 128, fp16, 1) == 128 * 128 * 4 * 2
    # dK/dV, 128x64, D = 64, fp32, 2 stages: k, v once, q and dO per stage
    assert lc.estimate_shared_memory("dkdv", 128, 64, 64, torch.float32, 2) == (2 * 64 + 2 * 2 * 128) * 64 * 4
    # the kernels without a loop do not depend on num_stages
    for kernel, bq, bk in (("state", None, 64), ("linear_q", 128, None)):
        assert len({lc.estimate_shared_memory(kernel, bq, bk, 128, bf16, s) for s in (1, 2, 3)}) == 1
    assert lc.estimate_shared_memory("state", None, 64, 128, bf16, 1) == 2 * 64 * 128 * 2


def test_estimate_names_a_missing_block_size():
    with pytest.raises(ValueError, match="BM x D tile"):
        lc.estimate_shared_memory("fwd", None, 64, 64, torch.float16, 1)


def test_every_supported_launch_fits_an_h100_or_h200():
    # So the table runs as tuned on those cards: no launch the input checks accept (float32 only up to
    # MAX_FP32_HEAD_DIM_ON_GPU on a GPU) is stepped down there, 128x128 blocks at head dim 128 included, except
    # float32 dQ at 128x128 and head dim 64, which needs 262144 bytes with the table's 2 stages (compiled for sm_90)
    # and runs with 1.
    stepped_down = []
    for kernel, bq, bk, d, dtype in _all_launches(max_fp32_head_dim=MAX_FP32_HEAD_DIM_ON_GPU):
        config = lc.table_config(kernel, bq, bk, d, dtype)
        fitted = lc.fit_shared_memory(kernel, bq, bk, d, dtype, config, H100_H200_OPTIN)
        assert lc.estimate_shared_memory(kernel, bq, bk, d, dtype, fitted["num_stages"]) <= H100_H200_OPTIN
        if fitted != config:
            stepped_down.append((kernel, bq, bk, d, dtype, fitted["num_stages"]))
    assert stepped_down == [("dq", 128, 128, 64, torch.float32, 1)]


def test_float32_dq_estimate_counts_the_second_copies_of_q_and_do():
    # Compiled for sm_90 with Triton 3.6 (bench/results_smem_sm90.json, _stages.json, _tma.json): exact.
    f32 = torch.float32
    assert lc.estimate_shared_memory("dq", 64, 64, 64, f32, 2) == 131072
    assert lc.estimate_shared_memory("dq", 128, 128, 64, f32, 2) == 262144
    assert [lc.estimate_shared_memory("dq", 64, 64, 128, f32, s) for s in (1, 2, 3)] == [196608, 262144, 327680]
    # the half dtypes count Q_i and dO_i once, as before
    assert lc.estimate_shared_memory("dq", 64, 64, 128, torch.bfloat16, 2) == (2 * 64 + 2 * 2 * 64) * 128 * 2


def test_the_largest_half_precision_launches_at_head_dim_128():
    # the tightest rows: 128x128 bf16/fp16 forward with 3 stages, and the backward kernels with 2
    for dtype in (torch.bfloat16, torch.float16):
        assert lc.estimate_shared_memory("fwd", 128, 128, 128, dtype, 3) == 229376 <= H100_H200_OPTIN
        assert lc.estimate_shared_memory("dq", 128, 128, 128, dtype, 2) == 196608
        assert lc.estimate_shared_memory("dkdv", 128, 128, 128, dtype, 2) == 196608


def test_fit_steps_num_stages_down_to_the_largest_that_fits():
    bf16 = torch.bfloat16
    config = lc.table_config("fwd", 128, 128, 64, bf16)
    assert config == {"num_warps": 8, "num_stages": 3}
    est = {s: lc.estimate_shared_memory("fwd", 128, 128, 64, bf16, s) for s in (1, 2, 3)}
    assert est[1] < est[2] < est[3]
    assert lc.fit_shared_memory("fwd", 128, 128, 64, bf16, config, est[3]) == config
    assert lc.fit_shared_memory("fwd", 128, 128, 64, bf16, config, est[3] - 1) == {"num_warps": 8, "num_stages": 2}
    assert lc.fit_shared_memory("fwd", 128, 128, 64, bf16, config, est[2] - 1) == {"num_warps": 8, "num_stages": 1}
    assert lc.fit_shared_memory("fwd", 128, 128, 64, bf16, config, est[1]) == {"num_warps": 8, "num_stages": 1}
    assert config == {"num_warps": 8, "num_stages": 3}  # not modified in place


def test_fit_raises_a_clear_error_when_even_one_stage_does_not_fit():
    bf16 = torch.bfloat16
    need = lc.estimate_shared_memory("dq", 128, 128, 128, bf16, 1)
    config = lc.table_config("dq", 128, 128, 128, bf16)
    with pytest.raises(ValueError) as err:
        lc.fit_shared_memory("dq", 128, 128, 128, bf16, config, need - 1)
    msg = str(err.value)
    for part in ("'dq'", "block_q=128", "block_k=128", "head_dim=128", "torch.bfloat16", str(need), str(need - 1),
                 "smaller block_q/block_k", "backend='torch'"):
        assert part in msg, (part, msg)


class _FakeProperties:
    def __init__(self, optin):
        self.shared_memory_per_block_optin = optin


@pytest.fixture
def fake_gpus(monkeypatch):
    """``torch.cuda.get_device_properties`` of two fake devices (index -> opt-in bytes), counting the reads."""
    limits = {0: H100_H200_OPTIN, 1: 101376}
    reads = []

    def props(index):
        reads.append(index)
        return _FakeProperties(limits[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    lc._shared_memory_of.cache_clear()
    yield reads
    lc._shared_memory_of.cache_clear()


def test_device_limit_is_read_once_per_device_index(fake_gpus):
    assert lc.device_shared_memory(CPU) is None
    assert fake_gpus == []
    assert lc.device_shared_memory(torch.device("cuda", 0)) == H100_H200_OPTIN
    assert lc.device_shared_memory(torch.device("cuda", 0)) == H100_H200_OPTIN
    assert lc.device_shared_memory(torch.device("cuda", 1)) == 101376
    assert fake_gpus == [0, 1]


def test_launch_config_checks_the_launch_device(fake_gpus, on_gpu_path):
    bf16 = torch.bfloat16
    # on the 227 KB device the table as it is, on the 99 KB one fewer stages, or the error
    assert lc.launch_config("fwd", 128, 64, 128, bf16, torch.device("cuda", 0)) == {"num_warps": 8, "num_stages": 3}
    assert lc.launch_config("fwd", 128, 64, 128, bf16, torch.device("cuda", 1)) == {"num_warps": 8, "num_stages": 2}
    assert lc.launch_config("dq", 64, 64, 128, bf16, torch.device("cuda", 1)) == {"num_warps": 4, "num_stages": 2}
    with pytest.raises(ValueError, match="101376"):
        lc.launch_config("dq", 128, 128, 128, bf16, torch.device("cuda", 1))
    # an override is used as given: a sweep times what it asked for
    with lc.launch_overrides({"dq": {"num_stages": 3}}):
        assert lc.launch_config("dq", 128, 128, 128, bf16, torch.device("cuda", 1)) == {"num_warps": 8,
                                                                                        "num_stages": 3}


def test_state_sizes_match_the_launchers_state_dtype():
    pytest.importorskip("triton")
    from sla.ops.sla.triton.launch import state_dtype

    for dtype in SUPPORTED_DTYPES:
        assert lc._element_size("state", dtype) == state_dtype(dtype).itemsize
        assert lc._element_size("input", dtype) == dtype.itemsize


# --- overrides ---------------------------------------------------------------------------------------------------


def test_overrides_apply_inside_the_block_only(on_gpu_path):
    bf16 = torch.bfloat16
    table = lc.launch_config("fwd", 64, 64, 128, bf16, CPU)
    dq = lc.launch_config("dq", 64, 64, 128, bf16, CPU)
    with lc.launch_overrides({"fwd": {"num_warps": 8, "num_stages": 2}}):
        assert lc.launch_config("fwd", 64, 64, 128, bf16, CPU) == {"num_warps": 8, "num_stages": 2}
        assert lc.launch_config("dq", 64, 64, 128, bf16, CPU) == dq
    assert lc.launch_config("fwd", 64, 64, 128, bf16, CPU) == table
    assert not lc.active_overrides()


def test_an_override_key_left_out_keeps_the_tables(on_gpu_path):
    with lc.launch_overrides({"fwd": {"num_stages": 1}}):
        assert lc.launch_config("fwd", 128, 64, 128, torch.float16, CPU) == {"num_warps": 8, "num_stages": 1}


def test_nested_overrides_replace_per_kernel_and_restore(on_gpu_path):
    with lc.launch_overrides({"fwd": {"num_warps": 2}, "dq": {"num_warps": 2}}):
        with lc.launch_overrides({"fwd": {"num_stages": 4}}):
            assert dict(lc.active_overrides()) == {"fwd": {"num_stages": 4}, "dq": {"num_warps": 2}}
            assert lc.launch_config("fwd", 64, 64, 64, torch.float16, CPU) == {"num_warps": 4, "num_stages": 4}
        assert dict(lc.active_overrides()) == {"fwd": {"num_warps": 2}, "dq": {"num_warps": 2}}
    assert not lc.active_overrides()


def test_overrides_end_on_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with lc.launch_overrides({"dkdv": {"num_warps": 8}}):
            assert "dkdv" in lc.active_overrides()
            raise RuntimeError("inside")
    assert not lc.active_overrides()


def test_overrides_reach_other_threads_while_active():
    # On CUDA the autograd engine runs the backward kernels' launches in a thread of its own.
    seen = []

    def read():
        seen.append(dict(lc.active_overrides()))

    with lc.launch_overrides({"dq": {"num_stages": 1}}):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    assert seen == [{"dq": {"num_stages": 1}}]


def test_overrides_are_read_only():
    with lc.launch_overrides({"fwd": {"num_warps": 4}}):
        with pytest.raises(TypeError):
            lc.active_overrides()["dq"] = {"num_warps": 4}
        with pytest.raises(TypeError):
            lc.active_overrides()["fwd"]["num_warps"] = 8


@pytest.mark.parametrize("overrides, named", [
    ({"fwd_kernel": {"num_warps": 4}}, "fwd_kernel"),
    ({"fwd": {"num_warps": 4}, "bwd": {}}, "bwd"),
    ({"fwd": {"warps": 4}}, "warps"),
    ({"dq": {"num_stages": 2, "maxnreg": 128}}, "maxnreg"),
    ({"dq": {"num_stages": 0}}, "num_stages"),
    ({"dq": {"num_warps": "4"}}, "num_warps"),
    ({"dq": {"num_warps": True}}, "num_warps"),
    ({"dq": (4, 2)}, "dq"),
    ([("dq", {"num_warps": 4})], "dict"),
    ({"fwd": {"chunk": 24}}, "chunk"),  # not a power of two
    ({"fwd": {"chunk": 8}}, "chunk"),  # below the smallest dot
    ({"fwd": {"chunk": True}}, "chunk"),
    ({"dq": {"chunk": 32}}, "chunk"),  # only the forward's epilogue is sliced
])
def test_overrides_are_checked_when_given(overrides, named):
    with pytest.raises(ValueError, match=named):
        lc.launch_overrides(overrides)  # before any with block is entered
    assert not lc.active_overrides()


def test_epilogue_chunk_slices_bf16_only_unless_overridden():
    assert lc.epilogue_chunk(128, torch.bfloat16) == lc.EPILOGUE_CHUNK == 32
    assert lc.epilogue_chunk(16, torch.bfloat16) == 16  # never wider than the head dim
    for dtype in (torch.float16, torch.float32):  # fp32 states: H_i whole (see EPILOGUE_CHUNK)
        assert lc.epilogue_chunk(128, dtype) == 128
    with lc.launch_overrides({"fwd": {"chunk": 64}}):
        assert lc.epilogue_chunk(128, torch.float16) == 64
        assert lc.epilogue_chunk(32, torch.bfloat16) == 32
    assert lc.epilogue_chunk(128, torch.float16) == 128
    # the split forward's second launch holds the slices and a row tile; the fused forward's loop stays the larger
    # phase, so its estimate is the same as before the slicing (bench/results_smem_sm90_tma.json, compiled)
    assert lc.estimate_shared_memory("fwd_mix", 128, 64, 128, torch.bfloat16, 1) == 128 * 128 * 4
    assert lc.estimate_shared_memory("fwd", 64, 64, 128, torch.bfloat16, 3) == 114688
