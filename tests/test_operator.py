"""The SLA operator: memory-efficient PyTorch path against the dense reference, identities, gradients,
layouts and bad input."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import sla
from sla.ops.sla.naive import naive_sparse_linear_attention
from sla.ops.sla.torch_impl import torch_sparse_linear_attention

SCOPES = ("marginal", "noncritical", "all")
FEATURE_MAPS = ("softmax", "elu", "relu")


def make_qkv(B, H, Lq, Lk, D, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=dtype) for L in (Lq, Lk, Lk))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def make_proj(D, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, D, generator=g, dtype=dtype) / D ** 0.5, torch.randn(D, generator=g, dtype=dtype)


CASES = [
    # (Lq, Lk, D, block_q, block_k, critical, negligible)
    (1, 1, 32, 64, 64, 0.05, 0.10),
    (63, 63, 32, 64, 64, 0.05, 0.10),
    (65, 65, 64, 64, 64, 0.05, 0.10),
    (1000, 1000, 64, 64, 64, 0.05, 0.10),
    (1000, 1000, 128, 128, 64, 0.10, 0.10),
    (63, 1000, 32, 16, 32, 0.2, 0.3),
    (1000, 65, 32, 32, 16, 0.3, 0.2),
    (257, 300, 64, 32, 32, 0.5, 0.5),     # nothing marginal: the paper's linear branch is empty
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "Lq{}-Lk{}-D{}-bq{}-bk{}-c{}-n{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_torch_path_matches_reference(case, dtype):
    Lq, Lk, D, bq, bk, crit, negl = case
    q, k, v = make_qkv(1, 2, Lq, Lk, D, dtype)
    w, b = make_proj(D, dtype)
    bm = sla.build_block_map(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for scope, fm in itertools.product(SCOPES, FEATURE_MAPS):
        kw = dict(feature_map=fm, linear_scope=scope, proj_weight=w, proj_bias=b)
        ref = naive_sparse_linear_attention(q, k, v, bm, **kw)
        out = torch_sparse_linear_attention(q, k, v, bm, **kw)
        torch.testing.assert_close(out, ref, **tol, msg=lambda m: f"{scope}/{fm}: {m}")


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("fm", FEATURE_MAPS)
def test_gradients_match_reference(scope, fm):
    q, k, v = make_qkv(2, 2, 150, 130, 32, requires_grad=True)
    w, b = make_proj(32)
    w.requires_grad_(True)
    b.requires_grad_(True)
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    grads = []
    for fn in (naive_sparse_linear_attention, torch_sparse_linear_attention):
        out = fn(q, k, v, bm, feature_map=fm, linear_scope=scope, proj_weight=w, proj_bias=b)
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
        grads.append(torch.autograd.grad(out, (q, k, v, w, b), do))
    for name, g_ref, g in zip("q k v w b".split(), *grads):
        torch.testing.assert_close(g, g_ref, atol=1e-11, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck(backend):
    q, k, v = make_qkv(1, 2, 13, 11, 4, requires_grad=True)
    w, b = make_proj(4)
    w.requires_grad_(True)
    b.requires_grad_(True)
    bm = sla.build_block_map(q, k, critical=0.34, negligible=0.34, block_q=4, block_k=3)

    def fn(q, k, v, w, b):
        return sla.sparse_linear_attention(q, k, v, block_map=bm, proj_weight=w, proj_bias=b, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (50, 50), (200, 333)])
def test_all_blocks_critical_equals_dense_sdpa(Lq, Lk):
    q, k, v = make_qkv(2, 3, Lq, Lk, 32)
    zero_w, zero_b = torch.zeros(32, 32, dtype=q.dtype), torch.zeros(32, dtype=q.dtype)
    for backend in ("torch", "reference"):
        out = sla.sparse_linear_attention(q, k, v, critical=1.0, negligible=0.0, proj_weight=zero_w, proj_bias=zero_b,
                                          block_q=32, block_k=16, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-10)


def test_zero_projection_equals_sparse_only_branch():
    q, k, v = make_qkv(1, 2, 300, 300, 32)
    bm = sla.build_block_map(q, k, block_q=32, block_k=32, critical=0.2)
    _, (o_s, _, _) = naive_sparse_linear_attention(q, k, v, bm, return_branches=True)
    mod = sla.SparseLinearAttention(32, critical=0.2, block_q=32, block_k=32, combine="paper").double()
    torch.testing.assert_close(mod(q, k, v, block_map=bm), o_s, atol=1e-12, rtol=1e-10)


def test_empty_scope_rows_get_zero_linear_output():
    # critical 0.5 + negligible 0.5 leaves nothing marginal: o_l must be exactly zero, so the output is
    # o_s + bias whatever the weight (paper rule), and o_s itself under the mass rule (a = 1 there).
    q, k, v = make_qkv(1, 1, 128, 128, 16)
    w, b = make_proj(16)
    bm = sla.build_block_map(q, k, critical=0.5, negligible=0.5, block_q=32, block_k=32)
    _, (o_s, o_l, a) = naive_sparse_linear_attention(q, k, v, bm, return_branches=True)
    assert torch.count_nonzero(o_l) == 0 and bool((a == 1).all())
    out = torch_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b, combine="paper")
    torch.testing.assert_close(out, o_s + b, atol=1e-12, rtol=1e-10)
    out = torch_sparse_linear_attention(q, k, v, bm, proj_weight=w, proj_bias=b, combine="mass")
    torch.testing.assert_close(out, o_s, atol=1e-12, rtol=1e-10)


def test_non_contiguous_and_diffusers_layout_inputs():
    q, k, v = make_qkv(2, 3, 100, 90, 16)
    q_bl = q.transpose(1, 2).contiguous()  # (B, L, H, D) storage, as diffusers hands it over
    k_bl, v_bl = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    ref = sla.sparse_linear_attention(q, k, v, block_q=16, block_k=16, backend="reference")
    out = sla.sparse_linear_attention(q_bl.transpose(1, 2), k_bl.transpose(1, 2), v_bl.transpose(1, 2),
                                      block_q=16, block_k=16, backend="torch")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    q_big = torch.randn(2, 3, 100, 32, dtype=torch.float64)[..., ::2]  # stride-2 head dim
    out2 = sla.sparse_linear_attention(q_big, k, v, block_q=16, block_k=16, backend="torch")
    ref2 = sla.sparse_linear_attention(q_big.contiguous(), k, v, block_q=16, block_k=16, backend="reference")
    torch.testing.assert_close(out2, ref2, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype_and_stay_close(dtype):
    q, k, v = make_qkv(1, 2, 200, 200, 64, torch.float32)
    w, b = make_proj(64, torch.float32)
    bm = sla.build_block_map(q, k, block_q=32, block_k=32, critical=0.2)
    gold = naive_sparse_linear_attention(q.double(), k.double(), v.double(), bm, proj_weight=w.double(),
                                         proj_bias=b.double())
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = sla.sparse_linear_attention(qh, kh, vh, block_map=bm, proj_weight=w, proj_bias=b, backend="torch")
    assert out.dtype == dtype
    pt = naive_sparse_linear_attention(qh, kh, vh, bm, proj_weight=w.to(dtype), proj_bias=b.to(dtype), upcast=False)
    eps = torch.finfo(dtype).eps
    # The PyTorch path computes in float32, so it must be no worse than the same-precision reference.
    assert (out.double() - gold).abs().max() <= 2 * (pt.double() - gold).abs().max() + eps


def test_return_info():
    q, k, v = make_qkv(2, 2, 640, 640, 16)
    out, info = sla.sparse_linear_attention(q, k, v, return_info=True)
    assert out.shape == q.shape
    assert info.class_map.dtype == torch.int8 and info.class_map.shape == (2, 2, 10, 10)
    assert (info.n_critical, info.n_negligible, info.n_marginal) == (1, 1, 8)
    assert info.sparsity == pytest.approx(0.9)
    assert info.backend == "torch"


def test_every_backend_is_an_object_of_the_interface():
    from sla.ops.sla.backend import Backend
    from sla.ops.sla.interface import BACKENDS

    assert set(BACKENDS) == {"torch", "reference", "triton"}
    for name, backend in BACKENDS.items():
        assert isinstance(backend, Backend) and backend.name == name
    # the table's values are still callable as attend(q, k, v, block_map, ...)
    q, k, v = make_qkv(1, 2, 64, 64, 16)
    bm = sla.build_block_map(q, k, block_q=16, block_k=16)
    kwargs = dict(feature_map="softmax", linear_scope="marginal", proj_weight=None, proj_bias=None, scale=None,
                  combine="mass", mass_offset=None)
    torch.testing.assert_close(BACKENDS["torch"](q, k, v, bm, **kwargs),
                               sla.sparse_linear_attention(q, k, v, block_map=bm, backend="torch"), rtol=0, atol=0)


def _recording_backend(calls, fail_inputs=False):
    from sla.ops.sla.torch_impl import TorchBackend

    class Recording(TorchBackend):
        name = "recording"

        def check_device(self, device):
            calls.append("check_device")

        def check_inputs(self, q, block_q, block_k):
            calls.append(("check_inputs", block_q, block_k))
            if fail_inputs:
                raise ValueError("recording cannot run these inputs")

        def build_block_map(self, q, k, **kwargs):
            calls.append(("build_block_map", kwargs["needs"]))
            return super().build_block_map(q, k, **kwargs)

        def attend(self, q, k, v, block_map, **kwargs):
            calls.append("attend")
            return super().attend(q, k, v, block_map, **kwargs)

    return Recording()


def test_the_interface_looks_backends_up_and_calls_them_in_order(monkeypatch):
    from sla.ops.sla import interface

    calls = []
    monkeypatch.setitem(interface.BACKENDS, "recording", _recording_backend(calls))
    q, k, v = make_qkv(1, 2, 96, 96, 16)
    out = sla.sparse_linear_attention(q, k, v, block_q=32, block_k=16, backend="recording")
    assert calls == ["check_device", ("check_inputs", 32, 16), ("build_block_map", "forward"), "attend"]
    torch.testing.assert_close(out, sla.sparse_linear_attention(q, k, v, block_q=32, block_k=16, backend="torch"),
                               rtol=0, atol=0)  # the same code on the same inputs
    # what the map is needed for: a gradient will flow; the map is returned; a given map is not rebuilt
    calls.clear()
    sla.sparse_linear_attention(q.requires_grad_(), k, v, block_q=32, block_k=16, backend="recording")
    assert ("build_block_map", "backward") in calls
    calls.clear()
    with torch.no_grad():
        _, info = sla.sparse_linear_attention(q, k, v, backend="recording", return_info=True)
    assert ("build_block_map", "complete") in calls and info.backend == "recording"
    calls.clear()
    sla.sparse_linear_attention(q, k, v, block_map=info.block_map, backend="recording")
    assert calls == ["check_device", ("check_inputs", 64, 64), "attend"]


def test_an_error_of_the_backend_auto_chose_says_so(monkeypatch):
    from sla.ops.sla import interface

    monkeypatch.setitem(interface.BACKENDS, "recording", _recording_backend([], fail_inputs=True))
    monkeypatch.setattr(interface, "_auto_choice", lambda device: "recording")
    q, k, v = make_qkv(1, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="backend='auto' chose 'recording' for cpu tensors: recording cannot run "
                                         "these inputs \\(pass backend='torch'"):
        sla.sparse_linear_attention(q, k, v)
    with pytest.raises(ValueError, match="^recording cannot run these inputs$"):
        sla.sparse_linear_attention(q, k, v, backend="recording")


def test_nan_input_propagates_without_hanging():
    q, k, v = make_qkv(1, 1, 128, 128, 16)
    q[0, 0, 5, 3] = float("nan")
    out = sla.sparse_linear_attention(q, k, v, block_q=32, block_k=32)
    assert torch.isnan(out[0, 0, 5]).any()
    assert torch.isfinite(out[0, 0, 64:]).all()  # other query blocks are unaffected


def test_module_owns_zero_initialised_float32_projection():
    mod = sla.SparseLinearAttention(64, combine="paper")
    assert mod.proj.weight.dtype == torch.float32 and torch.count_nonzero(mod.proj.weight) == 0
    assert torch.count_nonzero(mod.proj.bias) == 0
    q, k, v = make_qkv(1, 2, 300, 300, 64, torch.float32, requires_grad=True)
    mod(q, k, v).square().sum().backward()
    assert mod.proj.weight.grad is not None and torch.count_nonzero(mod.proj.weight.grad) > 0
    assert q.grad is not None and torch.isfinite(q.grad).all()


BAD_INPUTS = [
    (dict(q=torch.randn(2, 8, 4)), ValueError, "4 dimensions"),
    (dict(k=torch.randn(1, 3, 8, 4)), ValueError, "batch/heads"),
    (dict(v=torch.randn(1, 2, 8, 5)), ValueError, "head_dim"),
    (dict(v=torch.randn(1, 2, 9, 4)), ValueError, "every key needs exactly one value"),
    (dict(q=torch.ones(1, 2, 8, 4, dtype=torch.int64)), TypeError, "dtype"),
    (dict(q=torch.ones(1, 2, 8, 4, dtype=torch.bool)), TypeError, "dtype"),
    (dict(q=torch.randn(1, 2, 8, 4, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(critical=1.5), ValueError, "critical=1.5"),
    (dict(negligible=-0.1), ValueError, "negligible"),
    (dict(critical=0.6, negligible=0.5), ValueError, "critical \\+ negligible"),
    (dict(block_q=0), ValueError, "block_q"),
    (dict(block_k=16.0), TypeError, "block_k"),
    (dict(feature_map="hedgehog"), ValueError, "feature_map"),
    (dict(linear_scope="full"), ValueError, "linear_scope"),
    (dict(proj_weight=torch.zeros(4, 5)), ValueError, "proj_weight"),
    (dict(proj_weight=torch.zeros(4, 4), proj_bias=torch.zeros(5)), ValueError, "proj_bias"),
    (dict(proj_bias=torch.zeros(4)), ValueError, "without proj_weight"),
    (dict(backend="cuda-magic"), ValueError, "backend"),
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(0, 2, 8, 4), k=torch.randn(0, 2, 8, 4), v=torch.randn(0, 2, 8, 4)), ValueError,
     "batch size 0"),
    (dict(q=torch.randn(1, 0, 8, 4), k=torch.randn(1, 0, 8, 4), v=torch.randn(1, 0, 8, 4)), ValueError, "0 heads"),
    (dict(q=torch.randn(1, 2, 8, 4, device="meta"), k=torch.randn(1, 2, 8, 4, device="meta"),
          v=torch.randn(1, 2, 8, 4, device="meta")), ValueError, "meta device"),
    (dict(scale=float("nan")), ValueError, "scale=nan is not a finite number > 0"),
    (dict(scale=float("inf")), ValueError, "scale=inf"),
    (dict(scale=0.0), ValueError, "scale=0.0"),
    (dict(scale=-0.5), ValueError, "scale=-0.5"),
    (dict(scale="0.5"), TypeError, "scale must be a float"),
]


@pytest.mark.parametrize(("override", "exc", "match"), BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_input_gives_clear_error(override, exc, match):
    args = dict(q=torch.randn(1, 2, 8, 4), k=torch.randn(1, 2, 8, 4), v=torch.randn(1, 2, 8, 4))
    args.update(override)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        sla.sparse_linear_attention(q, k, v, **args)


def test_block_map_builder_refuses_empty_and_meta_inputs():
    with pytest.raises(ValueError, match="batch size 0"):
        sla.build_block_map(torch.randn(0, 2, 8, 4), torch.randn(0, 2, 8, 4))
    meta = torch.randn(1, 2, 8, 4, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        sla.SparseLinearAttention(4)(meta, meta, meta)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_blocks_longer_than_the_sequence_act_as_one_block_without_their_memory(backend):
    # block_q=block_k=10**6 used to pad every block to 10**6 tokens (terabytes of scores). A block longer than
    # its sequence is one block of the whole sequence: same output as block sizes equal to the lengths.
    q, k, v = make_qkv(1, 2, 100, 90, 16, torch.float32)
    w, b = make_proj(16, torch.float32)
    kw = dict(proj_weight=w, proj_bias=b, linear_scope="all", backend=backend)
    huge, info = sla.sparse_linear_attention(q, k, v, block_q=10**6, block_k=10**6, return_info=True, **kw)
    exact = sla.sparse_linear_attention(q, k, v, block_q=100, block_k=90, **kw)
    assert tuple(info.class_map.shape) == (1, 2, 1, 1) and info.block_map.block_q == 10**6
    # Same shapes through the same kernels; the default float32 tolerance only guards against reordering.
    torch.testing.assert_close(huge, exact)
    # One oversized side only: the query side is one block, the key side keeps its 6 blocks of 16.
    huge_q = sla.sparse_linear_attention(q, k, v, block_q=10**6, block_k=16, critical=0.5, **kw)
    torch.testing.assert_close(huge_q, sla.sparse_linear_attention(q, k, v, block_q=100, block_k=16, critical=0.5,
                                                                   **kw))


def test_mixed_devices_rejected():
    meta = torch.randn(1, 2, 8, 4, device="meta")
    with pytest.raises(ValueError, match="one device"):
        sla.sparse_linear_attention(torch.randn(1, 2, 8, 4), meta, meta)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_torch_path_under_cpu_autocast(input_dtype):
    # Training scripts wrap models in autocast; the PyTorch path keeps its own precision inside it.
    q, k, v = make_qkv(1, 2, 130, 130, 32, torch.float32)
    q, k, v = (t.to(input_dtype).requires_grad_(True) for t in (q, k, v))
    w = torch.randn(32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sla.sparse_linear_attention(q, k, v, block_q=32, block_k=32, proj_weight=w, backend="torch")
        out.float().square().sum().backward()
    ref = sla.sparse_linear_attention(q.detach(), k.detach(), v.detach(), block_q=32, block_k=32,
                                      proj_weight=w.detach(), backend="torch")
    assert out.dtype == input_dtype
    torch.testing.assert_close(out, ref)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, w))


def test_module_errors_name_the_argument():
    with pytest.raises(ValueError, match="backend"):
        sla.SparseLinearAttention(32, backend="trition")
    mod = sla.SparseLinearAttention(32)
    with pytest.raises(ValueError, match="head_dim=32"):
        mod(*make_qkv(1, 1, 16, 16, 16, torch.float32))
    with pytest.raises(TypeError, match="scale"):
        sla.sparse_linear_attention(*make_qkv(1, 1, 16, 16, 16), scale=True)
    q, k, v = make_qkv(1, 1, 64, 64, 32, torch.float32)
    torch.testing.assert_close(mod(q, k, v, scale=0.5), sla.sparse_linear_attention(
        q, k, v, scale=0.5, proj_weight=mod.proj.weight, proj_bias=mod.proj.bias))


# --- combine="mass" ------------------------------------------------------------------------------------------

def _mass_inputs(seed=0, B=2, H=3, Lq=150, Lk=131, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk))
    return q, k, v


@pytest.mark.parametrize("combine, seeds", [("mass", (0, 1)), ("pooled", (5, 6)), ("pooled_cov", (8, 9))])
@pytest.mark.parametrize("linear_scope", ["marginal", "noncritical", "all"])
def test_mixing_rules_torch_path_matches_reference_with_gradients(combine, seeds, linear_scope):
    q, k, v = (x.requires_grad_() for x in _mass_inputs(seed=seeds[0]))
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    g = torch.Generator().manual_seed(seeds[1])
    w = torch.randn(16, 16, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(16, generator=g, dtype=torch.float64).requires_grad_()
    mo = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    kw = dict(linear_scope=linear_scope, proj_weight=w, proj_bias=b, combine=combine, mass_offset=mo)
    ref = sla.sparse_linear_attention(q, k, v, block_map=bm, backend="reference", **kw)
    got = sla.sparse_linear_attention(q, k, v, block_map=bm, backend="torch", **kw)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    g_ref = torch.autograd.grad(ref, (q, k, v, w, b, mo), do)
    g_got = torch.autograd.grad(got, (q, k, v, w, b, mo), do)
    # Same fp64 arithmetic in a different order: agreement to a few hundred ulps of the values' scale.
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for name, x, y in zip(("dq", "dk", "dv", "dW", "db", "d_mass_offset"), g_got, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("combine, seed", [("mass", 2), ("pooled", 7), ("pooled_cov", 10)])
def test_mixing_rules_reference_gradcheck(combine, seed):
    # The specification itself: autograd of the dense fp64 reference against finite differences.
    q, k, v = (x.requires_grad_() for x in _mass_inputs(B=1, H=2, Lq=24, Lk=20, D=4))
    bm = sla.build_block_map(q, k, critical=0.4, negligible=0.2, block_q=8, block_k=4)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64).requires_grad_()
    mo = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()

    def f(q, k, v, w, mo):
        return naive_sparse_linear_attention(q, k, v, bm, proj_weight=w, combine=combine, mass_offset=mo)

    assert torch.autograd.gradcheck(f, (q, k, v, w, mo))


def test_mass_combine_is_a_convex_mix_and_exact_at_critical_one():
    q, k, v = _mass_inputs(B=1, H=2)
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.1, block_q=32, block_k=16)
    out, (o_s, o_l, a) = naive_sparse_linear_attention(q, k, v, bm, combine="mass", return_branches=True)
    assert (a > 0).all() and (a < 1).all()
    torch.testing.assert_close(out, a * o_s + (1 - a) * o_l, rtol=0, atol=0)
    # Nothing in the linear scope: a = 1 and SLA is dense attention, whatever Proj and the offsets are.
    full = sla.build_block_map(q, k, critical=1.0, negligible=0.0, block_q=32, block_k=16)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    for backend in ("reference", "torch"):
        o = sla.sparse_linear_attention(q, k, v, block_map=full, combine="mass", mass_offset=torch.randn(2).double(),
                                        proj_weight=torch.randn(16, 16).double(), backend=backend)
        torch.testing.assert_close(o, dense, rtol=1e-12, atol=1e-12)


def test_combine_paper_is_the_sum_of_the_branches():
    # combine="paper" is exactly what SLA computed before the option existed: o_s + Proj(o_l).
    q, k, v = _mass_inputs()
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    w, b = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    _, (o_s, o_l, a) = naive_sparse_linear_attention(q, k, v, bm, combine="paper", return_branches=True)
    assert bool((a == 1).all())
    expected = o_s + torch.nn.functional.linear(o_l, w, b)
    for backend in ("reference", "torch"):
        out = sla.sparse_linear_attention(q, k, v, block_map=bm, proj_weight=w, proj_bias=b, combine="paper",
                                          backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_mass_module_initialisation_and_forward():
    shared = sla.SparseLinearAttention(16, critical=0.2, negligible=0.2, block_q=32, block_k=16).double()
    assert shared.combine == "mass" and shared.mass_offset.shape == (1,)  # the default: one offset for all heads
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        sla.SparseLinearAttention(16, num_heads=0)
    m = sla.SparseLinearAttention(16, critical=0.2, negligible=0.2, block_q=32, block_k=16, combine="mass",
                                  num_heads=3).double()
    torch.testing.assert_close(m.proj.weight, torch.eye(16, dtype=torch.float64), rtol=0, atol=0)
    assert not m.proj.bias.any() and not m.mass_offset.any() and m.mass_offset.shape == (3,)
    q, k, v = _mass_inputs()
    out = m(q, k, v)
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    ref = naive_sparse_linear_attention(q, k, v, bm, proj_weight=m.proj.weight, proj_bias=m.proj.bias,
                                        combine="mass", mass_offset=m.mass_offset)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_heads=3"):
        m(q[:, :2], k[:, :2], v[:, :2])
    # the shared offset is one parameter used by every head: its gradient sums theirs
    out = shared(q.requires_grad_(), k, v)
    out.sum().backward()
    assert shared.mass_offset.grad.shape == (1,) and torch.isfinite(shared.mass_offset.grad).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(combine="sum"), ValueError, "combine='sum' is unknown"),
    (dict(combine="paper", mass_offset=torch.zeros(2)), ValueError, "mass_offset was given with combine='paper'"),
    (dict(combine="mass", mass_offset=torch.zeros(3)), ValueError, r"expected \(2,\)"),
    (dict(combine="mass", mass_offset=torch.zeros(2, dtype=torch.int64)), TypeError, "float tensor"),
])
def test_bad_combine_arguments_raise(kwargs, error, match):
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(error, match=match):
        sla.sparse_linear_attention(q, q, q, **kwargs)


# --- combine="pooled" ----------------------------------------------------------------------------------------

def _pooled_oracle(q, k, v, class_map, bq, bk, linear_scope, w, b, mo, covariance=False):
    """combine="pooled" (``covariance``: "pooled_cov") from its definition (docs/semantics.md), token by token in
    float64, written apart from naive.py: loops over key and query blocks, no shared helper."""
    from sla.ops.sla.blockmap import CRITICAL, in_linear_scope

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    tn = -(-Lk // bk)
    scale = D ** -0.5
    rows = class_map.repeat_interleave(bq, dim=-2)[..., :Lq, :]  # (B, H, Lq, T_n)
    logits = torch.empty(B, H, Lq, tn, dtype=q.dtype)
    v_mean = torch.empty(B, H, tn, D, dtype=q.dtype)
    crit_tok = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for j in range(tn):
        kj, vj = k[:, :, j * bk:(j + 1) * bk], v[:, :, j * bk:(j + 1) * bk]
        logits[..., j] = scale * (q @ kj.mean(2, keepdim=True).transpose(-1, -2))[..., 0] + math.log(kj.shape[2])
        v_mean[:, :, j] = vj.mean(2)
        crit_tok[..., j * bk:(j + 1) * bk] = (rows[..., j] == CRITICAL)[..., None]
    s = (q @ k.transpose(-1, -2)) * scale
    p_crit = torch.exp(s) * crit_tok
    o_s = p_crit @ v / p_crit.sum(-1, keepdim=True)
    crit_mass = p_crit.sum(-1, keepdim=True)
    rest = (torch.exp(logits) * (rows != CRITICAL)).sum(-1, keepdim=True) * torch.exp(mo).view(1, -1, 1, 1)
    a = crit_mass / (crit_mass + rest)
    scope = in_linear_scope(rows, linear_scope).to(q.dtype)
    e = torch.exp(logits) * scope
    o_c = torch.nan_to_num(e @ v_mean / e.sum(-1, keepdim=True))
    if covariance:
        p = torch.nan_to_num(e / e.sum(-1, keepdim=True))
        for i in range(-(-Lq // bq)):
            rows_i = slice(i * bq, min((i + 1) * bq, Lq))
            state = torch.zeros(B, H, D, D, dtype=q.dtype)
            for j in range(tn):
                kj, vj = k[:, :, j * bk:(j + 1) * bk], v[:, :, j * bk:(j + 1) * bk]
                cov_j = (kj - kj.mean(2, keepdim=True)).transpose(-1, -2) @ vj / kj.shape[2]
                state += p[:, :, rows_i, j].mean(2)[..., None, None] * cov_j
            o_c[:, :, rows_i] += scale * q[:, :, rows_i] @ state
    phi_q, phi_k = torch.softmax(q, -1), torch.softmax(k, -1)
    scope_tok = scope.repeat_interleave(bk, dim=-1)[..., :Lk]
    wl = (phi_q @ phi_k.transpose(-1, -2)) * scope_tok
    den = wl.sum(-1, keepdim=True)
    o_l = (wl @ v) / torch.where(den == 0, torch.ones_like(den), den)
    return a * o_s + (1 - a) * (o_c + o_l @ w.T + b)


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
@pytest.mark.parametrize("linear_scope", ["marginal", "noncritical", "all"])
def test_pooled_reference_matches_an_independent_oracle(linear_scope, combine):
    q, k, v = _mass_inputs(seed=3)
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64)
    b = torch.randn(16, generator=g, dtype=torch.float64)
    mo = torch.randn(3, generator=g, dtype=torch.float64)
    ref = naive_sparse_linear_attention(q, k, v, bm, linear_scope=linear_scope, proj_weight=w, proj_bias=b,
                                        combine=combine, mass_offset=mo)
    want = _pooled_oracle(q, k, v, bm.class_map, 32, 16, linear_scope, w, b, mo, covariance=combine == "pooled_cov")
    torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)


def test_pooled_is_dense_at_critical_one_and_the_module_starts_at_sparse_plus_coarse():
    q, k, v = _mass_inputs(B=1, H=2)
    full = sla.build_block_map(q, k, critical=1.0, negligible=0.0, block_q=32, block_k=16)
    dense = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    for backend in ("reference", "torch"):
        o = sla.sparse_linear_attention(q, k, v, block_map=full, combine="pooled",
                                        mass_offset=torch.randn(2).double(), proj_weight=torch.randn(16, 16).double(),
                                        backend=backend)
        torch.testing.assert_close(o, dense, rtol=1e-12, atol=1e-12)
    m = sla.SparseLinearAttention(16, critical=0.2, negligible=0.2, block_q=32, block_k=16, combine="pooled",
                                  num_heads=2, backend="torch").double()
    assert not m.proj.weight.any() and not m.proj.bias.any() and m.mass_offset.shape == (2,)
    assert not m.mass_offset.any() and "combine='pooled', num_heads=2" in repr(m)
    bm = sla.build_block_map(q, k, critical=0.2, negligible=0.2, block_q=32, block_k=16)
    want = _pooled_oracle(q, k, v, bm.class_map, 32, 16, "marginal", torch.zeros(16, 16, dtype=torch.float64),
                          torch.zeros(16, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(m(q, k, v), want, rtol=1e-12, atol=1e-12)
    # the offsets learn: a finite gradient per head
    m(q.requires_grad_(), k, v).sum().backward()
    assert m.mass_offset.grad.shape == (2,) and torch.isfinite(m.mass_offset.grad).all()
