"""Block scoring and classification, tested on their own (the kernels and the attention paths are
tested with a block map handed to them)."""

import pytest
import torch

from sla.ops.sla.blockmap import (
    CRITICAL,
    MARGINAL,
    NEGLIGIBLE,
    BlockMap,
    block_lengths,
    build_block_map,
    class_counts,
    mean_pool_blocks,
    pooled_block_scores,
    select_blocks,
)


@pytest.mark.parametrize(("critical", "negligible", "tn", "want"), [
    (0.05, 0.10, 512, (25, 51)),   # Wan2.1-1.3B at 480p: 25 critical blocks of 512 (paper notes §3.1)
    (0.05, 0.10, 10, (1, 1)),      # at least one critical block
    (0.0, 0.0, 7, (1, 0)),
    (1.0, 0.5, 8, (8, 0)),         # negligible never eats into critical
    (0.29, 0.0, 100, (29, 0)),     # 0.29*100 is 28.999... in binary; floor must still give 29
    (0.5, 0.5, 9, (4, 4)),
])
def test_class_counts(critical, negligible, tn, want):
    assert class_counts(critical, negligible, tn) == want


def test_mean_pool_uses_real_tokens_of_short_last_block():
    x = torch.arange(10, dtype=torch.float64).reshape(1, 1, 10, 1)
    pooled = mean_pool_blocks(x, 4)
    assert pooled.flatten().tolist() == [1.5, 5.5, 8.5]  # last block holds tokens 8, 9 only
    assert block_lengths(10, 4).tolist() == [4, 4, 2]


def test_scores_use_smoothed_keys():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 33, 8, dtype=torch.float64)
    shifted = k + torch.randn(1, 2, 1, 8, dtype=torch.float64) * 10  # a shared key offset
    torch.testing.assert_close(pooled_block_scores(q, k, 16, 8), pooled_block_scores(q, shifted, 16, 8))
    expected = mean_pool_blocks(q, 16) @ mean_pool_blocks(k - k.mean(2, keepdim=True), 8).transpose(-1, -2)
    torch.testing.assert_close(pooled_block_scores(q, k, 16, 8), expected)


