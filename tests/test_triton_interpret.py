"""The SLA Triton kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``): fp32 and fp16 only
(bf16 dots are silently wrong in the interpreter), small shapes, one pinned launch configuration.

Every case compares output and gradients against the fp64 dense reference with the rule
``max|kernel - gold| <= factor * max|pt - gold| + ulp``, where pt is the reference run in the test dtype and the
factor is 2 except for the two token-sum gradients (``RULE_FACTORS`` in ``sla/ops/sla/triton/testing.py`` says why
and what was measured); kernel and reference get the same BlockMap. Outputs are NaN-poisoned before the kernels
write them and inputs sit inside NaN guard bands. On a CUDA machine these tests are skipped: the same
checks run on the GPU in ``tests/gpu/test_triton_gpu.py``.
"""

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("interpreter tests are for CPU CI; on CUDA run tests/gpu/test_triton_gpu.py", allow_module_level=True)

# Must be set before the kernels are decorated, i.e. before sla.ops.sla.triton is imported.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import sla  # noqa: E402
from sla.ops.sla.blockmap import block_lengths, build_block_map  # noqa: E402
from sla.ops.sla.triton import (  # noqa: E402
    build_block_map_triton,
    sla_triton_bwd,
    sla_triton_fwd,
    triton_sparse_linear_attention,
)
from sla.ops.sla.triton.api import coarse_codes, scope_mask_for  # noqa: E402
from sla.ops.sla.triton.launch import _blocked, block_means  # noqa: E402
from sla.ops.sla.triton.launch_config import EPILOGUE_CHUNK, TMA_KERNELS, launch_overrides, tma_loads  # noqa: E402
from sla.settings import MIXING_RULES, POOLED_RULES  # noqa: E402
from sla.ops.sla.triton.testing import (  # noqa: E402
    assert_outputs_within_rule,
    assert_unchanged_under_autocast,
    gradient_names,
    guarded_bhld,
    nan_poisoned_allocations,
    reference_outputs,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


def _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj, critical=0.4,
              negligible=0.3, guard=True, combine="paper", with_bias=None):
    # critical=0.4 keeps >= 2 critical blocks per row: with a single one-token critical block the softmax is
    # exactly 1, the fp64 dK is exactly 0 and the fp32 kernel's ~1e-6 cancellation residue would be judged
    # against an ulp floor taken at the (much smaller) output magnitude.
    q0 = torch.randn(B, H, Lq, D, dtype=dtype)
    k0 = torch.randn(B, H, Lk, D, dtype=dtype)
    v0 = torch.randn(B, H, Lk, D, dtype=dtype)
    if guard:
        q, k, v = (guarded_bhld(x).requires_grad_() for x in (q0, k0, v0))
    else:
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    w = (0.2 * torch.randn(D, D)).requires_grad_() if with_proj else None
    with_bias = with_proj if with_bias is None else with_bias
    b = torch.randn(D).requires_grad_() if with_bias else None
    # Offsets around the values a trained layer reaches (docs/semantics.md): a in (0, 1), neither saturated.
    mo = torch.randn(H).requires_grad_() if combine in MIXING_RULES else None
    bm = build_block_map(q0, k0, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    do = torch.randn(B, H, Lq, D, dtype=dtype)
    with nan_poisoned_allocations():
        o = triton_sparse_linear_attention(q, k, v, bm, feature_map=feature_map, linear_scope=linear_scope,
                                           proj_weight=w, proj_bias=b, combine=combine, mass_offset=mo)
        wrt = [x for x in (q, k, v, w, b, mo) if x is not None]
        grads = torch.autograd.grad(o, wrt, do)
    ref = reference_outputs(q0, k0, v0, bm, feature_map=feature_map, linear_scope=linear_scope, proj_weight=w,
                            proj_bias=b, scale=None, do=do, combine=combine, mass_offset=mo)
    assert o.dtype == dtype and o.shape == (B, H, Lq, D)
    names = [n for n in gradient_names(with_proj, mo is not None) if n != "db" or with_bias]
    assert_outputs_within_rule(o, grads, ref, names)


CASES = [
    # (B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj)
    pytest.param(1, 2, 200, 200, 64, 64, 64, "marginal", "softmax", True, id="marginal-softmax-64x64-L200-proj"),
    pytest.param(1, 2, 300, 190, 64, 128, 64, "noncritical", "elu", True, id="noncritical-elu-128x64-Lq300-Lk190"),
    pytest.param(2, 1, 130, 257, 64, 64, 64, "all", "relu", False, id="all-relu-64x64-Lq130-Lk257-noproj"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj", CASES)
def test_kernels_match_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj, dtype):
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj)


MASS_CASES = [
    # (..., with_proj, with_bias): the linear-q kernel forms the mass rule's g from dO W and, with a bias, dO . b
    pytest.param(1, 2, 200, 200, 64, 64, 64, "marginal", "softmax", True, True, id="mass-marginal-softmax-64x64-proj"),
    pytest.param(2, 1, 130, 257, 32, 32, 64, "all", "elu", False, False, id="mass-all-elu-32x64-Lq130-Lk257-noproj"),
    pytest.param(1, 2, 300, 190, 64, 128, 64, "noncritical", "relu", True, False,
                 id="mass-noncritical-relu-128x64-Lq300-Lk190-weight-no-bias"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj, with_bias",
                         MASS_CASES)
def test_mass_combine_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj,
                                        with_bias, dtype):
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj, combine="mass",
              with_bias=with_bias)


