"""``bench/restricted_cov.py``'s restricted correction is the library's correction when every key block is kept, zero
when none is, and between the two it keeps exactly each query block's r largest block weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import restricted_cov  # noqa: E402

from sla.ops.sla import naive  # noqa: E402


def _operands(seed=0, B=1, H=2, L=200, D=16, block=32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    tn = -(-L // block)
    p = torch.softmax(torch.randn(B, H, L, tn, generator=g, dtype=torch.float64), dim=-1)
    return q, k, v, naive.mean_pool_blocks(k, block), p, block


def test_restricted_correction_spans_the_pooled_and_the_pooled_cov_rules():
    q, k, v, k_means, p, block = _operands()
    scale = q.shape[-1] ** -0.5
    full = naive.covariance_correction(q, k, v, k_means, p, block, block, scale)
    tn = p.shape[-1]
    for r in (None, tn):
        corr, _ = restricted_cov.restricted_correction(r)
        torch.testing.assert_close(corr(q, k, v, k_means, p, block, block, scale), full, rtol=1e-12, atol=1e-12)
    none, _ = restricted_cov.restricted_correction(0)
    assert not none(q, k, v, k_means, p, block, block, scale).any()
    corr, shares = restricted_cov.restricted_correction(2)
    out = corr(q, k, v, k_means, p, block, block, scale)
    # By hand: the two largest mean weights of each query block, the others zeroed, through the same correction.
    pbar = naive.mean_pool_blocks(p, block)
    kept = torch.zeros_like(pbar).scatter(-1, pbar.topk(2, dim=-1).indices, 1.0) * pbar
    rows = kept.repeat_interleave(block, dim=-2)[..., :q.shape[-2], :]  # each row carries its block's kept mean
    expected = naive.covariance_correction(q, k, v, k_means, rows, block, block, scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert 0 < shares[0] < 1 and abs(shares[0] - float(kept.sum() / pbar.sum())) < 1e-12
