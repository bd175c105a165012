"""Tests of sla.analysis and `sla analyze`: metrics on planted structure with known answers, agreement with
the operator's reference, capture on a diffusers Wan model, clear errors, and the CLI writing its files."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from sla.analysis import metrics
from sla.analysis.layer import AnalysisConfig, OwnProjection, analyze_attention
from sla.ops.sla.blockmap import build_block_map
from sla.ops.sla.naive import naive_sparse_linear_attention

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="needs diffusers (the test extra installs it)")


# --------------------------------------------------------------------------------------------------------------
# metrics on planted structure
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 9, 40])
def test_stable_rank_of_planted_equal_singular_values(rank):
    g = torch.Generator().manual_seed(rank)
    u = torch.linalg.qr(torch.randn(600, rank, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(900, rank, generator=g, dtype=torch.float64)).Q
    a = 0.01 * u @ v.T
    assert metrics.stable_rank(a) == pytest.approx(rank, rel=1e-9)
    assert metrics.stable_rank(a.T) == pytest.approx(rank, rel=1e-9)


def test_stable_rank_of_known_spectrum_and_zero():
    # Singular values 4, 2, 2, 1: ||A||_F^2 / ||A||_2^2 = (16 + 4 + 4 + 1) / 16.
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 4, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(500, 4, generator=g, dtype=torch.float64)).Q
    a = u @ torch.diag(torch.tensor([4.0, 2.0, 2.0, 1.0], dtype=torch.float64)) @ v.T
    assert metrics.stable_rank(a) == pytest.approx(25 / 16, rel=1e-9)
    assert metrics.stable_rank(torch.zeros(5, 7)) == 0.0


def test_largest_eigenvalue_matches_full_eigensolve():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    spectrum = torch.cat([torch.tensor([3.0, 3.0, 2.9]), torch.rand(297, generator=g) * 2]).double()
    planted = u @ torch.diag(spectrum) @ u.T  # a repeated top eigenvalue
    for gram in (planted, (lambda x: x @ x.T)(torch.softmax(3 * torch.randn(300, 800, generator=g), -1).double())):
        assert metrics.largest_eigenvalue(gram) == pytest.approx(float(torch.linalg.eigvalsh(gram)[-1]), rel=1e-9)


def test_attention_distribution_known_fractions():
    # 80 of 1000 weights per row are large, the other 920 are 1e-6 < 1/(100 N) = 1e-5.
    n, big = 1000, 80
    small = 1e-6
    probs = torch.full((6, n), small, dtype=torch.float64)
    probs[:, :big] = (1 - (n - big) * small) / big
    d = metrics.attention_distribution(probs)
    assert d["frac_above_mean"] == pytest.approx(big / n)
    assert d["frac_below_mean_over_100"] == pytest.approx((n - big) / n)
    assert d["mass_above_mean"] == pytest.approx(1 - (n - big) * small)
    assert sum(d["histogram"]["counts"]) == probs.numel()
    # log10(N * 1e-6) = -3 lands in the bin starting at -3.0.
    edges = d["histogram"]["edges"]
    i = max(j for j, e in enumerate(edges[:-1]) if e <= -3.0 + 1e-9)
    assert d["histogram"]["counts"][i] == 6 * (n - big)


def test_block_mass_and_recall():
    probs = torch.rand(130, 200, dtype=torch.float64)
    mass = metrics.block_attention_mass(probs, 64, 64)
    assert mass.shape == (3, 4)
    assert float(mass.sum()) == pytest.approx(float(probs.sum()))
    assert float(mass[2, 3]) == pytest.approx(float(probs[128:, 192:].sum()))
    assert metrics.critical_set_recall(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 0], [3, 0]])) == 0.75


def test_fit_shared_projection_recovers_an_exact_linear_map():
    g = torch.Generator().manual_seed(2)
    o_l = torch.randn(3, 256, 8, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    target = o_l @ w.T + b
    groups = torch.arange(256) // 32
    pred = metrics.fit_shared_projection(o_l, target, groups)
    torch.testing.assert_close(pred, target, rtol=1e-9, atol=1e-9)
    # Noise that no projection can predict: the cross-validated ridge falls back to (nearly) zero.
    noise = torch.randn(3, 256, 8, generator=g, dtype=torch.float64)
    pred = metrics.fit_shared_projection(0.01 * o_l, noise, groups)
    assert float(pred.abs().mean()) < 0.2 * float(noise.abs().mean())
    with pytest.raises(ValueError, match="two groups"):
        metrics.fit_shared_projection(o_l, target, torch.zeros(256, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------------
# analyze_attention: planted structure and agreement with the operator's reference
# --------------------------------------------------------------------------------------------------------------


def _planted_blocks(num_blocks=16, block=64, dim=32, strength=8.0, seed=0):
    """Query block i attends to key blocks i and i+5 (mod num_blocks): keys of block j point along e_j,
    queries of block i along e_i + e_{i+5}."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(dim, dtype=torch.float64)[:num_blocks]
    k = eye.repeat_interleave(block, 0) * strength + 0.05 * torch.randn(num_blocks * block, dim, generator=g,
                                                                         dtype=torch.float64)
    partner = (torch.arange(num_blocks) + 5) % num_blocks
    q = (eye + eye[partner]).repeat_interleave(block, 0) * strength
    v = torch.randn(num_blocks * block, dim, generator=g, dtype=torch.float64)
    return q[None], k[None], v[None], partner


