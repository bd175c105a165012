"""The GPU block classifier (``sla/ops/sla/triton/blockmap.py``) under Triton's CPU interpreter.

Every case compares the whole :class:`BlockMap` field by field with the PyTorch builder
``sla.ops.sla.blockmap.build_block_map`` (the spec). Inputs are chosen so that the comparison is exact:
random continuous values (no near-ties at fp32 rounding), or small integers whose pooled scores are exact in
fp32 in any summation order, which makes exact ties common and the tie rule decisive. All allocations inside
the builder are poisoned (NaN for floats, -77 for integers), so an entry a kernel forgets to write fails.
On the GPU, ``tests/gpu/test_triton_gpu.py`` compares the builders at L = 32760.
"""

import contextlib
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU CI; on CUDA run bench/bench_blockmap.py", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"  # before sla.ops.sla.triton is imported (tests/conftest.py sets it too)
pytest.importorskip("triton")

from sla.ops.sla.blockmap import build_block_map  # noqa: E402
from sla.ops.sla.triton import build_block_map_triton  # noqa: E402

FIELDS = ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
          "negligible_lut_t_offsets", "negligible_lut_t")


@contextlib.contextmanager
def poisoned_allocations():
    """``torch.empty`` returns NaN-filled float tensors and -77-filled integer tensors."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -77)
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def assert_same_map(q, k, critical, negligible, block_q, block_k):
    ref = build_block_map(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    with poisoned_allocations():
        got = build_block_map_triton(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    for field in FIELDS:
        want, have = getattr(ref, field), getattr(got, field)
        assert want.shape == have.shape, (field, want.shape, have.shape)
        assert torch.equal(want, have), field
    assert (got.seq_len_q, got.seq_len_k, got.block_q, got.block_k) == (ref.seq_len_q, ref.seq_len_k, block_q, block_k)
    return got


def quantized(B, H, L, D, block, seed, zero_mean=False):
    """Block-constant small integers (exact in fp16/bf16): block means are exact and scores, sums of products
    of small integers (and, in one block, multiples of 1/block), are exact in any summation order. Scores
    then take few distinct values, so thresholds often fall inside a tie and the tie rule decides. With
    ``zero_mean`` every dim sums to 0 over the tokens, so smooth-K's ``mean(k)`` is exact too."""
    g = torch.Generator().manual_seed(seed)
    nb, tail = -(-L // block), L % block
    vals = torch.randint(-2, 3, (B, H, nb, D), generator=g).float()
    if zero_mean:
        n_full = L // block
        half = n_full // 2
        vals[:, :, half:2 * half] = -vals[:, :, :half]
        vals[:, :, 2 * half:n_full] = 0.0
    x = vals.repeat_interleave(block, dim=2)[:, :, :L].clone()
    if zero_mean and tail:
        x[:, :, :tail] -= vals[:, :, -1:]  # cancels the tail block's sum (block 0's mean stays exact: /block)
    if zero_mean:
        assert float(x.sum(dim=2).abs().max()) == 0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_q, block_k", [(64, 64), (128, 64)])
def test_exact_ties_follow_the_tie_rule(dtype, block_q, block_k):
    # Lq, Lk ragged and different; scores take few distinct values, so most thresholds fall inside a tie.
    q = quantized(1, 2, 1500, 16, block_q, seed=1).to(dtype)
    k = quantized(1, 2, 1100, 16, block_k, seed=2, zero_mean=True).to(dtype)
    got = assert_same_map(q, k, 0.2, 0.3, block_q, block_k)
    assert (got.class_map == 1).sum(-1).eq(got.n_critical).all()


def test_all_scores_tie():
    q, k = torch.ones(1, 1, 256, 16), torch.ones(1, 1, 1000, 16)
    got = assert_same_map(q, k, 0.25, 0.5, 64, 32)
    Tn = got.num_key_blocks
    n_crit, n_negl = got.n_critical, got.n_negligible
    assert got.class_map[0, 0, 0].tolist() == [1] * n_crit + [0] * (Tn - n_crit - n_negl) + [-1] * n_negl


def test_nan_and_infinite_scores():
    # An infinite query block meets keys above, below and exactly at the key mean: +inf, -inf and NaN
    # (inf * 0) scores in one row, each value many times over. NaN ranks above everything.
    q = quantized(1, 1, 512, 16, 64, seed=3)
    q[0, 0, 64:128, 0] = float("inf")
    k = quantized(1, 1, 1024, 16, 64, seed=4, zero_mean=True)
    blocks = k[0, 0].view(16, 64, 16)
    blocks[:, :, 0] = torch.tensor([2.0, -1.0, 0.0, -1.0] * 4)[:, None]  # block means in dim 0, sum 0 over blocks
    got = assert_same_map(q, k, 0.25, 0.25, 64, 64)
    row = got.class_map[0, 0, 1].tolist()
    assert [j for j in range(16) if row[j] == 1] == [2, 6, 10, 14]  # the NaN scores
    assert [j for j in range(16) if row[j] == -1] == [9, 11, 13, 15]  # the highest indices among 8 tied -inf
    # Rows of all-NaN scores (a NaN query block): every block ties.
    q[0, 0, 256:320, 3] = float("nan")
    assert_same_map(q, k, 0.25, 0.25, 64, 64)


@pytest.mark.parametrize("critical, negligible", [
    pytest.param(1.0, 0.0, id="critical-1"),
    pytest.param(0.3, 0.0, id="no-negligible"),
    pytest.param(0.01, 0.99, id="one-critical-rest-negligible"),
])
def test_extreme_counts(critical, negligible):
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 700, 32), torch.randn(1, 2, 650, 32)
    got = assert_same_map(q, k, critical, negligible, 64, 64)
    assert got.n_critical + got.n_negligible <= got.num_key_blocks