POOLED_CASES = [
    # The coarse kernels' chunks of 64 key-block means: T_n = 4 (one partial chunk), and T_n = 70 at block_k 16 (a
    # full chunk and a partial one, in forward and in both backward kernels, the dK/dV kernel over split query
    # blocks). The linear-q kernel adds dO . o_c to g with and without a bias.
    pytest.param(1, 2, 200, 200, 64, 64, 64, "marginal", "softmax", True, True,
                 id="pooled-marginal-softmax-64x64-proj"),
    pytest.param(2, 1, 130, 257, 32, 32, 64, "all", "elu", False, False, id="pooled-all-elu-32x64-Lq130-Lk257-noproj"),
    pytest.param(1, 2, 300, 190, 64, 128, 64, "noncritical", "relu", True, False,
                 id="pooled-noncritical-relu-128x64-Lq300-Lk190-weight-no-bias"),
    pytest.param(1, 1, 96, 1115, 16, 32, 16, "marginal", "softmax", True, True, id="pooled-two-chunks-Tn70"),
]


# combine="pooled_cov" on the same cases: the coarse forward's second pass and pbar, the coarse kernels' u term,
# the covariance state's matmuls (partial last query and key blocks: Lq 130/300, Lk 257/190/1115).
@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj, with_bias",
                         POOLED_CASES)
def test_pooled_combine_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj,
                                          with_bias, dtype, combine):
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj, combine=combine,
              with_bias=with_bias)


# The launch forms that are not the default (launch_config.TMA_BY_DEFAULT, FWD_SPLIT_BY_DEFAULT): the sparse kernels'
# TMA loads (the interpreter runs descriptor loads) and the forward in two launches, each under the same rule against
# fp64, inputs inside NaN guard bands (the descriptor's bounds must keep the guard rows out), ragged blocks.
@pytest.mark.parametrize("form", ["tma", "split"])
@pytest.mark.parametrize("combine", ["paper", "mass", "pooled_cov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj",
                         [CASES[0], CASES[2]])
def test_launch_forms_match_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj, dtype,
                                      combine, form):
    from sla.ops.sla.triton import launch

    tma, parts = [], []
    real_descriptors, real_config = launch._row_descriptors, launch.launch_config

    def spy_descriptors(kernel, rows, *xs):
        use, out = real_descriptors(kernel, rows, *xs)
        tma.append((kernel, use))
        return use, out

    def spy_config(kernel, *args):
        parts.append(kernel)
        return real_config(kernel, *args)

    overrides = ({kernel: {"tma": True} for kernel in TMA_KERNELS} if form == "tma" else {"fwd": {"split": True}})
    with launch_overrides(overrides), pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "_row_descriptors", spy_descriptors)
        mp.setattr(launch, "launch_config", spy_config)
        _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj, combine=combine)
    assert sorted(set(tma)) == [("dkdv", form == "tma"), ("dq", form == "tma"), ("fwd", form == "tma")]
    assert ("fwd_mix" in parts) == (form == "split")


