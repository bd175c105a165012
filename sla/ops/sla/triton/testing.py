"""Test helpers for the SLA kernels, shared by the interpreter (CPU) and GPU test suites.

* :func:`assert_within_rule`: ``max|kernel - gold| <= factor * max|pt - gold| + ulp floor``, gold being the
  float64 reference and pt the same reference computed in the test's low precision (FlashAttention's
  rule with FA4's absolute floor). Prints both errors so that a failure explains itself.
  :data:`RULE_FACTORS` holds the factor of each output and gradient, and why;
  :func:`assert_outputs_within_rule` applies it to an output and its gradients.
* :func:`nan_poisoned_allocations`: ``torch.empty``/``empty_like``/``new_empty`` return NaN-filled tensors,
  so an output element a kernel forgets to write fails the comparison loudly.
* :func:`guarded_bhld`: a ``(B, H, L, D)`` view of a ``(B, L, H, D)`` buffer surrounded by NaN tokens and
  heads: an unmasked read past a block edge turns the result into NaN.
* :func:`reference_outputs`: output and gradients of the dense reference, in fp64 (gold) and in the
  input dtype (pt), for the same block map the kernel gets.
* :func:`patch_triton_interpreter`: makes Triton's CPU interpreter run kernels with runtime loop bounds under
  NumPy >= 2.4. Test setup calls it (``tests/conftest.py``); the library never patches Triton.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..naive import naive_sparse_linear_attention
from ..torch_impl import torch_sparse_linear_attention


def ulp_floor(gold: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the rounding noise of ``dtype`` for values of magnitude ``|gold| + 0.3`` (FA4's floor: adding 0.3
    keeps the floor meaningful where gold is near zero, so it is slightly looser than one ulp of ``gold``)."""
    g = gold.to(dtype)
    return 2.0 * float(((g + 0.3) - 0.3 - g).abs().max())


# The rule's factor per output and gradient. 2 everywhere the kernel computes what the reference computes element
# by element: measured under the interpreter (the cases of tests/test_triton_interpret.py, fp32 and fp16, 9 seeds;
# factor needed = (err - ulp floor) / pt_err), o needed at most 1.0, dq / dk / dv at most 1.5, dW at most 1.0.
# Two gradients are sums over every token, where the kernels and the reference add in different orders and the
# reference's own error is a single draw of a long fp32 sum's rounding, so the ratio of the two errors spreads:
# * db ((D,), a sum over B*H*L rows of dO, or of (1 - a) dO): needed up to 2.8 (fp32; fp16 within the floor);
# * d_mass_offset ((H,), minus the sum of the per-row g over B*L rows): needed up to 7.1 in one of 9 seeds (fp32,
#   H = 2: with one or two elements the max cannot average a lucky small reference error out), 2.4 at the
#   suite's seed, at most 1.6 in the other fp32 case and within the floor in fp16.
# A wrong formula in either is off by orders of magnitude more than these factors allow.
RULE_FACTORS = {"o": 2.0, "dq": 2.0, "dk": 2.0, "dv": 2.0, "dW": 2.0, "db": 3.0, "d_mass_offset": 8.0}
# The same two sums also get a floor of a few ulps of their largest value: with one or two elements of magnitude
# ~10-30 the per-element floor above can come out 0, and a reference error under half an ulp then leaves a bound a
# correct kernel misses. combine="pooled_cov" met that first (fp32, H = 2, |gold| ~ 20): kernel 7.6e-6 and 3.1e-6
# (1-4 ulps) against reference errors of 8.8e-7 and 2.3e-7 at the suite's seed, while over seeds 0-5 its kernel
# errors (0.8-5.8e-6) matched the pooled rule's (0.4-6.7e-6) and the reference's own (1.9-5.4e-6).
SUM_ULPS = {"db": 4.0, "d_mass_offset": 4.0}


def assert_within_rule(name: str, kernel: torch.Tensor, gold: torch.Tensor, pt: torch.Tensor, factor: float,
                       sum_ulps: float = 0.0) -> None:
    """``max|kernel - gold| <= factor * max|pt - gold| + floor``; the floor is :func:`ulp_floor`, or ``sum_ulps``
    ulps of ``max|gold|`` in the kernel's dtype where that is larger (:data:`SUM_ULPS`)."""
    assert kernel.shape == gold.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(gold.shape)}"
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten output or out-of-bounds read?)"
    kernel, gold, pt = kernel.detach(), gold.detach(), pt.detach()
    err = (kernel.double() - gold).abs()
    pt_err = (pt.double() - gold).abs()
    floor = max(ulp_floor(gold, kernel.dtype),
                sum_ulps * torch.finfo(kernel.dtype).eps * float(gold.abs().max()) if gold.numel() else 0.0)
    bound = factor * float(pt_err.max()) + floor
    msg = (f"{name}: kernel max err {float(err.max()):.3e} (mean {float(err.mean()):.3e}), reference-in-"
           f"{kernel.dtype} max err {float(pt_err.max()):.3e} (mean {float(pt_err.mean()):.3e}), ulp floor "
           f"{floor:.3e}, bound {bound:.3e}")
    print(msg)
    if float(err.max()) > bound:
        idx = torch.nonzero(err == err.max())[0].tolist()
        raise AssertionError(msg + f"; worst at index {idx}")