def test_scores_ignore_an_enclosing_autocast():
    q, k = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    plain = pooled_block_scores(q, k, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = pooled_block_scores(q, k, 64, 64)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


def test_tie_rule_prefers_lower_index_for_critical_and_higher_for_negligible():
    scores = torch.tensor([[[[1.0, 3.0, 3.0, 0.0, 0.0, 3.0]]]])
    crit, negl = select_blocks(scores, 2, 1)
    assert sorted(crit.flatten().tolist()) == [1, 2]   # three-way tie at 3.0: the two lowest indices win
    assert negl.flatten().tolist() == [4]               # tie at 0.0: the later index ranks lower


def test_selection_is_top_and_bottom_of_each_row():
    torch.manual_seed(1)
    q = torch.randn(2, 3, 300, 16)
    k = torch.randn(2, 3, 500, 16)
    bm = build_block_map(q, k, critical=0.2, negligible=0.3, block_q=32, block_k=32)
    scores = pooled_block_scores(q, k, 32, 32)
    tn = scores.shape[-1]
    assert (bm.n_critical, bm.n_negligible) == class_counts(0.2, 0.3, tn)
    for cls, n, largest in ((CRITICAL, bm.n_critical, True), (NEGLIGIBLE, bm.n_negligible, False)):
        picked = torch.where(bm.class_map == cls, scores, torch.nan)
        expect = torch.topk(scores, n, dim=-1, largest=largest).values
        # compare the selected score multisets row by row (indices may differ only on exact ties)
        got = torch.sort(picked.nan_to_num(float("-inf") if largest else float("inf")), dim=-1,
                         descending=largest).values[..., :n]
        torch.testing.assert_close(torch.sort(got, -1).values, torch.sort(expect, -1).values)
    counts = torch.stack([(bm.class_map == c).sum(-1) for c in (CRITICAL, MARGINAL, NEGLIGIBLE)])
    assert counts[0].unique().tolist() == [bm.n_critical]
    assert counts[2].unique().tolist() == [bm.n_negligible]
    assert counts[1].unique().tolist() == [tn - bm.n_critical - bm.n_negligible]


def test_luts_and_transposes_agree_with_class_map():
    torch.manual_seed(2)
    q = torch.randn(2, 2, 130, 8)
    k = torch.randn(2, 2, 200, 8)
    bm = build_block_map(q, k, critical=0.3, negligible=0.2, block_q=16, block_k=16)
    B, H, Tm, Tn = bm.class_map.shape
    for lut, lut_t_off, lut_t, cls in (
        (bm.critical_lut, bm.critical_lut_t_offsets, bm.critical_lut_t, CRITICAL),
        (bm.negligible_lut, bm.negligible_lut_t_offsets, bm.negligible_lut_t, NEGLIGIBLE),
    ):
        assert lut.dtype == lut_t.dtype == lut_t_off.dtype == torch.int32
        for b in range(B):
            for h in range(H):
                for i in range(Tm):
                    row = lut[b, h, i].tolist()
                    assert row == sorted(row)
                    assert row == torch.nonzero(bm.class_map[b, h, i] == cls).flatten().tolist()
                for j in range(Tn):
                    s, e = lut_t_off[b, h, j].item(), lut_t_off[b, h, j + 1].item()
                    col = lut_t[b, h, s:e].tolist()
                    assert col == torch.nonzero(bm.class_map[b, h, :, j] == cls).flatten().tolist()


def test_from_class_map_round_trip_and_bad_maps():
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 90, 8)
    bm = build_block_map(q, k, critical=0.25, negligible=0.25, block_q=16, block_k=16)
    again = BlockMap.from_class_map(bm.class_map, 100, 90, 16, 16)
    for f in ("class_map", "critical_lut", "negligible_lut", "critical_lut_t", "critical_lut_t_offsets"):
        assert torch.equal(getattr(bm, f), getattr(again, f)), f
    ragged = bm.class_map.clone()
    ragged[0, 0, 0] = MARGINAL
    with pytest.raises(ValueError, match="same"):
        BlockMap.from_class_map(ragged, 100, 90, 16, 16)


def test_sparsity_is_token_weighted():
    q, k = torch.randn(1, 1, 64, 4), torch.randn(1, 1, 70, 4)  # key blocks of 64 and 6 tokens
    bm = build_block_map(q, k, critical=0.5, negligible=0.0, block_q=64, block_k=64)
    crit_block = bm.critical_lut.item()
    attended = 64 if crit_block == 0 else 6
    assert bm.sparsity() == pytest.approx(1 - attended / 70)
    assert bm.block_sparsity == pytest.approx(0.5)


def test_block_map_needs_no_grad_and_rejects_mismatch():
    q = torch.randn(1, 1, 64, 8, requires_grad=True)
    bm = build_block_map(q, q, block_q=16, block_k=16)
    assert not bm.class_map.requires_grad
    with pytest.raises(ValueError, match="build it from these inputs"):
        bm.validate_for(torch.randn(1, 1, 65, 8), q)


@pytest.mark.parametrize(("crit", "negl", "match"), [
    ([[0, 0]], [[2]], "twice"),
    ([[0, 5]], [[2]], "outside"),
    ([[0, 1]], [[1]], "disjoint"),
    ([[-1, 1]], [[2]], "outside"),
])
def test_from_luts_rejects_inconsistent_tables(crit, negl, match):
    c = torch.tensor(crit).reshape(1, 1, 1, -1)
    n = torch.tensor(negl).reshape(1, 1, 1, -1)
    with pytest.raises(ValueError, match=match):
        BlockMap.from_luts(c, n, seq_len_q=16, seq_len_k=64, block_q=16, block_k=16)
    ok = BlockMap.from_luts(torch.tensor([[[[3, 0]]]]), torch.tensor([[[[2]]]]), 16, 64, 16, 16)
    assert ok.class_map.flatten().tolist() == [1, 0, -1, 1]