# The forward's epilogue in slices of H_i's columns (W^T's rows): the default only for bfloat16, which the
# interpreter cannot check (its bf16 matmuls are wrong), so forced here in fp32 and fp16 under the same rule.
@pytest.mark.parametrize("combine", ["paper", "mass", "pooled_cov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj", CASES[:2])
def test_sliced_epilogue_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, with_proj,
                                           dtype, combine):
    from sla.ops.sla.triton import launch

    chunks = []
    real_chunk = launch.epilogue_chunk

    def spy_chunk(*args):
        chunks.append(real_chunk(*args))
        return chunks[-1]

    with launch_overrides({"fwd": {"chunk": 16}}), pytest.MonkeyPatch.context() as mp:
        mp.setattr(launch, "epilogue_chunk", spy_chunk)
        _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj, combine=combine)
    assert chunks and set(chunks) == {16}  # D = 64: four slices


def test_sliced_epilogue_at_head_dim_128_fp16():
    # The default width (32) in four slices at the head dim the benchmarks use.
    with launch_overrides({"fwd": {"chunk": EPILOGUE_CHUNK}}):
        _run_case(1, 1, 130, 130, 128, 64, 64, torch.float16, "marginal", "softmax", True, combine="mass")


@pytest.mark.parametrize("combine", ["mass", "pooled"])
def test_launch_forms_agree_on_strided_views(combine):
    # (B, L, H, D) tensors viewed as (B, H, L, D), as diffusers passes them: every form gives the same output and
    # gradients in fp32 (the loads and launches differ, not the arithmetic; the sliced epilogue, chunk 16 of D = 32,
    # sums the projection in two pieces), and the same output in inference, where the split forward passes o_s
    # through o itself.
    x = [torch.randn(1, 300, 2, 32).transpose(1, 2).requires_grad_() for _ in range(3)]
    w = 0.2 * torch.randn(32, 32)
    kw = dict(critical=0.2, negligible=0.1, block_q=32, block_k=64, backend="triton", combine=combine, proj_weight=w)
    results = []
    forms = ((False, False, 32), (True, False, 32), (False, True, 32), (True, True, 32), (False, False, 16),
             (True, True, 16))
    for tma, split, chunk in forms:
        for t in x:
            t.grad = None
        with launch_overrides({"fwd": {"tma": tma, "split": split, "chunk": chunk}, "dq": {"tma": tma},
                               "dkdv": {"tma": tma}}):
            o = sla.sparse_linear_attention(*x, **kw)
            o.backward(torch.ones_like(o))
            with torch.no_grad():
                o_inference = sla.sparse_linear_attention(*x, **kw)
        results.append([o.detach(), o_inference] + [t.grad.clone() for t in x])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_tma_default_is_off_in_the_interpreter_and_forcing_checks_alignment():
    q = torch.randn(1, 2, 64, 32)
    assert not tma_loads("fwd", q)
    odd = torch.randn(1, 2, 64, 33)[..., :32]  # row stride 33 floats = 132 bytes, not a multiple of 16
    with launch_overrides({"fwd": {"tma": True}}):
        assert tma_loads("fwd", q)
        with pytest.raises(ValueError, match="16-byte aligned"):
            tma_loads("fwd", odd)
    with pytest.raises(ValueError, match="must be True or False"):
        launch_overrides({"fwd": {"tma": 1}})
    with pytest.raises(ValueError, match="unknown key"):
        launch_overrides({"state": {"tma": True}})
    with pytest.raises(ValueError, match="unknown key"):
        launch_overrides({"dq": {"split": True}})


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
def test_pooled_combine_all_critical_equals_dense_attention(combine):
    # Every block critical: log_rest is -inf, a is exactly 1, o_c is 0 (nothing in scope; pooled_cov's weights pbar
    # are 0 too): dense attention, with dense gradients; g = 0 exactly, so the projection and the offsets get
    # nothing.
    q, k, v = (torch.randn(1, 2, 150, 64, requires_grad=True) for _ in range(3))
    w, b, mo = (torch.randn(*shape, requires_grad=True) for shape in ((64, 64), (64,), (2,)))
    bm = build_block_map(q.detach(), k.detach(), critical=1.0, negligible=0.0, block_q=64, block_k=64)
    with nan_poisoned_allocations():
        o = triton_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b, combine=combine,
                                           mass_offset=mo)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v, w, b, mo), do)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
    torch.testing.assert_close(o.double(), dense, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads[:3], torch.autograd.grad(dense, (qd, kd, vd), do.double())):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    for got in grads[3:]:
        assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