def test_planted_block_structure_gives_recall_one():
    q, k, v, partner = _planted_blocks()
    cfg = AnalysisConfig(sparsities=(0.875,), critical=2 / 16, negligible=0.25, query_blocks=None)
    result, class_map = analyze_attention(q, k, v, cfg)
    rc = result["recall"]["at_critical"]
    assert rc["n_critical_blocks"] == 2
    assert rc["recall"] == 1.0
    assert rc["mass_pooled"] == pytest.approx(rc["mass_oracle"])
    assert rc["mass_pooled"] > 0.99
    # The class map marks exactly the planted blocks critical.
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[torch.arange(16), torch.arange(16)] = True
    want[torch.arange(16), partner] = True
    assert torch.equal(class_map[0] == 1, want)
    # Nearly all attention sits in the critical blocks, so block sparse-only is nearly exact.
    assert result["errors"]["block_pooled_sparse_only"][0] < 1e-3


def test_analysis_matches_the_operator_reference():
    g = torch.Generator().manual_seed(3)
    L, D = 200, 16  # short last block
    q, k, v = (torch.randn(2, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    cfg = AnalysisConfig(sparsities=(0.0, 0.5, 0.75), critical=0.25, negligible=0.25, query_blocks=None)
    result, class_map = analyze_attention(q, k, v, cfg)
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
    errs = result["errors"]
    assert errs["sparsity"] == [0.0, 0.5, 0.75]
    assert errs["token_topk_renormalised"][0] == pytest.approx(0.0, abs=1e-12)
    for i, s in enumerate(errs["sparsity"]):
        bm = build_block_map(q[None], k[None], critical=1 - s, negligible=min(0.25, s))
        sparse_only = naive_sparse_linear_attention(q[None], k[None], v[None], bm, combine="paper",
                                                    proj_weight=torch.zeros(D, D, dtype=torch.float64))[0]
        identity = naive_sparse_linear_attention(q[None], k[None], v[None], bm, combine="paper")[0]
        mass = naive_sparse_linear_attention(q[None], k[None], v[None], bm, combine="mass")[0]
        per_head = [metrics.relative_l1(sparse_only[h], dense[h]) for h in range(2)]
        assert errs["block_pooled_sparse_only"][i] == pytest.approx(sum(per_head) / 2, rel=1e-9, abs=1e-12)
        per_head = [metrics.relative_l1(identity[h], dense[h]) for h in range(2)]
        assert errs["sla_identity_projection"][i] == pytest.approx(sum(per_head) / 2, rel=1e-9)
        per_head = [metrics.relative_l1(mass[h], dense[h]) for h in range(2)]
        assert errs["sla_mass_rule"][i] == pytest.approx(sum(per_head) / 2, rel=1e-9, abs=1e-12)
        assert errs["block_achieved_sparsity"][i] == pytest.approx(bm.sparsity(), rel=1e-9)
    assert torch.equal(class_map, build_block_map(q[None], k[None], critical=0.25, negligible=0.25).class_map[0])
    assert errs["sla_own_projection"] is None
    assert len(errs["sla_lstsq_projection"]) == 3


@pytest.mark.parametrize("linear_scope", ["marginal", "noncritical"])
def test_mass_rule_decomposition_against_direct_computation(linear_scope):
    """The mass rule's error with its critical mass ``a`` and its linear branch ``o_l`` replaced, one at a time and
    together, by the exact quantities, recomputed here from dense probabilities and the operator's reference. Over
    every non-critical block (``noncritical``) the exact mix is dense attention itself."""
    from sla.ops.sla.blockmap import CRITICAL, in_linear_scope
    from sla.ops.sla.naive import expand_block_mask

    g = torch.Generator().manual_seed(5)
    L, D = 200, 16
    q, k, v = (torch.randn(2, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    cfg = AnalysisConfig(sparsities=(0.5, 0.75), critical=0.25, negligible=0.25, query_blocks=None,
                         linear_scope=linear_scope)
    errs = analyze_attention(q, k, v, cfg)[0]["errors"]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    dense = probs @ v

    def err(out):
        return sum(metrics.relative_l1(out[h], dense[h]) for h in range(2)) / 2

    for i, s in enumerate(errs["sparsity"]):
        bm = build_block_map(q[None], k[None], critical=1 - s, negligible=min(0.25, s))
        crit = expand_block_mask(bm.class_map[0] == CRITICAL, L, L, 64, 64)
        scope = expand_block_mask(in_linear_scope(bm.class_map[0], linear_scope), L, L, 64, 64)
        a_true = (probs * crit).sum(-1, keepdim=True)
        o_s = (probs * crit) @ v / a_true
        o_rest = torch.nan_to_num((probs * scope) @ v / (probs * scope).sum(-1, keepdim=True))
        # The operator's o_l (identity Proj, paper rule: o_s + o_l) and its estimated a (mass rule, solved per row).
        o_l = naive_sparse_linear_attention(q[None], k[None], v[None], bm, combine="paper",
                                            linear_scope=linear_scope)[0] - o_s
        mixed = naive_sparse_linear_attention(q[None], k[None], v[None], bm, combine="mass",
                                              linear_scope=linear_scope)[0]
        diff = o_s - o_l
        a_est = ((mixed - o_l) * diff).sum(-1, keepdim=True) / (diff * diff).sum(-1, keepdim=True)
        assert torch.allclose(a_est * o_s + (1 - a_est) * o_l, mixed, atol=1e-12)
        assert errs["sla_mass_rule"][i] == pytest.approx(err(mixed), rel=1e-9)
        assert errs["mass_rule_true_a"][i] == pytest.approx(err(a_true * o_s + (1 - a_true) * o_l), rel=1e-9)
        assert errs["mass_rule_exact_rest"][i] == pytest.approx(err(a_est * o_s + (1 - a_est) * o_rest), rel=1e-9)
        assert errs["mass_rule_true_a_exact_rest"][i] == pytest.approx(
            err(a_true * o_s + (1 - a_true) * o_rest), rel=1e-9, abs=1e-12)
        want = float(sum((a_est[h] - a_true[h]).abs().mean() for h in range(2)) / 2)
        assert errs["mass_estimate_error"][i] == pytest.approx(want, rel=1e-9)
        # The pooled-key candidate: each key block as n_j keys at its mean key, with its mean value.
        n = torch.tensor([64.0, 64.0, 64.0, 8.0], dtype=torch.float64)
        k_mean = torch.stack([k[:, j * 64:(j + 1) * 64].mean(1) for j in range(4)], 1)  # (H, T_n, D)
        v_mean = torch.stack([v[:, j * 64:(j + 1) * 64].mean(1) for j in range(4)], 1)
        pooled = torch.exp(q @ k_mean.transpose(-1, -2) / math.sqrt(D)) * n  # (H, L, T_n)
        row_class = bm.class_map[0].repeat_interleave(64, dim=-2)[:, :L]
        rest_mass = (pooled * (row_class != CRITICAL)).sum(-1, keepdim=True)
        exact_crit_mass = (torch.exp(q @ k.transpose(-1, -2) / math.sqrt(D)) * crit).sum(-1, keepdim=True)
        a_pooled = exact_crit_mass / (exact_crit_mass + rest_mass)
        in_scope = in_linear_scope(row_class, linear_scope)
        w = pooled * in_scope
        o_pooled = torch.nan_to_num(w @ v_mean / w.sum(-1, keepdim=True))
        assert errs["mass_rule_pooled_a"][i] == pytest.approx(err(a_pooled * o_s + (1 - a_pooled) * o_l), rel=1e-9)
        assert errs["mass_rule_pooled"][i] == pytest.approx(err(a_pooled * o_s + (1 - a_pooled) * o_pooled),
                                                            rel=1e-9)
        assert errs["mass_rule_true_a_pooled_rest"][i] == pytest.approx(
            err(a_true * o_s + (1 - a_true) * o_pooled), rel=1e-9)
        want = float(sum((a_pooled[h] - a_true[h]).abs().mean() for h in range(2)) / 2)
        assert errs["pooled_mass_estimate_error"][i] == pytest.approx(want, rel=1e-9)
        # The candidate with the keys' spread: exp(scale q.mean + scale^2/2 q^2 . var) per key, the Gaussian mean.
        k_var = torch.stack([k[:, j * 64:(j + 1) * 64].var(1, unbiased=False) for j in range(4)], 1)
        spread = pooled * torch.exp((q * q) @ k_var.transpose(-1, -2) / (2 * D))
        a_var = exact_crit_mass / (exact_crit_mass + (spread * (row_class != CRITICAL)).sum(-1, keepdim=True))
        w = spread * in_scope
        o_var = torch.nan_to_num(w @ v_mean / w.sum(-1, keepdim=True))
        assert errs["mass_rule_pooled_var"][i] == pytest.approx(err(a_var * o_s + (1 - a_var) * o_var), rel=1e-9)
        want = float(sum((a_var[h] - a_true[h]).abs().mean() for h in range(2)) / 2)
        assert errs["pooled_var_mass_estimate_error"][i] == pytest.approx(want, rel=1e-9)
        # The pooled rule plus the best least-squares correction from (1 - a) o_l, fitted and scored out of sample
        # over the same row groups (every query block, as query_blocks=None samples them all).
        pooled_out = a_pooled * o_s + (1 - a_pooled) * o_pooled
        pred = metrics.fit_shared_projection((1 - a_pooled) * o_l, dense - pooled_out, torch.arange(L) // 64)
        assert errs["pooled_lstsq_projection"][i] == pytest.approx(err(pooled_out + pred), rel=1e-9)
        # Finer coarse attention: groups of 32 (half blocks) and 16 keys, each group in its key block's class.
        for name, g in (("mass_rule_pooled_half", 32), ("mass_rule_pooled_quarter", 16)):
            ng = -(-L // g)
            n_g = torch.tensor([min(g, L - j * g) for j in range(ng)], dtype=torch.float64)
            k_g = torch.stack([k[:, j * g:(j + 1) * g].mean(1) for j in range(ng)], 1)
            v_g = torch.stack([v[:, j * g:(j + 1) * g].mean(1) for j in range(ng)], 1)
            w_all = torch.exp(q @ k_g.transpose(-1, -2) / math.sqrt(D)) * n_g
            cls_g = row_class.repeat_interleave(64 // g, dim=-1)[..., :ng]
            a_g = exact_crit_mass / (exact_crit_mass + (w_all * (cls_g != CRITICAL)).sum(-1, keepdim=True))
            w = w_all * in_linear_scope(cls_g, linear_scope)
            o_g = torch.nan_to_num(w @ v_g / w.sum(-1, keepdim=True))
            assert errs[name][i] == pytest.approx(err(a_g * o_s + (1 - a_g) * o_g), rel=1e-9)
        # What the block means leave out: each block's exact mass per row (with mean values; a follows exactly),
        # each block's exact softmax average of values (with pooled weights), and mean values corrected to first
        # order for the spread of the block's keys, per row and with the weights averaged over each query block.
        e = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(D))  # (H, L, L)
        block_of = torch.arange(L) // 64
        onehot = torch.nn.functional.one_hot(block_of, 4).to(torch.float64)  # (L keys, T_n)
        block_mass = e @ onehot  # (H, L, T_n)
        a_x = exact_crit_mass / (exact_crit_mass + (block_mass * (row_class != CRITICAL)).sum(-1, keepdim=True))
        torch.testing.assert_close(a_x, a_true)
        w = block_mass * in_scope
        o_x = torch.nan_to_num(w @ v_mean / w.sum(-1, keepdim=True))
        assert errs["pooled_exact_block_mass"][i] == pytest.approx(err(a_x * o_s + (1 - a_x) * o_x), rel=1e-9)
        v_exact = torch.einsum("hlj,jt,hjd->hltd", e, onehot, v) / block_mass[..., None]
        p_pooled = torch.nan_to_num((pooled * in_scope) / (pooled * in_scope).sum(-1, keepdim=True))
        o_v = torch.einsum("hlt,hltd->hld", p_pooled, v_exact)
        assert errs["pooled_exact_block_values"][i] == pytest.approx(err(a_pooled * o_s + (1 - a_pooled) * o_v),
                                                                     rel=1e-9)
        cov = torch.einsum("hjd,jt,hje->htde", k - k_mean[:, block_of], onehot, v) / n[:, None, None]
        corr = torch.einsum("hlt,hld,htde->hle", p_pooled, q, cov) / math.sqrt(D)
        assert errs["pooled_first_order"][i] == pytest.approx(
            err(a_pooled * o_s + (1 - a_pooled) * (o_pooled + corr)), rel=1e-9)
        p_bar = torch.stack([p_pooled[:, j * 64:(j + 1) * 64].mean(1) for j in range(4)], 1)  # (H, T_m, T_n)
        state = torch.einsum("hmt,htde->hmde", p_bar, cov)  # per query block
        corr_b = torch.einsum("hld,hlde->hle", q, state[:, block_of]) / math.sqrt(D)
        assert errs["pooled_first_order_block"][i] == pytest.approx(
            err(a_pooled * o_s + (1 - a_pooled) * (o_pooled + corr_b)), rel=1e-9)
        first = a_pooled * o_s + (1 - a_pooled) * (o_pooled + corr_b)
        pred = metrics.fit_shared_projection((1 - a_pooled) * o_l, dense - first, torch.arange(L) // 64)
        assert errs["pooled_first_order_block_lstsq"][i] == pytest.approx(err(first + pred), rel=1e-9)
        p_var = torch.nan_to_num((spread * in_scope) / (spread * in_scope).sum(-1, keepdim=True))
        p_var_bar = torch.stack([p_var[:, j * 64:(j + 1) * 64].mean(1) for j in range(4)], 1)
        state = torch.einsum("hmt,htde->hmde", p_var_bar, cov)
        o_var_first = o_var + torch.einsum("hld,hlde->hle", q, state[:, block_of]) / math.sqrt(D)
        assert errs["pooled_spread_first_order_block"][i] == pytest.approx(
            err(a_var * o_s + (1 - a_var) * o_var_first), rel=1e-9)
        if linear_scope == "noncritical":
            assert errs["mass_rule_true_a_exact_rest"][i] < 1e-12


def test_own_projection_zero_and_identity():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 256, 8, generator=g) for _ in range(3))
    cfg = AnalysisConfig(sparsities=(0.5,), critical=0.5, negligible=0.0, query_blocks=None)
    settings = dict(critical=0.5, negligible=0.0, block_q=64, block_k=64, feature_map="softmax",
                    linear_scope="marginal")
    zero, _ = analyze_attention(q, k, v, cfg, own_projection=OwnProjection(torch.zeros(8, 8), None, **settings))
    ident, _ = analyze_attention(q, k, v, cfg, own_projection=OwnProjection(torch.eye(8), torch.zeros(8), **settings))
    assert zero["errors"]["sla_own_projection"] == pytest.approx(zero["errors"]["block_pooled_sparse_only"])
    assert ident["errors"]["sla_own_projection"] == pytest.approx(ident["errors"]["sla_identity_projection"])


@pytest.mark.parametrize("combine", ["pooled", "pooled_cov"])
def test_own_projection_of_the_pooled_rules_matches_the_operator(combine):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 200, 8, generator=g, dtype=torch.float64) for _ in range(3))
    w, b, mo = torch.randn(8, 8, generator=g), torch.randn(8, generator=g), torch.randn(2, generator=g)
    cfg = AnalysisConfig(sparsities=(0.5,), critical=0.5, negligible=0.25, query_blocks=None)
    own = OwnProjection(w, b, critical=0.5, negligible=0.25, block_q=64, block_k=64, feature_map="softmax",
                        linear_scope="marginal", combine=combine, mass_offset=mo)
    got = analyze_attention(q, k, v, cfg, own_projection=own)[0]["errors"]["sla_own_projection"][0]
    bm = build_block_map(q[None], k[None], critical=0.5, negligible=0.25)
    out = naive_sparse_linear_attention(q[None], k[None], v[None], bm, proj_weight=w.double(), proj_bias=b.double(),
                                        combine=combine, mass_offset=mo.double())[0]
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    want = sum(metrics.relative_l1(out[h], dense[h]) for h in range(2)) / 2
    assert got == pytest.approx(want, rel=1e-9)


def test_query_block_sampling_keeps_whole_blocks():
    blocks = metrics.sample_query_blocks(1000, 64, 5, torch.Generator().manual_seed(0))
    assert blocks.tolist() == sorted(blocks.tolist()) and len(set(blocks.tolist())) == 5
    rows = metrics.gather_query_blocks(torch.arange(1000.0)[:, None], torch.tensor([2, 15]), 64)
    assert rows[:, 0].tolist() == list(range(128, 192)) + list(range(960, 1000))


def test_bad_analysis_config():
    q = torch.randn(1, 64, 8)
    with pytest.raises(ValueError, match="sparsity"):
        analyze_attention(q, q, q, AnalysisConfig(sparsities=(1.5,)))
    with pytest.raises(ValueError, match="rank_top"):
        analyze_attention(q, q, q, AnalysisConfig(rank_top=0.0))
    with pytest.raises(ValueError, match=r"\(H, L, D\)"):
        analyze_attention(q[None], q[None], q[None], AnalysisConfig())


# --------------------------------------------------------------------------------------------------------------
# capture on a diffusers Wan model
# --------------------------------------------------------------------------------------------------------------


def _small_wan(seed=0):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                     num_layers=3, rope_max_seq_len=32).eval()


def _drive(model, steps=3):
    from sla.analysis.models import run_flow_matching

    return run_flow_matching(model, num_steps=steps, latent_size=(2, 16, 16), text_len=8, seed=0, progress=False)


@needs_diffusers
def test_capture_records_normalised_qkv_and_leaves_the_model_unchanged():
    from sla.analysis import AttentionCapture

    model = _small_wan()
    expected = _drive(model)
    with AttentionCapture(model, layers=[0, -1], steps=[0, 2], heads=None) as cap:
        got = _drive(model)
    cap.check_complete()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [(c.layer_name, c.step) for c in cap.captures] == [
        ("blocks.0.attn1", 0), ("blocks.2.attn1", 0), ("blocks.0.attn1", 2), ("blocks.2.attn1", 2)]
    c = cap.captures[0]
    assert c.q.shape == (2, 128, 16) and c.k.shape == (2, 128, 16) and c.v.shape == (2, 128, 16)
    assert c.source == "sdpa" and c.heads == [0, 1] and c.num_heads == 2
    # q is taken after RMSNorm over all heads (unit weight at init) and RoPE (a rotation): mean square 1.
    torch.testing.assert_close(c.q.pow(2).mean(dim=(0, 2)), torch.ones(128), rtol=0, atol=1e-3)
    # No hook or mode is left behind.
    assert not model._forward_pre_hooks and not model.blocks[0].attn1._forward_hooks


@needs_diffusers
def test_capture_sla_applied_layer_uses_its_projection():
    from sla.analysis import AnalysisConfig as Cfg
    from sla.analysis import analyze_model
    from sla.integrations.diffusers import apply_sla, sla_modules

    model = _small_wan()
    apply_sla(model, critical=0.25, negligible=0.0, block_q=32, block_k=32, backend="torch")
    with torch.no_grad():
        for module in sla_modules(model).values():
            module.proj.weight.copy_(0.1 * torch.eye(16))
    result = analyze_model(model, lambda: _drive(model, steps=2), layers=[1], steps=[1], heads=1,
                           config=Cfg(sparsities=(0.75,), query_blocks=None, block_q=32, block_k=32), progress=False)
    (entry,) = result.entries
    assert entry["source"] == "sla" and entry["own_sla_settings"]["critical"] == 0.25
    assert entry["errors"]["sla_own_projection"] is not None


@needs_diffusers
def test_capture_of_an_sdpa_wrapped_layer_reports_its_sla_module():
    from sla.analysis import AttentionCapture
    from sla.integrations.sdpa import wrap_sdpa_self_attention

    model = _small_wan()
    wrap_sdpa_self_attention(model.blocks[1].attn1, head_dim=16, critical=0.5, negligible=0.0, block_q=32,
                             block_k=32, backend="torch")
    with AttentionCapture(model, layers=[0, 1], steps=[0], heads=None) as cap:
        _drive(model, steps=1)
    cap.check_complete()
    assert [(c.layer_name, c.source) for c in cap.captures] == [("blocks.0.attn1", "sdpa"), ("blocks.1.attn1", "sla")]
    own = cap.captures[1].own_projection
    assert own.critical == 0.5 and own.block_q == 32 and own.weight.shape == (16, 16)


@needs_diffusers
def test_bad_layer_and_step_selections():
    from sla.analysis import AttentionCapture, resolve_layers, resolve_steps

    model = _small_wan()
    with pytest.raises(ValueError, match="out of range.*3 self-attention layers"):
        resolve_layers(model, [3])
    with pytest.raises(ValueError, match="not a self-attention layer"):
        resolve_layers(model, ["blocks.0.attn2"])
    with pytest.raises(ValueError, match="does not exist"):
        resolve_layers(model, ["blocks.9.attn1"])
    with pytest.raises(TypeError):
        resolve_layers(model, [1.5])
    assert [i for i, _, _ in resolve_layers(model, "auto")] == [0, 1, 2]
    assert [n for _, n, _ in resolve_layers(model, ["-1", "blocks.0.attn1"])] == ["blocks.0.attn1", "blocks.2.attn1"]
    with pytest.raises(ValueError, match="out of range.*4 denoising steps"):
        resolve_steps([4], 4)
    with pytest.raises(ValueError, match="integers"):
        resolve_steps(["x"], 4)
    assert resolve_steps([-1, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="non-negative"):
        AttentionCapture(model, steps=[-1])
    with AttentionCapture(model, layers=[0], steps=[5]) as cap:
        _drive(model, steps=2)
    with pytest.raises(ValueError, match=r"steps \[5\].*only 2 times"):
        cap.check_complete()
    with pytest.raises(ValueError, match="heads \\[7\\] do not exist"):
        with AttentionCapture(model, layers=[0], steps=[0], heads=[7]):
            _drive(model, steps=1)


# --------------------------------------------------------------------------------------------------------------
# the CLI end to end on the built-in tiny random model
# --------------------------------------------------------------------------------------------------------------


@needs_diffusers
def test_cli_analyze_tiny_random_writes_report(tmp_path, capsys):
    from sla.cli import main

    out = tmp_path / "analysis"
    rc = main(["analyze", "--model", "tiny-random", "--num-steps", "2", "--layers", "0,-1", "--steps", "-1",
               "--heads", "2", "--query-blocks", "4", "--sparsities", "0.5,0.9", "--out", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["layer"] for c in summary["captures"]] == ["blocks.0.attn1", "blocks.1.attn1"]
    c = summary["captures"][0]
    assert c["step"] == 1 and c["seq_len_k"] == 4096 and c["query_rows"] == 256
    assert c["block_classes"]["num_key_blocks"] == 64
    assert c["errors"]["sparsity"] == [0.5, 0.9, 0.95]
    assert 0.0 <= c["distribution"]["frac_above_mean"] <= 1.0
    for name in ("report.md", "weight_histogram.png", "error_vs_sparsity.png", "stable_rank.png",
                 "class_map_blocks_0_attn1_step1.png", "class_map_blocks_1_attn1_step1.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| blocks.0.attn1 @ 1 |" in (out / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out


@needs_diffusers
def test_cli_analyze_model_folder(tmp_path):
    from sla.cli import main

    # A pipeline folder: model_index.json plus the transformer saved with save_pretrained.
    _small_wan().save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    out = tmp_path / "out"
    rc = main(["analyze", "--model", str(tmp_path / "pipe"), "--latent-size", "2", "16", "16", "--num-steps", "2",
               "--steps", "all", "--layers", "blocks.1.attn1", "--block-q", "32", "--block-k", "32",
               "--query-blocks", "all", "--no-plots", "--quiet", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(c["layer"], c["step"]) for c in summary["captures"]] == [("blocks.1.attn1", 0), ("blocks.1.attn1", 1)]
    assert summary["captures"][0]["query_rows"] == 128 and summary["plots"] == []
    assert (out / "report.md").is_file()


@needs_diffusers
@pytest.mark.parametrize("argv, message", [
    (["--layers", "9"], "out of range"),
    (["--layers", "blocks.0.attn2"], "not a self-attention layer"),
    (["--steps", "7"], "out of range"),
    (["--heads", "ids:9"], "do not exist"),
    (["--model", "no-such-model"], "neither a built-in model"),
    (["--sparsities", "0.5,abc"], "comma list of numbers"),
])
def test_cli_analyze_bad_input(tmp_path, capsys, argv, message):
    from sla.cli import main

    rc = main(["analyze", "--num-steps", "1", "--quiet", "--no-plots", "--query-blocks", "1", "--heads", "1",
               "--out", str(tmp_path)] + argv)
    assert rc == 2
    assert message in capsys.readouterr().err
