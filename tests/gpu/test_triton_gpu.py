"""The SLA Triton kernels on a CUDA GPU: bf16, fp16 and fp32 (``tf32x3`` dots: three tf32 products, close to fp32
accuracy; plain ``ieee`` dots were too slow to compile and run, see ``launch._dot_precision``), both block configs,
every scope and feature map, head dims 64 and 128, ragged and unequal lengths, a 32760-token case,
determinism, no recompile per length / top-k count, CUDA-graph capture, torch.compile and opcheck.

Rule for every output and gradient: ``max|kernel - gold| <= factor * max|pt - gold| + ulp``, gold = dense
reference in fp64, pt = the reference in the test dtype, factor 2 except for the two token-sum gradients
(``RULE_FACTORS`` in ``sla/ops/sla/triton/testing.py``); kernel and reference get the same BlockMap. Outputs are
NaN-poisoned and inputs sit inside NaN guard bands.

Run on the device machine with ``bash bench/gpu_check.sh`` (tests then benchmark).
"""

import pytest
import torch

from sla.settings import MIXING_RULES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


def _imports():
    from sla.ops.sla.blockmap import build_block_map
    from sla.ops.sla.triton import triton_sparse_linear_attention
    from sla.ops.sla.triton import testing

    return build_block_map, triton_sparse_linear_attention, testing


def _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, with_proj=True, critical=0.2,
              negligible=0.2, guard=True, gold_impl="naive", combine="paper", with_bias=None):
    build_block_map, sla_triton, t = _imports()
    q0, k0, v0 = (torch.randn(B, H, L, D, dtype=dtype, device=DEV) for L in (Lq, Lk, Lk))
    if guard:
        q, k, v = (t.guarded_bhld(x).requires_grad_() for x in (q0, k0, v0))
    else:
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    w = (0.2 * torch.randn(D, D, device=DEV)).requires_grad_() if with_proj else None
    with_bias = with_proj if with_bias is None else with_bias
    b = torch.randn(D, device=DEV).requires_grad_() if with_bias else None
    mo = torch.randn(H, device=DEV).requires_grad_() if combine in MIXING_RULES else None
    bm = build_block_map(q0, k0, critical=critical, negligible=negligible, block_q=block_q, block_k=block_k)
    do = torch.randn(B, H, Lq, D, dtype=dtype, device=DEV)
    with t.nan_poisoned_allocations():
        o = sla_triton(q, k, v, bm, feature_map=feature_map, linear_scope=linear_scope, proj_weight=w, proj_bias=b,
                       combine=combine, mass_offset=mo)
        wrt = [x for x in (q, k, v, w, b, mo) if x is not None]
        grads = torch.autograd.grad(o, wrt, do)
    ref = t.reference_outputs(q0, k0, v0, bm, feature_map=feature_map, linear_scope=linear_scope, proj_weight=w,
                              proj_bias=b, scale=None, do=do, gold_impl=gold_impl, combine=combine, mass_offset=mo)
    names = [n for n in t.gradient_names(with_proj, mo is not None) if n != "db" or with_bias]
    t.assert_outputs_within_rule(o, grads, ref, names)


DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.float32, id="fp32")]

CASES = [
    # (B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map)
    pytest.param(1, 2, 1000, 1000, 128, 64, 64, "marginal", "softmax", id="marginal-softmax-D128-64x64-L1000"),
    pytest.param(2, 2, 1000, 777, 128, 128, 64, "marginal", "softmax", id="marginal-softmax-D128-128x64-Lk777"),
    pytest.param(1, 3, 555, 1200, 64, 64, 64, "noncritical", "elu", id="noncritical-elu-D64-64x64"),
    pytest.param(1, 2, 1031, 1031, 64, 128, 64, "all", "relu", id="all-relu-D64-128x64-L1031"),
]


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map", CASES[:2] + CASES[3:])
def test_mass_combine_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, dtype):
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, combine="mass")


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_mass_combine_weight_without_bias(dtype):
    # The linear-q kernel forms the mass rule's g from dO W plus, only with a bias, dO . b: the path without one.
    _run_case(1, 2, 1000, 777, 128, 128, 64, dtype, "noncritical", "elu", combine="mass", with_bias=False)


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map", CASES)
def test_pooled_combine_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, dtype,
                                          combine):
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, combine=combine)


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_pooled_combine_without_bias_and_without_projection(dtype, combine):
    # g's dO . o_c term with a weight and no bias, and with no projection at all.
    _run_case(1, 2, 1000, 777, 128, 128, 64, dtype, "noncritical", "elu", combine=combine, with_bias=False)
    _run_case(1, 2, 1000, 777, 128, 64, 64, dtype, "marginal", "softmax", combine=combine, with_proj=False)


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
@pytest.mark.parametrize("block_q", [64, 128])
def test_pooled_long_sequence_bf16(block_q, combine):
    # 32760 tokens: T_n = 512 key-block means, eight chunks of the coarse kernels, the dK/dV kernel's split sums
    # (pooled_cov: also its 512 x 512 mixes of D x D states).
    _run_case(1, 1, 32760, 32760, 128, block_q, 64, torch.bfloat16, "marginal", "softmax", critical=0.05,
              negligible=0.10, guard=False, gold_impl="torch", combine=combine)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map", CASES)