def test_pooled_combine_through_the_public_operator(combine):
    # backend="triton" runs the rule (each was refused before its kernels existed) and agrees with the PyTorch path.
    q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
    mo = torch.randn(2)
    o, info = sla.sparse_linear_attention(q, k, v, critical=0.25, negligible=0.25, combine=combine, mass_offset=mo,
                                          backend="triton", return_info=True)
    ref = sla.sparse_linear_attention(q, k, v, combine=combine, mass_offset=mo, backend="torch",
                                      block_map=info.block_map)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_pooled_cov_reads_strided_views_and_short_blocks():
    # (B, L, H, D) buffers viewed as (B, H, L, D), lengths that leave partial query and key blocks: the covariance
    # state's block views and padding, forward and backward, against the PyTorch path on the same block map.
    q, k, v, do = (torch.randn(1, 150, 2, 32).transpose(1, 2) for _ in range(4))
    mo = torch.randn(2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, mo)]
    o, info = sla.sparse_linear_attention(*leaves[:3], critical=0.3, negligible=0.2, block_q=32, block_k=32,
                                          combine="pooled_cov", mass_offset=leaves[3], backend="triton",
                                          return_info=True)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, mo)]
    ref = sla.sparse_linear_attention(*ref_leaves[:3], combine="pooled_cov", mass_offset=ref_leaves[3],
                                      backend="torch", block_map=info.block_map)
    torch.testing.assert_close(o, ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, do)):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_block_means_and_codes():
    x = torch.randn(2, 3, 150, 16).transpose(1, 2).contiguous().transpose(1, 2)  # a (B, L, H, D) buffer's view
    m = block_means(x, 64, block_lengths(150, 64).float())
    want = torch.stack([x[:, :, :64].mean(2), x[:, :, 64:128].mean(2), x[:, :, 128:].mean(2)], dim=2)
    assert m.is_contiguous() and m.shape == (2, 3, 3, 16)
    torch.testing.assert_close(m, want, atol=1e-6, rtol=1e-6)
    x = torch.randn(1, 2, 128, 16)  # blocks tile the sequence: no last partial block
    torch.testing.assert_close(block_means(x, 32, block_lengths(128, 32).float()), x.unflatten(2, (4, 32)).mean(3),
                               atol=1e-6, rtol=1e-6)
    bm = build_block_map(torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16), critical=0.25, negligible=0.25)
    codes = coarse_codes(bm, "marginal")
    cm = bm.class_map
    assert codes.dtype == torch.uint8
    assert torch.equal(codes, (cm != 1).to(torch.uint8) + 2 * (cm == 0).to(torch.uint8))