def gradient_names(with_proj: bool, with_mass_offset: bool) -> list[str]:
    """Names of the gradients, in the order :func:`reference_outputs` returns them."""
    return ["dq", "dk", "dv"] + (["dW", "db"] if with_proj else []) + (["d_mass_offset"] if with_mass_offset else [])


def assert_outputs_within_rule(o: torch.Tensor, grads, ref: dict, names) -> None:
    """The output ``o`` and ``grads`` (named ``names``, see :func:`gradient_names`) against ``ref`` from
    :func:`reference_outputs`, each with its factor from :data:`RULE_FACTORS`."""
    assert len(grads) == len(names) == len(ref["gold"][1]), (len(grads), names, len(ref["gold"][1]))
    assert_within_rule("o", o, ref["gold"][0], ref["pt"][0], RULE_FACTORS["o"])
    for name, g, gold, pt in zip(names, grads, ref["gold"][1], ref["pt"][1]):
        assert_within_rule(name, g, gold, pt, RULE_FACTORS[name], SUM_ULPS.get(name, 0.0))


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Within the block, uninitialised float allocations come back filled with NaN."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def _poison(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real_new_empty(self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_empty_like, real_new_empty


def assert_unchanged_under_autocast(run, device_type: str) -> None:
    """``run()`` returns a tuple of tensors; under bf16 autocast it must return the same dtypes and values
    (the SLA ops disable autocast inside: block scores in fp32, kernels in the inputs' dtype)."""
    plain = run()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        auto = run()
    for x, y in zip(plain, auto):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def guarded_bhld(values: torch.Tensor, guard: int = 3) -> torch.Tensor:
    """Copy ``values`` ``(B, H, L, D)`` into a NaN-filled ``(B, L + 2*guard, H + 2, D)`` buffer and return the
    ``(B, H, L, D)`` strided view of it (the diffusers layout, no copy), as a leaf requiring grad if
    ``values`` does."""
    B, H, L, D = values.shape
    buf = torch.full((B, L + 2 * guard, H + 2, D), float("nan"), dtype=values.dtype, device=values.device)
    view = buf[:, guard:guard + L, 1:1 + H, :].transpose(1, 2)
    with torch.no_grad():
        view.copy_(values)
    return view


def reference_outputs(q, k, v, block_map, *, feature_map, linear_scope, proj_weight, proj_bias, scale, do,
                      gold_impl="naive", combine="paper", mass_offset=None):
    """``{"gold": (o, grads), "pt": (o, grads)}``; grads in the order q, k, v, proj_weight, proj_bias,
    mass_offset (those that are not None). ``gold_impl="torch"`` computes the fp64 gold with the
    memory-efficient PyTorch path (itself tested against the dense reference) where the dense fp64 maps would
    not fit in memory."""
    result = {}
    for tag, dtype, upcast in (("gold", torch.float64, True), ("pt", q.dtype, False)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        params = [None if p is None else p.detach().to(torch.float64 if tag == "gold" else p.dtype).requires_grad_()
                  for p in (proj_weight, proj_bias, mass_offset)]
        kwargs = dict(feature_map=feature_map, linear_scope=linear_scope, proj_weight=params[0],
                      proj_bias=params[1], scale=scale, combine=combine, mass_offset=params[2])
        if tag == "gold" and gold_impl == "torch":
            o = torch_sparse_linear_attention(*leaves, block_map, **kwargs)
        else:
            o = naive_sparse_linear_attention(*leaves, block_map, upcast=upcast, **kwargs)
        wrt = leaves + [p for p in params if p is not None]
        grads = torch.autograd.grad(o, wrt, do.to(o.dtype))
        result[tag] = (o.detach(), [g.detach() for g in grads])
    return result


def patch_triton_interpreter() -> None:
    """Keep Triton's CPU interpreter (``TRITON_INTERPRET=1``) usable with NumPy >= 2.4. Idempotent; imports Triton.

    The interpreter holds every scalar as a one-element 1-d NumPy array and converts it with ``int(array)`` when a
    runtime integer bounds a ``range`` loop. NumPy 2.4 made that conversion of a 1-d array a ``TypeError`` ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel whose loop count is a runtime
    argument (ours: the critical-block count, CSR offsets) fails under the interpreter (seen with Triton 3.6). This
    re-installs the tensors' ``__index__`` hook with a conversion that accepts one-element arrays. It changes
    nothing for GPU runs, which never use the interpreter; call it before the first kernel runs.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sla_patched", False):
        return

    @functools.wraps(original)
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sla_patched = True
    interpreter._patch_lang_tensor = patched