def test_single_key_block():
    torch.manual_seed(2)
    assert_same_map(torch.randn(1, 1, 40, 64), torch.randn(1, 1, 40, 64), 0.05, 0.1, 64, 64)


def test_strided_blhd_view():
    torch.manual_seed(4)
    q = torch.randn(1, 777, 3, 64).transpose(1, 2)  # (B, L, H, D) buffer seen as (B, H, L, D)
    k = torch.randn(1, 900, 3, 64).transpose(1, 2)
    assert_same_map(q, k, 0.1, 0.1, 64, 64)


def test_ties_nan_and_extremes_together():
    # The bisection selection on inputs that mix the hard cases: many ties, an infinite and a NaN query block,
    # all-equal scores, critical = 1 and one critical block with the rest negligible; longer rows as well.
    q = quantized(1, 2, 1500, 16, 64, seed=7)
    k = quantized(1, 2, 1100, 16, 64, seed=8, zero_mean=True)
    assert_same_map(q, k, 0.2, 0.3, 64, 64)
    assert_same_map(q, k, 0.05, 0.0, 128, 64)
    assert_same_map(torch.ones(1, 1, 256, 16), torch.ones(1, 1, 1000, 16), 0.25, 0.5, 64, 32)  # all tie
    q[0, 0, 64:128, 0] = float("inf")
    q[0, 1, 256:320, 3] = float("nan")
    assert_same_map(q, k, 0.25, 0.25, 64, 64)
    torch.manual_seed(9)
    assert_same_map(torch.randn(1, 2, 700, 32), torch.randn(1, 2, 650, 32), 1.0, 0.0, 64, 64)
    assert_same_map(torch.randn(1, 2, 700, 32), torch.randn(1, 2, 650, 32), 0.01, 0.99, 64, 64)
    q = quantized(1, 2, 2100, 16, 64, seed=5)
    k = quantized(1, 2, 1234, 16, 64, seed=6, zero_mean=True)
    assert_same_map(q, k, 0.2, 0.3, 64, 64)
    assert_same_map(q, k, 0.2, 0.0, 128, 64)


def test_partial_transposes_for_the_op():
    # "critical" builds only what backward reads, "none" only what forward reads; the rest of the map is the
    # same, and a map without the critical transpose is refused where a gradient will flow.
    import sla

    torch.manual_seed(10)
    q, k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 260, 16), torch.randn(1, 2, 260, 16)
    full = build_block_map_triton(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=32)
    for transposes, built in (("critical", ("critical_lut_t_offsets", "critical_lut_t")), ("none", ())):
        with poisoned_allocations():
            part = build_block_map_triton(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=32,
                                          transposes=transposes)
        for field in FIELDS:
            if "_lut_t" in field and field not in built:
                assert getattr(part, field).shape == (1, 2, 0), field
            else:
                assert torch.equal(getattr(part, field), getattr(full, field)), field
    with pytest.raises(ValueError, match="transposes='none'"):
        sla.sparse_linear_attention(q.requires_grad_(), k, v, block_map=part, backend="triton")
    with torch.no_grad():
        out = sla.sparse_linear_attention(q, k, v, block_map=part, backend="triton")
    assert torch.equal(out, sla.sparse_linear_attention(q.detach(), k, v, block_map=full, backend="triton"))
    with pytest.raises(ValueError, match="transposes must be"):
        build_block_map_triton(q, k, transposes="some")