def test_mass_combine_all_critical_equals_dense_attention():
    # Nothing in the linear scope: the mixing weight is exactly 1 and SLA is dense attention, whatever Proj is;
    # so are its gradients, and the logit's gradient g = dO.(o_s - Proj(o_l)) a (1 - a) is exactly 0, which leaves
    # nothing for the projection and the offsets.
    q, k, v = (torch.randn(1, 2, 150, 64, requires_grad=True) for _ in range(3))
    w, b, mo = (torch.randn(*shape, requires_grad=True) for shape in ((64, 64), (64,), (2,)))
    bm = build_block_map(q.detach(), k.detach(), critical=1.0, negligible=0.0, block_q=64, block_k=64)
    o = triton_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b, combine="mass", mass_offset=mo)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
    torch.testing.assert_close(o.double(), dense, atol=2e-5, rtol=1e-5)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, w, b, mo), do)
    for got, want in zip(grads[:3], torch.autograd.grad(dense, (qd, kd, vd), do.double())):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    for got in grads[3:]:
        assert torch.equal(got, torch.zeros_like(got))


def test_head_dim_128_fp16():
    _run_case(1, 1, 160, 150, 128, 64, 64, torch.float16, "marginal", "softmax", True)


def test_contiguous_input_and_short_sequences():
    # L smaller than one block, no guard band (plain contiguous tensors).
    _run_case(1, 1, 17, 40, 64, 64, 64, torch.float32, "marginal", "softmax", True, guard=False)


def test_all_critical_equals_dense_attention():
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    bm = build_block_map(q, k, critical=1.0, negligible=0.0, block_q=64, block_k=64)
    zero = torch.zeros(64, 64)
    o = triton_sparse_linear_attention(q, k, v, bm, proj_weight=zero, proj_bias=torch.zeros(64))
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(o.double(), dense, atol=2e-5, rtol=1e-5)


def test_public_api_dispatch(monkeypatch):
    q, k, v = (torch.randn(1, 1, 70, 64) for _ in range(3))
    o, info = sla.sparse_linear_attention(q, k, v, critical=0.5, negligible=0.0, backend="triton", return_info=True)
    assert info.backend == "triton"
    ref = sla.sparse_linear_attention(q, k, v, critical=0.5, negligible=0.0, backend="reference",
                                      block_map=info.block_map)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    # auto stays on the PyTorch path on CPU; explicit triton without the interpreter is a clear error.
    _, info = sla.sparse_linear_attention(q, k, v, return_info=True)
    assert info.backend == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sla.sparse_linear_attention(q, k, v, backend="triton")


def test_unsupported_inputs_raise():
    q = torch.randn(1, 1, 64, 48)
    bm = build_block_map(q, q, critical=0.5, negligible=0.0)
    with pytest.raises(ValueError, match="head_dim"):
        triton_sparse_linear_attention(q, q, q, bm)
    q = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    bm = build_block_map(q, q, critical=0.5, negligible=0.0)
    with pytest.raises(TypeError, match="float64"):
        triton_sparse_linear_attention(q, q, q, bm)
    q = torch.randn(1, 1, 96, 64)
    bm = build_block_map(q, q, critical=0.5, negligible=0.0, block_q=48, block_k=48)
    with pytest.raises(ValueError, match="block_q"):
        triton_sparse_linear_attention(q, q, q, bm)
    q = torch.randn(1, 1, 64, 64)
    bm = build_block_map(q, q, critical=0.5, negligible=0.0)
    with pytest.raises(ValueError, match="scale"):
        triton_sparse_linear_attention(q, q, q, bm, scale=-1.0)
    with pytest.raises(ValueError, match="feature_map"):
        triton_sparse_linear_attention(q, q, q, bm, feature_map="gelu")
    with pytest.raises(ValueError, match="combine must be"):
        triton_sparse_linear_attention(q[..., :32], q[..., :32], q[..., :32], build_block_map(
            q[..., :32], q[..., :32], critical=0.5, negligible=0.0), combine="pooled_covariance")