def test_kernels_match_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, dtype):
    if dtype == torch.float32 and D > 64:
        # fp32 tiles at D = 128 exceed shared memory (measured): the backend says so instead of crashing.
        with pytest.raises(ValueError, match="float32 inputs only up to head_dim 64"):
            _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map)
        return
    _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map)


@pytest.mark.parametrize("combine", ["mass", "pooled_cov"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map", CASES[:2])
def test_every_launch_form_matches_reference(B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, dtype,
                                             combine):
    # The other tests run the default forms (launch_config.TMA_BY_DEFAULT, FWD_SPLIT_BY_DEFAULT); this runs each
    # forced: pointer or (sm_90+) TMA loads, the forward in one launch or two.
    from sla.ops.sla.triton.launch_config import TMA_BY_DEFAULT, TMA_KERNELS, launch_overrides, tma_loads

    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert tma_loads("fwd", torch.empty(1, 1, 64, 64, device=DEV, dtype=dtype)) == (TMA_BY_DEFAULT and hopper)
    for tma in ((False, True) if hopper else (False,)):
        for split in (False, True):
            forms = {kernel: {"tma": tma} for kernel in TMA_KERNELS}
            forms["fwd"]["split"] = split
            with launch_overrides(forms):
                _run_case(B, H, Lq, Lk, D, block_q, block_k, dtype, linear_scope, feature_map, combine=combine)


@pytest.mark.parametrize("block_q", [64, 128])
def test_long_sequence_bf16(block_q):
    # Wan2.1-1.3B's 32760 tokens (ragged last block), one head. The fp64 gold comes from the memory-efficient
    # PyTorch path (dense fp64 maps with autograd would need ~60 GB); pt is still the dense reference in bf16.
    _run_case(1, 1, 32760, 32760, 128, block_q, 64, torch.bfloat16, "marginal", "softmax", critical=0.05,
              negligible=0.10, guard=False, gold_impl="torch")


def test_all_critical_equals_dense_attention():
    build_block_map, sla_triton, t = _imports()
    q, k, v = (torch.randn(1, 4, 1000, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    bm = build_block_map(q, k, critical=1.0, negligible=0.0)
    o = sla_triton(q, k, v, bm, proj_weight=torch.zeros(128, 128, device=DEV))
    gold = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    pt = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # dense attention in bf16: the same rule
    t.assert_within_rule("o", o, gold, pt, t.RULE_FACTORS["o"])


def test_deterministic_gradients():
    build_block_map, sla_triton, _ = _imports()
    q, k, v = (torch.randn(2, 4, 4096, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = (0.1 * torch.randn(128, 128, device=DEV)).requires_grad_()
    bm = build_block_map(q.detach(), k.detach(), critical=0.1, negligible=0.1)
    do = torch.randn_like(q)
    runs = []
    for _ in range(3):
        o = sla_triton(q, k, v, bm, proj_weight=w)
        runs.append([o] + list(torch.autograd.grad(o, (q, k, v, w), do)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _cache_size(kernel) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton version does not expose JITFunction.device_caches")
    return sum(len(entry[0]) for entry in caches.values())


def test_no_recompile_per_length_or_topk():
    from sla.ops.sla.triton.kernels import sla_bwd_dkdv_kernel, sla_bwd_dq_kernel, sla_fwd_kernel

    build_block_map, sla_triton, _ = _imports()
    sizes = []
    for L, crit in ((3000, 0.05), (3333, 0.1), (4099, 0.2)):
        q, k, v = (torch.randn(1, 2, L, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        bm = build_block_map(q.detach(), k.detach(), critical=crit, negligible=0.1)
        sla_triton(q, k, v, bm).sum().backward()
        sizes.append([_cache_size(kern) for kern in (sla_fwd_kernel, sla_bwd_dq_kernel, sla_bwd_dkdv_kernel)])
    assert sizes[0] == sizes[1] == sizes[2], sizes


@pytest.mark.parametrize("entry", [
    "public",  # the block map built inside (Triton builder; block_lengths on the device since cf1a926)
    "given_map",  # a map built before the capture, handed to the kernels
])
def test_cuda_graph_capture(entry):
    import sla
    from sla.ops.sla.triton import build_block_map_triton

    q, k, v = (torch.randn(1, 2, 2000, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = (0.1 * torch.randn(128, 128, device=DEV)).requires_grad_()
    bm = build_block_map_triton(q.detach(), k.detach()) if entry == "given_map" else None

    def step():
        o = sla.sparse_linear_attention(q, k, v, proj_weight=w, backend="triton", block_map=bm)
        return [o] + list(torch.autograd.grad(o.float().square().sum(), (q, k, v, w)))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises if any op synchronises with the host
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_inductor():
    import sla

    q, k, v = (torch.randn(1, 2, 1500, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    w = (0.1 * torch.randn(128, 128, device=DEV)).requires_grad_()

    def f(q, k, v):
        return sla.sparse_linear_attention(q, k, v, proj_weight=w, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(q, k, v)
    out.float().sum().backward()
    torch.testing.assert_close(out, f(q, k, v))


def test_compiled_and_eager_block_maps_are_identical():
    # One builder (the op sla::triton_block_map) serves eager and compiled runs: the same kernels pick the same
    # blocks, field by field (issue 16, item 2; a compiled run once traced the PyTorch builder instead).
    import sla

    q, k, v = (torch.randn(2, 3, 3000, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))

    def info(q, k, v):
        bm = sla.sparse_linear_attention(q, k, v, backend="triton", return_info=True)[1].block_map
        return [getattr(bm, f) for f in ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets",
                                         "critical_lut_t", "negligible_lut_t_offsets", "negligible_lut_t")]

    torch._dynamo.reset()
    for eager, compiled in zip(info(q, k, v), torch.compile(info, fullgraph=True)(q, k, v)):
        assert torch.equal(eager, compiled)


@pytest.mark.parametrize("combine", ["mass", "pooled", "pooled_cov"])
def test_torch_compile_gradients_within_the_rule(combine):
    # Compiled with inductor and eager on one block map: output and every gradient meet the rule, both.
    build_block_map, sla_triton, t = _imports()
    q, k, v, do = (torch.randn(1, 2, 1500, 128, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    w, b = 0.1 * torch.randn(128, 128, device=DEV), torch.randn(128, device=DEV)
    mo = torch.randn(2, device=DEV)
    bm = build_block_map(q, k, critical=0.1, negligible=0.1)
    ref = t.reference_outputs(q, k, v, bm, feature_map="softmax", linear_scope="marginal", proj_weight=w, proj_bias=b,
                              scale=None, do=do, combine=combine, mass_offset=mo)

    def f(q, k, v, w, b, mo):
        return sla_triton(q, k, v, bm, proj_weight=w, proj_bias=b, combine=combine, mass_offset=mo)

    for fn in (f, torch.compile(f, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, w, b, mo)]
        o = fn(*leaves)
        t.assert_outputs_within_rule(o, torch.autograd.grad(o, leaves, do), ref, t.gradient_names(True, True))


def test_bf16_autocast_training_step():
    # Fine-tuning runs the model under torch.autocast(bfloat16) with an fp32 projection (sla finetune --bf16):
    # the block map and the kernels must give what they give without autocast.
    import sla

    layer = sla.SparseLinearAttention(64).to(DEV)
    torch.nn.init.normal_(layer.proj.weight, std=0.05)
    q, k, v = (torch.randn(1, 2, 1000, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def run():
        o = layer(q, k, v)
        return (o, *torch.autograd.grad(o, (q, k, v, layer.proj.weight), do))

    _, _, t = _imports()
    t.assert_unchanged_under_autocast(run, "cuda")


def test_opcheck_gpu():
    from sla.ops.sla.triton import sla_triton_bwd, sla_triton_fwd
    from sla.ops.sla.triton.api import coarse_codes, scope_mask_for

    build_block_map, _, _ = _imports()
    q, k, v = (torch.randn(1, 2, 300, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    bm = build_block_map(q, k, critical=0.3, negligible=0.2)
    w, b = torch.randn(64, 64, device=DEV), torch.randn(64, device=DEV)
    for combine in ("paper", "mass", "pooled", "pooled_cov"):
        mo = torch.randn(2, device=DEV) if combine != "paper" else None
        codes = coarse_codes(bm, "marginal") if combine in ("pooled", "pooled_cov") else None
        args = [q, k, v, bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t,
                scope_mask_for(bm, "marginal", torch.bfloat16), w, b, mo, codes, 0.125, 64, 64, "softmax", combine,
                True]
        grad_args = [a.clone().requires_grad_() if i in (0, 1, 2, 7, 8, 9) and a is not None else a
                     for i, a in enumerate(args)]
        torch.library.opcheck(sla_triton_fwd, grad_args)
        o, o_s, o_l, lse, a, o_c, rows, means = sla_triton_fwd(*args)
        torch.library.opcheck(sla_triton_bwd, [torch.randn_like(o), *args[:3], o_s, o_l, lse, a, *args[3:11], o_c,
                                               rows, means, *args[11:-1]])
    from sla.ops.sla.triton.blockmap import sla_triton_block_map

    for transposes in ("all", "critical", "none"):
        torch.library.opcheck(sla_triton_block_map, (q, k, 0.3, 0.2, 64, 64, transposes))


@pytest.mark.parametrize("block_q", [64, 128])
def test_gpu_block_map_matches_pytorch(block_q):
    from sla.ops.sla.blockmap import BlockMap
    from sla.ops.sla.triton import build_block_map_triton

    build_block_map, _, _ = _imports()
    q = torch.randn(1, 12, 32760, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 12, 32760, 128, device=DEV, dtype=torch.bfloat16) + 0.5
    ref = build_block_map(q, k, critical=0.05, negligible=0.10, block_q=block_q, block_k=64)
    got = build_block_map_triton(q, k, critical=0.05, negligible=0.10, block_q=block_q, block_k=64)
    # Scores agree to fp32 rounding, so only near-ties may rank differently.
    mismatch = (ref.class_map != got.class_map).float().mean().item()
    assert mismatch < 1e-3, mismatch
    # The GPU map is self-consistent: its transposes equal those the PyTorch builder derives from its LUTs.
    rebuilt = BlockMap.from_luts(got.critical_lut, got.negligible_lut, 32760, 32760, block_q, 64)
    for field in ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
                  "negligible_lut_t_offsets", "negligible_lut_t"):
        assert torch.equal(getattr(rebuilt, field), getattr(got, field)), field


def test_public_api_inference_training_and_info_maps_agree():
    # On CUDA the public API builds no CSR transposes for inference, only the critical one for training and the
    # complete map with return_info=True; all three must give the same output, and the returned map is complete.
    import sla

    q, k, v = (torch.randn(1, 2, 3000, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        o_inference = sla.sparse_linear_attention(q, k, v, backend="triton")
    o_training = sla.sparse_linear_attention(q.clone().requires_grad_(), k, v, backend="triton")
    o_training.sum().backward()
    with torch.no_grad():
        o_info, info = sla.sparse_linear_attention(q, k, v, backend="triton", return_info=True)
    assert torch.equal(o_inference, o_info)  # the same kernel (no aux outputs), another block-map request
    # Training compiles the kernel with its aux stores, which may schedule the same arithmetic differently:
    # allow one bf16 rounding step.
    torch.testing.assert_close(o_training.detach(), o_inference, rtol=2 ** -7, atol=1e-3)
    bm = info.block_map
    assert bm.critical_lut_t.numel() == bm.critical_lut.numel() > 0
    assert bm.negligible_lut_t.numel() == bm.negligible_lut.numel() > 0
