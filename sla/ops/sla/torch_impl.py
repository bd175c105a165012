"""Memory-efficient SLA in plain PyTorch: the default on CPU, and usable on any device.

Layout ``(B, H, L, D)``; float16/bfloat16 inputs are computed in float32 and the output cast back,
float32 and float64 are computed in their own precision. Computes the SLA variant selected by
``linear_scope`` (the paper's ``"marginal"`` by default).

Memory per (batch, head) is O(L * (n_crit * block_k + D)) plus the per-block linear states; no
``(Lq, Lk)`` tensor is ever formed:

* Sparse branch: a custom autograd function gathers each query block's critical K/V blocks, runs an
  exact softmax over them, and keeps only ``o_s`` and the log-sum-exp for backward, which recomputes the
  probabilities chunk by chunk (FlashAttention's recomputation, in PyTorch).
* Linear branch: per-key-block states ``h_j = phi(K_j)^T V_j`` and ``z_j = sum phi(K_j)`` are formed once;
  each query block's ``H_i``/``Z_i`` is either the total minus the excluded blocks (pre-aggregation) or the
  sum of the included blocks, whichever touches fewer blocks. ``embedding_bag`` sums the gathered states
  without materialising them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...settings import POOLED_RULES
from .backend import Backend
from .blockmap import MARGINAL, BlockMap, block_lengths
from .feature_maps import apply_feature_map
from .naive import coarse_branch, mass_weight, pooled_weight

# Upper bound on the elements of one chunk's gathered K/V and score tensors. On CPU the chunk should stay
# cache-resident (4 MB in float32 beat 64 MB: bench/RESULTS.md, "Measurements behind code choices"); GPUs want
# large launches instead.
_CPU_CHUNK_ELEMENTS = 1 << 20
_DEVICE_CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the PyTorch path: float32 for half inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B*H, ceil(L/block), block, D)``, zero-padding the last block."""
    B, H, L, D = x.shape
    nb = -(-L // block)
    if nb * block != L:
        x = F.pad(x, (0, 0, 0, nb * block - L))
    return x.reshape(B * H, nb, block, D)


def _key_bias(seq_len_k: int, block_k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(T_n, block_k)`` additive score bias: 0 for real keys, -inf for the padding of the last block."""
    lengths = block_lengths(seq_len_k, block_k, device)
    valid = torch.arange(block_k, device=device)[None, :] < lengths[:, None]
    return torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, float("-inf"))


def _row_chunks(rows: int, row_elements: int, device: torch.device):
    budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    step = max(1, budget // max(1, row_elements))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _gather_rows(blocks: torch.Tensor, flat_lut: torch.Tensor) -> torch.Tensor:
    """``blocks (G*T_n, bk, D)`` indexed by ``flat_lut (R, n)`` -> ``(R, n*bk, D)``."""
    R, n = flat_lut.shape
    # index_select on the leading dim is a plain strided copy; advanced indexing is several times slower.
    return blocks.index_select(0, flat_lut.reshape(-1)).view(R, n * blocks.shape[1], blocks.shape[2])


def _masked_scores(q_scaled, kg, bias, idx, Tn):
    """Scores of query rows against gathered keys, with -inf on the padding of a short last key block."""
    scores = torch.bmm(q_scaled, kg.transpose(1, 2))
    if bias is not None:
        scores += bias[idx % Tn].reshape(idx.shape[0], 1, -1)
    return scores


class _BlockSparseAttention(torch.autograd.Function):
    """Exact softmax attention of each query block over its critical key blocks.

    Inputs are blocked: ``q (G, T_m, bq, D)``, ``k, v (G, T_n, bk, D)``, ``lut (G, T_m, n)`` int64,
    ``bias (T_n, bk)`` marking padded keys (None when the last key block is full). Returns
    ``o (G, T_m, bq, D)`` and the natural log-sum-exp of the scaled scores ``(G, T_m, bq, 1)``; both are
    differentiable (``combine="mass"`` mixes the branches by a weight computed from the LSE). Backward
    recomputes the probabilities from the saved log-sum-exp.
    """

    @staticmethod
    def forward(ctx, q, k, v, lut, bias, scale):
        G, Tm, bq, D = q.shape
        Tn, bk = k.shape[1], k.shape[2]
        n = lut.shape[2]
        flat_lut = (lut + torch.arange(G, device=lut.device)[:, None, None] * Tn).reshape(G * Tm, n)
        q_scaled = q.reshape(G * Tm, bq, D) * scale
        k_flat, v_flat = k.reshape(G * Tn, bk, D), v.reshape(G * Tn, bk, D)
        o = torch.empty_like(q_scaled)
        lse = torch.empty(G * Tm, bq, 1, dtype=q.dtype, device=q.device)
        for s, e in _row_chunks(G * Tm, n * bk * (2 * D + 2 * bq), q.device):
            idx = flat_lut[s:e]
            p = _masked_scores(q_scaled[s:e], _gather_rows(k_flat, idx), bias, idx, Tn)
            m = p.amax(dim=-1, keepdim=True)
            p.sub_(m).exp_()
            denom = p.sum(dim=-1, keepdim=True)
            torch.bmm(p, _gather_rows(v_flat, idx), out=o[s:e]).div_(denom)
            lse[s:e] = m + denom.log()
        ctx.save_for_backward(q_scaled, k_flat, v_flat, flat_lut, bias, o, lse)
        ctx.set_materialize_grads(False)  # the LSE is used only by combine="mass": no zero gradient for it
        ctx.scale = scale
        ctx.shapes = (G, Tm, Tn)
        return o.reshape(G, Tm, bq, D), lse.reshape(G, Tm, bq, 1)

    @staticmethod
    def backward(ctx, do, dlse):
        if do is None and dlse is None:
            return None, None, None, None, None, None
        device = (do if do is not None else dlse).device
        with torch.autocast(device.type, enabled=False):  # backward may run inside the caller's autocast
            return _BlockSparseAttention._backward(ctx, do, dlse)

    @staticmethod
    def _backward(ctx, do, dlse):
        q_scaled, k_flat, v_flat, flat_lut, bias, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        G, Tm, Tn = ctx.shapes
        R, bq, D = q_scaled.shape
        bk, n = k_flat.shape[1], flat_lut.shape[1]
        do = do.reshape(R, bq, D)
        delta = (do * o).sum(-1, keepdim=True)  # D^s of Algorithm 2: rowsum(dO * O)
        if dlse is not None:
            # d lse / d s_j = p_j, so an LSE gradient enters dS = p * (dP - delta) as delta - dlse.
            delta = delta - dlse.reshape(R, bq, 1)
        dq = torch.empty_like(q_scaled)
        dk = torch.zeros_like(k_flat)
        dv = torch.zeros_like(v_flat)
        for s, e in _row_chunks(R, n * bk * (4 * D + 3 * bq), do.device):
            idx = flat_lut[s:e]
            kg, vg = _gather_rows(k_flat, idx), _gather_rows(v_flat, idx)
            p = _masked_scores(q_scaled[s:e], kg, bias, idx, Tn).sub_(lse[s:e]).exp_()
            dvg = torch.bmm(p.transpose(1, 2), do[s:e])
            ds = torch.bmm(do[s:e], vg.transpose(1, 2)).sub_(delta[s:e]).mul_(p)
            torch.bmm(ds, kg, out=dq[s:e]).mul_(ctx.scale)
            dkg = torch.bmm(ds.transpose(1, 2), q_scaled[s:e])  # the scale is already folded into q_scaled
            # index_add_ accumulates in index order on CPU, so gradients are deterministic there.
            dk.index_add_(0, idx.reshape(-1), dkg.view(-1, bk, D))
            dv.index_add_(0, idx.reshape(-1), dvg.view(-1, bk, D))
        return (dq.reshape(G, Tm, bq, D), dk.reshape(G, Tn, bk, D), dv.reshape(G, Tn, bk, D), None, None, None)


def _sum_of_block_states(states: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """``states (G*T_n, S)`` summed over the rows listed in ``flat_idx (R, n)`` -> ``(R, S)``."""
    if flat_idx.shape[1] == 0:
        return states.new_zeros(flat_idx.shape[0], states.shape[1])
    return F.embedding_bag(flat_idx, states, mode="sum")


def _marginal_lut(block_map: BlockMap) -> torch.Tensor:
    """``(B, H, T_m, n_marg)`` int64 marginal key blocks per row (ascending), derived from the class map."""
    is_marginal = (block_map.class_map == MARGINAL).to(torch.int8)
    order = torch.argsort(-is_marginal, dim=-1, stable=True)
    return order[..., : block_map.n_marginal]


def _linear_branch(phi_q, phi_k, v, block_map: BlockMap, linear_scope: str):
    """``o_l`` ``(G, T_m, bq, D)`` and its normaliser ``phi(q) . Z_i`` ``(G, T_m, bq, 1)`` from blocked
    ``phi_q (G, T_m, bq, D)``, ``phi_k, v (G, T_n, bk, D)`` (padded keys already zero in ``phi_k``)."""
    G, Tm, bq, D = phi_q.shape
    Tn = phi_k.shape[1]
    if linear_scope == "all":
        h_total = torch.einsum("gnkd,gnke->gde", phi_k, v)
        z_total = phi_k.sum(dim=(1, 2))
        num = torch.einsum("gmqd,gde->gmqe", phi_q, h_total)
        den = torch.einsum("gmqd,gd->gmq", phi_q, z_total)
    else:
        n_crit, n_negl = block_map.n_critical, block_map.n_negligible
        if linear_scope == "noncritical":
            excluded, n_scope = block_map.critical_lut, Tn - n_crit
        else:
            excluded = torch.cat([block_map.critical_lut, block_map.negligible_lut], dim=-1)
            n_scope = Tn - n_crit - n_negl
        if n_scope == 0:
            return phi_q.new_zeros(phi_q.shape), phi_q.new_zeros(phi_q.shape[:-1] + (1,))
        h = torch.einsum("gnkd,gnke->gnde", phi_k, v).reshape(G * Tn, D * D)
        z = phi_k.sum(dim=2).reshape(G * Tn, D)
        states = torch.cat([h, z], dim=1)
        base = (torch.arange(G, device=phi_q.device) * Tn)[:, None, None]
        if excluded.shape[-1] <= n_scope:
            # Pre-aggregation: total over all key blocks minus the (fewer) excluded ones.
            total = states.reshape(G, Tn, -1).sum(dim=1)
            idx = (excluded.reshape(G, Tm, -1).to(torch.int64) + base).reshape(G * Tm, -1)
            per_row = total.repeat_interleave(Tm, dim=0) - _sum_of_block_states(states, idx)
        else:
            if linear_scope == "noncritical":
                included = torch.cat([_marginal_lut(block_map), block_map.negligible_lut.to(torch.int64)], dim=-1)
            else:
                included = _marginal_lut(block_map)
            idx = (included.reshape(G, Tm, -1).to(torch.int64) + base).reshape(G * Tm, -1)
            per_row = _sum_of_block_states(states, idx)
        h_rows = per_row[:, : D * D].reshape(G, Tm, D, D)
        z_rows = per_row[:, D * D:].reshape(G, Tm, D)
        num = torch.einsum("gmqd,gmde->gmqe", phi_q, h_rows)
        den = torch.einsum("gmqd,gmd->gmq", phi_q, z_rows)
    # A zero normaliser (possible with relu) means phi(q) is zero on every key in scope: o_l is 0 there.
    return num / torch.where(den == 0, torch.ones_like(den), den)[..., None], den[..., None]


def torch_sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: BlockMap,
    *,
    feature_map: str = "softmax",
    linear_scope: str = "marginal",
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    scale: float | None = None,
    combine: str = "mass",
    mass_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLA for q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)`` with a given block map; differentiable in q, k,
    v, the projection and ``mass_offset``. Inputs are assumed validated (see ``sla.sparse_linear_attention``)."""
    # The path picks its own precision (compute_dtype); an enclosing autocast would hand bf16 operands to
    # matmuls writing into float32 buffers, so it is switched off inside.
    with torch.autocast(q.device.type, enabled=False):
        return _torch_sla(q, k, v, block_map, feature_map, linear_scope, proj_weight, proj_bias, scale, combine,
                          mass_offset)


def _torch_sla(q, k, v, block_map, feature_map, linear_scope, proj_weight, proj_bias, scale, combine, mass_offset):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # A block longer than its sequence is one block holding the whole sequence; sizing by the sequence keeps
    # memory proportional to it (block_q=10**6 must not pad to 10**6 rows).
    bq, bk = min(block_map.block_q, Lq), min(block_map.block_k, Lk)
    scale = D ** -0.5 if scale is None else float(scale)
    cdt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)

    q_b, k_b, v_b = _to_blocks(qc, bq), _to_blocks(kc, bk), _to_blocks(vc, bk)
    Tm = q_b.shape[1]
    lut = block_map.critical_lut.reshape(B * H, Tm, -1).to(torch.int64)
    bias = _key_bias(Lk, bk, cdt, q.device)
    o_s, lse = _BlockSparseAttention.apply(q_b, k_b, v_b, lut, None if Lk % bk == 0 else bias, scale)

    phi_q = _to_blocks(apply_feature_map(qc, feature_map), bq)
    phi_k = _to_blocks(apply_feature_map(kc, feature_map), bk)
    phi_k = phi_k * torch.isfinite(bias).to(cdt)[None, :, :, None]  # padded keys carry no weight
    o_l, den = _linear_branch(phi_q, phi_k, v_b, block_map, linear_scope)
    if proj_weight is not None:
        o_l = F.linear(o_l, proj_weight.to(cdt), None if proj_bias is None else proj_bias.to(cdt))

    def rows(x, width):  # per query block -> (B, H, Lq, width): rows in order, the padding dropped
        return x.reshape(B, H, Tm * bq, width)[:, :, :Lq]

    o_s, o_l = rows(o_s, D), rows(o_l, D)
    offset = None if mass_offset is None else mass_offset.to(cdt)
    # The rules are stated once, in naive.py (mass_weight, coarse_branch, pooled_weight).
    if combine == "mass":
        a = mass_weight(rows(lse, 1), rows(den, 1), D, offset)
        out = a * o_s + (1 - a) * o_l
    elif combine in POOLED_RULES:
        o_c, log_rest = coarse_branch(qc, kc, vc, block_map.class_map, bq, bk, scale, linear_scope,
                                      covariance=combine == "pooled_cov")
        a = pooled_weight(rows(lse, 1), log_rest, offset)
        out = a * o_s + (1 - a) * (o_c + o_l)
    else:
        out = o_s + o_l
    return out.to(q.dtype)


class TorchBackend(Backend):
    """``backend="torch"``: :func:`torch_sparse_linear_attention` with the PyTorch block map. Any device, dtype,
    head dim and block size; the default on CPU."""

    name = "torch"

    def attend(self, q, k, v, block_map, *, feature_map, linear_scope, proj_weight, proj_bias, scale, combine,
               mass_offset):
        return torch_sparse_linear_attention(q, k, v, block_map, feature_map=feature_map, linear_scope=linear_scope,
                                             proj_weight=proj_weight, proj_bias=proj_bias, scale=scale, combine=combine,
                                             mass_offset=mass_offset)


TORCH_BACKEND = TorchBackend()