def _op_args(dtype=torch.float32, linear_scope="marginal", with_proj=True, store_aux=True, combine="paper"):
    B, H, L, D, blk = 1, 2, 48, 16, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
    bm = build_block_map(q, k, critical=0.34, negligible=0.34, block_q=blk, block_k=blk)
    w, b = (torch.randn(D, D), torch.randn(D)) if with_proj else (None, None)
    mo = torch.randn(H) if combine in MIXING_RULES else None
    codes = coarse_codes(bm, linear_scope) if combine in POOLED_RULES else None
    return (q, k, v, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t,
            scope_mask_for(bm, linear_scope, torch.float32), w, b, mo, codes, D ** -0.5, blk, blk, "softmax", combine,
            store_aux)


@pytest.mark.parametrize("linear_scope, with_proj, combine",
                         [("marginal", True, "paper"), ("all", False, "paper"), ("marginal", True, "mass"),
                          ("marginal", True, "pooled"), ("noncritical", False, "pooled"),
                          ("marginal", True, "pooled_cov")])
def test_opcheck(linear_scope, with_proj, combine):
    args = _op_args(linear_scope=linear_scope, with_proj=with_proj, combine=combine)
    grad_args = [a.clone().requires_grad_() if i in (0, 1, 2, 7, 8, 9) and a is not None else a
                 for i, a in enumerate(args)]
    torch.library.opcheck(sla_triton_fwd, grad_args)
    o, o_s, o_l, lse, a, o_c, rows, means = sla_triton_fwd(*args)
    assert (o_c.numel() > 0) == (combine in ("pooled", "pooled_cov"))
    bwd_args = (torch.randn_like(o), *args[:3], o_s, o_l, lse, a, *args[3:11], o_c, rows, means, *args[11:-1])
    torch.library.opcheck(sla_triton_bwd, bwd_args)


def test_inference_writes_output_only():
    # Without autograd the forward keeps nothing for backward, and o is the same as with it.
    for combine in ("paper", "pooled", "pooled_cov"):
        args = _op_args(store_aux=False, combine=combine)
        o, *aux = sla_triton_fwd(*args)
        assert all(x.numel() == 0 for x in aux)
        torch.testing.assert_close(o, sla_triton_fwd(*args[:-1], True)[0], rtol=0, atol=0)
    q, k, v = (a.clone().requires_grad_() for a in args[:3])
    with pytest.raises(RuntimeError, match="store_aux"):
        sla_triton_fwd(q, k, v, *args[3:])


@pytest.mark.parametrize("combine", ["mass", "pooled", "pooled_cov"])
def test_torch_compile_fullgraph(combine):
    # Compiled (fullgraph, aot_eager on CPU) and eager: the output and every gradient meet the rule against the
    # fp64 reference, both of them (not compared with each other bit for bit: a traced graph may decompose the
    # PyTorch ops around the kernels differently).
    q, k, v, do = (torch.randn(1, 2, 80, 64) for _ in range(4))
    w, b, mo = torch.randn(64, 64) * 0.1, torch.randn(64), torch.randn(2)
    bm = build_block_map(q, k, critical=0.5, negligible=0.25)
    ref = reference_outputs(q, k, v, bm, feature_map="softmax", linear_scope="marginal", proj_weight=w, proj_bias=b,
                            scale=None, do=do, combine=combine, mass_offset=mo)

    def f(q, k, v, w, b, mo):
        return triton_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b, combine=combine,
                                              mass_offset=mo)

    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, w, b, mo)]
        o = fn(*leaves)
        assert_outputs_within_rule(o, torch.autograd.grad(o, leaves, do), ref, gradient_names(True, True))


def test_torch_compile_fullgraph_public_entry_point():
    # The public operator with backend="triton" traces in one graph from a fresh state of the backend's cached
    # checks. (The device check once called importlib's find_spec, which torch 2.11's dynamo refuses to trace; the
    # GPU test caught it. torch 2.13's dynamo traces it, so on CPU this guards the entry point as a whole.)
    from sla.ops.sla.triton import backend as triton_backend

    getattr(triton_backend, "_INSTALLED", {}).clear()
    q, k, v, do = (torch.randn(1, 2, 80, 64) for _ in range(4))
    w = torch.randn(64, 64) * 0.1
    bm = build_block_map(q, k, critical=0.5, negligible=0.25)
    ref = reference_outputs(q, k, v, bm, feature_map="softmax", linear_scope="marginal", proj_weight=w, proj_bias=None,
                            scale=None, do=do, combine="mass", mass_offset=None)

    def f(q, k, v, w):
        return sla.sparse_linear_attention(q, k, v, proj_weight=w, critical=0.5, negligible=0.25, backend="triton")

    torch._dynamo.reset()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
    o = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    assert_outputs_within_rule(o, torch.autograd.grad(o, leaves, do), ref, gradient_names(True, False)[:4])


def test_compiled_and_eager_runs_build_the_same_block_map():
    # One builder for both (the op sla::triton_block_map): the compiled graph calls the same kernels, so the maps are
    # equal field by field (the same kernels on the same inputs; nothing here depends on which CPU runs it).
    from sla.ops.sla.triton import build_block_map_triton

    q, k = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 257, 64)

    def build(q, k):
        bm = build_block_map_triton(q, k, critical=0.3, negligible=0.3)
        return tuple(getattr(bm, f) for f in BLOCKMAP_FIELDS)

    torch._dynamo.reset()
    compiled = torch.compile(build, fullgraph=True, backend="aot_eager")(q, k)
    for name, a, b in zip(BLOCKMAP_FIELDS, build(q, k), compiled):
        assert torch.equal(a, b), name
    # The public operator under compile builds its map with that op too.
    f = torch.compile(lambda q, k: sla.sparse_linear_attention(q, k, k, critical=0.3, negligible=0.3, backend="triton",
                                                               return_info=True)[1].class_map,
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(q, k), build(q, k)[0])


def test_block_map_op_passes_opcheck():
    from sla.ops.sla.triton.blockmap import sla_triton_block_map

    q, k = torch.randn(1, 2, 130, 32), torch.randn(1, 2, 100, 32)
    for transposes in ("all", "critical", "none"):
        torch.library.opcheck(sla_triton_block_map, (q, k, 0.25, 0.25, 32, 32, transposes))


BLOCKMAP_FIELDS = ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
                   "negligible_lut_t_offsets", "negligible_lut_t")


@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, critical, negligible", [
    pytest.param(1, 2, 300, 257, 64, 64, 64, 0.3, 0.3, id="ragged-64x64"),
    pytest.param(2, 1, 1000, 777, 32, 128, 64, 0.05, 0.1, id="paper-ratios-128x64"),
    pytest.param(1, 1, 40, 40, 64, 64, 64, 0.05, 0.1, id="one-block"),
    pytest.param(1, 2, 513, 700, 64, 16, 32, 0.2, 0.5, id="small-blocks"),
])
def test_gpu_block_map_equals_reference(B, H, Lq, Lk, D, block_q, block_k, critical, negligible):
    q = torch.randn(B, H, Lq, D) + 0.3
    k = torch.randn(B, H, Lk, D) + 0.5  # a shared key offset, which smooth-K removes
    ref = build_block_map(q, k, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    with nan_poisoned_allocations():
        got = build_block_map_triton(q, k, critical=critical, negligible=negligible, block_q=block_q,
                                     block_k=block_k)
    for field in BLOCKMAP_FIELDS:
        assert torch.equal(getattr(ref, field), getattr(got, field)), field


def test_gpu_block_map_tie_rule():
    # Constant inputs: every score ties, so the rule alone decides (lowest indices critical, highest negligible).
    q, k = torch.ones(1, 1, 256, 64), torch.ones(1, 1, 256, 64)
    ref = build_block_map(q, k, critical=0.25, negligible=0.5, block_q=64, block_k=32)
    got = build_block_map_triton(q, k, critical=0.25, negligible=0.5, block_q=64, block_k=32)
    assert got.class_map[0, 0, 0].tolist() == [1, 1, 0, 0, -1, -1, -1, -1]
    for field in BLOCKMAP_FIELDS:
        assert torch.equal(getattr(ref, field), getattr(got, field)), field


def test_enclosing_autocast_changes_nothing():
    # Under torch.autocast (bf16 fine-tuning) the kernels and the block map keep their own dtypes: the state
    # matmuls and the block scores stay fp32, so results equal those without autocast.
    q, k, v = (torch.randn(1, 2, 200, 64, requires_grad=True) for _ in range(3))
    w, b = (0.2 * torch.randn(64, 64)).requires_grad_(), torch.randn(64).requires_grad_()
    do = torch.randn(1, 2, 200, 64)

    def run():
        bm = build_block_map_triton(q.detach(), k.detach(), critical=0.3, negligible=0.2)
        o = triton_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b)
        return (bm.class_map, o, *torch.autograd.grad(o, (q, k, v, w, b), do))

    assert_unchanged_under_autocast(run, "cpu")


def test_public_api_builds_the_map_with_the_triton_builder(monkeypatch):
    # backend="triton" classifies with the Triton builder, as on the GPU, building only what the map is used for:
    # no CSR transpose for inference, the critical one where a gradient flows, all of them for return_info.
    from sla.ops.sla.triton import blockmap as triton_blockmap

    requested = []
    real = triton_blockmap.build_block_map_triton

    def spy(*args, **kwargs):
        requested.append(kwargs["transposes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_blockmap, "build_block_map_triton", spy)
    q, k, v = (torch.randn(1, 2, 150, 64) for _ in range(3))
    with torch.no_grad():
        o = sla.sparse_linear_attention(q, k, v, critical=0.4, negligible=0.2, backend="triton")
        _, info = sla.sparse_linear_attention(q, k, v, critical=0.4, negligible=0.2, backend="triton",
                                              return_info=True)
    o_train = sla.sparse_linear_attention(q.requires_grad_(), k, v, critical=0.4, negligible=0.2, backend="triton")
    assert requested == ["none", "all", "critical"]
    bm = build_block_map(q.detach(), k, critical=0.4, negligible=0.2)
    for field in BLOCKMAP_FIELDS:
        assert torch.equal(getattr(info.block_map, field), getattr(bm, field)), field
    ref = sla.sparse_linear_attention(q.detach(), k, v, block_map=bm, backend="reference")
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o_train.detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("L", [192, 200])
@pytest.mark.parametrize("centred", [False, True])
def test_blocked_tensors_of_the_covariance_state(L, centred):
    """pooled_cov's blocked tensors: (B, H, T, block, D) in the state dtype, minus each block's mean when asked,
    zero past L; a view of the input when nothing is to change, one new tensor otherwise."""
    torch.manual_seed(0)
    x = torch.randn(1, L, 2, 16, dtype=torch.float16).transpose(1, 2)  # (B, H, L, D), L not innermost-contiguous
    means = torch.randn(1, 2, -(-L // 64), 16, dtype=torch.float16) if centred else None
    got = _blocked(x, 64, torch.float32, means)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, got.shape[2] * 64 - L)).unflatten(2, (-1, 64))
    want = padded - means.float()[:, :, :, None] if centred else padded
    if L % 64:
        want[:, :, -1, L % 64:] = 0
    assert got.shape == (1, 2, -(-L // 64), 64, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # one subtraction in fp32 of fp16 values: exact
    same = _blocked(x, 64, torch.float16)
    assert (same.data_ptr() == x.data_ptr()) == (L % 64 == 0)  # a view exactly when no padding is needed
