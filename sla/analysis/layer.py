"""Analyse one captured self-attention call: q, k, v of one layer at one denoising step.

:func:`analyze_attention` takes ``(H, L, D)`` tensors (one batch element, the sampled heads) and returns
a JSON-ready dict of every measurement plus the block class map for the pictures. Query rows are
sampled as whole query blocks, so the cost per head is O(R * L) with R = sampled rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..ops.sla.blockmap import (
    CRITICAL,
    NEGLIGIBLE,
    block_lengths,
    build_block_map,
    class_counts,
    in_linear_scope,
    mean_pool_blocks,
    pooled_block_scores,
    select_blocks,
)
from ..ops.sla.feature_maps import apply_feature_map
from ..ops.sla.naive import (
    block_covariances,
    coarse_attention,
    coarse_probabilities,
    expand_block_mask,
    mass_weight,
    pooled_weight,
)
from ..settings import POOLED_RULES, SLASettings
from . import metrics

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.92, 0.95, 0.97)


@dataclass
class AnalysisConfig:
    """What to measure and how much to sample.

    Attributes:
        sparsities: fractions of attention entries (token curves) or key blocks (block curves) left out of
            the exact computation; ``1 - critical`` is always added so the configured setting is measured.
        critical, negligible, block_q, block_k, feature_map, linear_scope: the SLA settings whose class map
            is drawn and whose linear branch is measured (the paper's defaults). When the analysed layer has
            SLA applied, its own settings and projection are used for the "own projection" curve.
        rank_top: the "top-x%" part for stable ranks: per row, this fraction of the largest weights (the
            paper's Fig. 3 uses 8%, the share of weights above 1/N in Wan2.1).
        query_blocks: query blocks sampled per call (``None`` = all); each gives ``block_q`` rows.
        seed: seed of the row sampling.
        token_tile: ``None`` (blocks over the model's raster token order) or ``(tf, th, tw)``: dense layers'
            captures are reordered tile by tile before blocking, as ``apply_sla(token_tile=...)`` does
            (:mod:`sla.ops.sla.tiles`); layers that already run SLA are captured in the order their SLA sees.
    """

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    critical: float = 0.05
    negligible: float = 0.10
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    rank_top: float = 0.08
    query_blocks: int | None = 8
    seed: int = 0
    token_tile: tuple | None = None

    def validate(self) -> None:
        from ..ops.sla.tiles import check_token_tile

        self.token_tile = check_token_tile(self.token_tile)
        SLASettings.of(self)  # raises on a bad SLA setting, naming it
        if not self.sparsities:
            raise ValueError("sparsities must name at least one value in [0, 1), e.g. 0.5,0.9,0.95")
        for s in self.sparsities:
            if not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ValueError(f"every sparsity must be a number in [0, 1), got {s!r}")
        if not 0.0 < self.rank_top < 1.0:
            raise ValueError(f"rank_top must be in (0, 1), e.g. 0.08 (the paper's top 8%), got {self.rank_top!r}")
        if self.query_blocks is not None and self.query_blocks < 1:
            raise ValueError(f"query_blocks must be >= 1 or None (all), got {self.query_blocks!r}")

    def measured_sparsities(self) -> list[float]:
        return sorted(set(round(float(s), 6) for s in self.sparsities) | {round(1.0 - self.critical, 6)})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsities"] = list(self.sparsities)
        return d


@dataclass
class OwnProjection:
    """The SLA settings and ``Proj`` parameters of a layer that already has SLA applied (fine-tuned)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    critical: float
    negligible: float
    block_q: int
    block_k: int
    feature_map: str
    linear_scope: str
    combine: str = "paper"
    # combine="mass" or "pooled": the offsets of the captured heads, in the order of the captured q, k, v (float32).
    mass_offset: torch.Tensor | None = None


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _topk_from_order(order: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the first ``keep`` columns of a per-row descending ``order`` ``(R, N)``."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    return mask.scatter_(-1, order[:, :keep], True)


def _class_rows(crit: torch.Tensor, negl: torch.Tensor, tn: int) -> torch.Tensor:
    """``(T_m, T_n)`` int8 class map from per-row critical and negligible block indices."""
    cm = torch.zeros(crit.shape[0], tn, dtype=torch.int8, device=crit.device)
    cm.scatter_(-1, crit, CRITICAL)
    cm.scatter_(-1, negl, NEGLIGIBLE)
    return cm


def _coarse_candidates(q, k, v, block_k, scale, finer):
    """Per-row key-block logits and mean values ``{name: (logits (R, T), v_means (T, D), keys per group)}`` of
    ``combine="pooled"``'s estimate and the candidates measured beside it, for one head's sampled rows ``q``
    ``(R, D)`` and its keys and values ``(N, D)``; they do not depend on the sparsity, so they are formed once.

    * ``"pooled"``: the rule's own logits ``scale q . mean(K_j) + log(n_j)``.
    * ``"spread"``: raised by the spread of each block's keys, ``scale^2 / 2 sum_d q_d^2 var(K_j)_d`` (the log of
      ``n_j E[exp(scale q.k)]`` for keys normal around their mean with a diagonal covariance; the plain mean is
      Jensen's lower bound).
    * ``finer``'s names (``(name, parts)``): over groups of ``block_k / parts`` keys (a finer coarse attention).
    """
    N = k.shape[0]

    def over_groups(group):
        log_n = torch.log(block_lengths(N, group, q.device).to(q.dtype))
        k_means = mean_pool_blocks(k, group)
        return (q @ k_means.T) * scale + log_n, k_means, mean_pool_blocks(v, group)

    pooled, k_means, v_means = over_groups(block_k)
    k_var = (mean_pool_blocks(k * k, block_k) - k_means * k_means).clamp_min(0)
    out = {"pooled": (pooled, v_means, block_k),
           "spread": (pooled + 0.5 * scale ** 2 * ((q * q) @ k_var.T), v_means, block_k)}
    for name, parts in finer:
        logits, _, v_g = over_groups(block_k // parts)
        out[name] = (logits, v_g, block_k // parts)
    return out


def _within_block_terms(logits, q, k, v, block_k, scale):
    """What the key-block means leave out, for one head's sampled rows (logits ``(R, N)``, q ``(R, D)``, k, v
    ``(N, D)``): ``block_lse`` ``(R, T)``, each block's exact log attention mass per row; ``v_exact`` ``(R, T, D)``,
    the exact softmax average of each block's values per row; ``u`` ``(R, T, D)``, the first-order correction of
    a block's mean value for the spread of its keys, ``scale q . C_j`` with ``C_j = mean((k - mean(K_j)) v^T)``
    (``exp(scale q.k) ~ exp(scale q.mean(K_j)) (1 + scale q.(k - mean(K_j)))`` over the block); and ``cov``
    ``(T, D, D)``, the ``C_j`` themselves."""
    R, N = logits.shape
    D = k.shape[1]
    T = -(-N // block_k)
    pad = T * block_k - N
    lg = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")).reshape(R, T, block_k)
    block_lse = torch.logsumexp(lg, dim=-1)
    w = torch.softmax(lg, dim=-1)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(T, block_k, D)
    v_exact = torch.einsum("rtj,tjd->rtd", w, v_blocks)
    cov = block_covariances(k, v, mean_pool_blocks(k, block_k), block_k)
    u = scale * torch.einsum("rd,tde->rte", q, cov)
    return {"block_lse": block_lse, "v_exact": v_exact, "u": u, "cov": cov}


def _scope(class_rows: torch.Tensor, linear_scope: str) -> torch.Tensor:
    return in_linear_scope(class_rows, linear_scope)


def _block_sparse(logits, v, critical_blocks, R, N, bq, bk):
    """SLA's sparse branch from precomputed logits: softmax over the tokens of the critical blocks only, and
    its log-sum-exp ``(R, 1)`` (what ``combine="mass"`` weighs it by)."""
    token_mask = expand_block_mask(critical_blocks, R, N, bq, bk)
    masked = logits.masked_fill(~token_mask, float("-inf"))
    return torch.softmax(masked, dim=-1) @ v, torch.logsumexp(masked, dim=-1, keepdim=True)


class _LinearBranch:
    """SLA's linear branch ``phi(q) H_i / (phi(q) . Z_i)`` for one head, from per-key-block states
    ``h_j = phi(K_j)^T V_j`` and ``z_j = sum phi(K_j)`` computed once and reused for every block set
    (O(T_m T_n D^2) per set instead of O(R N D))."""

    def __init__(self, q, k, v, feature_map, bq, bk):
        R, D = q.shape
        N = k.shape[0]
        tn, tm = -(-N // bk), -(-R // bq)
        phi_k = torch.nn.functional.pad(apply_feature_map(k, feature_map), (0, 0, 0, tn * bk - N))
        v_pad = torch.nn.functional.pad(v, (0, 0, 0, tn * bk - N))
        phi_k, v_pad = phi_k.reshape(tn, bk, D), v_pad.reshape(tn, bk, D)
        self.h = torch.einsum("jtd,jte->jde", phi_k, v_pad).reshape(tn, D * D)
        self.z = phi_k.sum(1)
        self.phi_q = torch.nn.functional.pad(apply_feature_map(q, feature_map), (0, 0, 0, tm * bq - R))
        self.phi_q = self.phi_q.reshape(tm, bq, D)
        self.R, self.D = R, D

    def __call__(self, scope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``o_l`` ``(R, D)`` and its normaliser ``phi(q) . Z`` ``(R, 1)``."""
        w = scope.to(self.h.dtype)
        H = (w @ self.h).reshape(-1, self.D, self.D)
        Z = w @ self.z
        num = torch.einsum("ibd,ide->ibe", self.phi_q, H)
        den = torch.einsum("ibd,id->ib", self.phi_q, Z)[..., None]
        out = num / torch.where(den == 0, torch.ones_like(den), den)  # nothing in scope -> 0, as the operator
        return out.reshape(-1, self.D)[: self.R], den.reshape(-1, 1)[: self.R]


@torch.no_grad()
def analyze_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: AnalysisConfig,
    *,
    scale: float | None = None,
    own_projection: OwnProjection | None = None,
    progress=None,
) -> tuple[dict, torch.Tensor]:
    """Measure SLA's premise on one attention call.

    Args:
        q: ``(H, Lq, D)`` queries after normalisation and RoPE (as the attention kernel sees them).
        k, v: ``(H, Lk, D)``.
        config: :class:`AnalysisConfig`.
        scale: softmax scale the layer uses (``None`` = ``D ** -0.5``).
        own_projection: the layer's own SLA settings and ``Proj``, if it has SLA applied.
        progress: optional tqdm-like object whose ``update(1)`` is called once per head.

    Returns:
        ``(result, class_map)``: ``result`` a JSON-ready dict (per-head values and head means) and
        ``class_map`` ``(H, T_m, T_n)`` int8 of the full sequence under the configured settings.

    Errors are relative L1 against dense softmax attention over the sampled rows. Block curves use the
    operator's own pooled classification (``sla.build_block_map``'s rule) and, as an upper bound, the
    oracle that picks the key blocks with the largest exact attention mass.
    """
    config.validate()
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"analyze_attention expects (H, L, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    H, Lq, D = q.shape
    N = k.shape[1]
    sla = own_projection
    # A layer with SLA applied is measured with its own block sizes, so its projection sees the blocks
    # it was trained with.
    bq, bk = (sla.block_q, sla.block_k) if sla else (config.block_q, config.block_k)
    gen = torch.Generator().manual_seed(config.seed)
    blocks = metrics.sample_query_blocks(Lq, bq, config.query_blocks, gen)
    q_sub = metrics.gather_query_blocks(q, blocks, bq)
    R = q_sub.shape[1]
    # Each row's sampled query block: the cross-fitted projection splits rows by whole blocks.
    groups = torch.arange(R) // bq
    sparsities = config.measured_sparsities()
    tn = -(-N // bk)

    lin_feature = sla.feature_map if sla else config.feature_map
    lin_scope = sla.linear_scope if sla else config.linear_scope
    negl_cfg = sla.negligible if sla else config.negligible

    klen = block_lengths(N, bk, q.device).to(dt)
    sm_scale = D ** -0.5 if scale is None else scale
    qlen_sub = block_lengths(R, bq, q.device).to(dt)
    per_head = []
    branches = {s: {"o_s": [], "o_l": [], "a_pooled": [], "o_pooled": [], "o_first_b": []} for s in sparsities}
    dense_all = []
    for h in range(H):
        logits = (q_sub[h] @ k[h].T) * sm_scale
        probs = torch.softmax(logits, dim=-1)
        dense = probs @ v[h]
        dense_all.append(dense)
        head = {"head_position": h}
        head["distribution"] = metrics.attention_distribution(probs)
        order = torch.argsort(probs, dim=-1, descending=True)  # one sort serves every top-x% mask
        top_mask = _topk_from_order(order, metrics.keep_count(1.0 - config.rank_top, N))
        head["stable_rank"] = {
            "full": metrics.stable_rank(probs),
            "top": metrics.stable_rank(probs * top_mask),
            "rest": metrics.stable_rank(probs * ~top_mask),
        }
        del top_mask

        tok_renorm, tok_masked = [], []
        for s in sparsities:
            kept = probs * _topk_from_order(order, metrics.keep_count(s, N))
            o_masked = kept @ v[h]
            tok_masked.append(metrics.relative_l1(o_masked, dense))
            tok_renorm.append(metrics.relative_l1(o_masked / kept.sum(-1, keepdim=True), dense))
            del kept
        del order
        head["token_topk_renormalised"] = tok_renorm
        head["token_topk_masked"] = tok_masked

        scores = pooled_block_scores(q_sub[h][None, None], k[h][None, None], bq, bk)[0, 0]
        mass = metrics.block_attention_mass(probs, bq, bk)
        del probs
        lse_all = torch.logsumexp(logits, dim=-1, keepdim=True)
        linear = _LinearBranch(q_sub[h], k[h], v[h], lin_feature, bq, bk)
        # The finer coarse attentions need groups that tile a key block: not measured (None) otherwise.
        finer = [(name, parts) for name, parts in (("mass_rule_pooled_half", 2), ("mass_rule_pooled_quarter", 4))
                 if bk % parts == 0]
        coarse = _coarse_candidates(q_sub[h], k[h], v[h], bk, sm_scale, finer)
        within = _within_block_terms(logits, q_sub[h], k[h], v[h], bk, sm_scale)
        n_groups = int(groups.max()) + 1
        group_rows = torch.bincount(groups, minlength=n_groups).to(dt)[:, None]

        def coarse_estimate(name, class_rows):
            """``(o_c, log_rest)`` of a candidate for this sparsity's classes (each key group in its block's)."""
            logits, v_means, group = coarse[name]
            cols = class_rows.repeat_interleave(bk // group, dim=-1)[..., :logits.shape[-1]]
            return coarse_attention(logits, v_means, cols, bq, lin_scope)

        curves = {name: [] for name in ("block_pooled_sparse_only", "block_oracle_sparse_only",
                                        "sla_identity_projection", "sla_mass_rule", "sla_own_projection",
                                        "mass_rule_true_a", "mass_rule_exact_rest", "mass_rule_true_a_exact_rest",
                                        "mass_estimate_error", "mass_rule_pooled_a", "mass_rule_pooled",
                                        "mass_rule_true_a_pooled_rest", "pooled_mass_estimate_error",
                                        "mass_rule_pooled_var", "pooled_var_mass_estimate_error",
                                        "mass_rule_pooled_half", "mass_rule_pooled_quarter",
                                        "pooled_exact_block_mass", "pooled_exact_block_values",
                                        "pooled_first_order", "pooled_first_order_block",
                                        "pooled_spread_first_order_block", "block_achieved_sparsity",
                                        "recall", "mass_pooled", "mass_oracle")}
        for s in sparsities:
            n_crit, n_negl = class_counts(1.0 - s, min(negl_cfg, s), tn)
            crit_p, negl_p = select_blocks(scores, n_crit, n_negl)
            crit_o, negl_o = select_blocks(mass, n_crit, n_negl)
            curves["recall"].append(metrics.critical_set_recall(crit_p, crit_o))
            curves["mass_pooled"].append(float(mass.gather(-1, crit_p).sum() / R))
            curves["mass_oracle"].append(float(mass.gather(-1, crit_o).sum() / R))
            attended = klen[crit_p].sum(-1)  # exact keys per query block
            curves["block_achieved_sparsity"].append(float(1.0 - (attended * qlen_sub).sum() / (R * N)))

            class_sub = _class_rows(crit_p, negl_p, tn)
            o_s, lse = _block_sparse(logits, v[h], class_sub == CRITICAL, R, N, bq, bk)
            o_l, den = linear(_scope(class_sub, lin_scope))
            branches[s]["o_s"].append(o_s)
            branches[s]["o_l"].append(o_l)
            curves["block_pooled_sparse_only"].append(metrics.relative_l1(o_s, dense))
            curves["sla_identity_projection"].append(metrics.relative_l1(o_s + o_l, dense))
            # combine="mass" as it starts (identity Proj, zero offsets): the mix by the estimated critical mass.
            a0 = mass_weight(lse, den, D, None)
            curves["sla_mass_rule"].append(metrics.relative_l1(a0 * o_s + (1 - a0) * o_l, dense))
            # Where the mass rule's error comes from: its two approximations replaced, one at a time, by the exact
            # quantity. a_true = the exact attention mass in the critical blocks (per row); o_rest = exact softmax
            # attention over the linear branch's blocks only (what o_l stands in for).
            a_true = torch.exp(lse - lse_all)
            o_rest = _block_sparse(logits, v[h], _scope(class_sub, lin_scope), R, N, bq, bk)[0]
            o_rest = torch.nan_to_num(o_rest)  # rows with no block in scope: nothing to add, as o_l = 0 there
            curves["mass_rule_true_a"].append(metrics.relative_l1(a_true * o_s + (1 - a_true) * o_l, dense))
            curves["mass_rule_exact_rest"].append(metrics.relative_l1(a0 * o_s + (1 - a0) * o_rest, dense))
            curves["mass_rule_true_a_exact_rest"].append(
                metrics.relative_l1(a_true * o_s + (1 - a_true) * o_rest, dense))
            curves["mass_estimate_error"].append(float((a0 - a_true).abs().mean()))
            # combine="pooled"'s estimates from the key blocks' means (each block as n_j keys at its mean key and
            # value), on the sampled rows: the rule's own coarse attention, sampled blocks standing as the query blocks.
            o_pooled, log_rest = coarse_estimate("pooled", class_sub)
            a_pooled = pooled_weight(lse, log_rest, None)
            curves["mass_rule_pooled_a"].append(metrics.relative_l1(a_pooled * o_s + (1 - a_pooled) * o_l, dense))
            curves["mass_rule_pooled"].append(
                metrics.relative_l1(a_pooled * o_s + (1 - a_pooled) * o_pooled, dense))
            curves["mass_rule_true_a_pooled_rest"].append(
                metrics.relative_l1(a_true * o_s + (1 - a_true) * o_pooled, dense))
            curves["pooled_mass_estimate_error"].append(float((a_pooled - a_true).abs().mean()))
            branches[s]["a_pooled"].append(a_pooled)
            branches[s]["o_pooled"].append(o_pooled)
            # The same with each block's logit corrected for the spread of its keys (second moment, diagonal).
            o_var, log_rest_var = coarse_estimate("spread", class_sub)
            a_var = pooled_weight(lse, log_rest_var, None)
            curves["mass_rule_pooled_var"].append(metrics.relative_l1(a_var * o_s + (1 - a_var) * o_var, dense))
            curves["pooled_var_mass_estimate_error"].append(float((a_var - a_true).abs().mean()))
            # What the block means leave out, one part at a time (the pooled rule's a unless said): each block's exact
            # mass per row with mean values (and the exact a that follows from it); pooled weights with each block's
            # exact softmax average of values; pooled weights with mean values corrected to first order for the
            # spread of the block's keys, per row and with the weights averaged over each query block (the form a
            # kernel could afford: one D x D state per query block, like the linear branch's).
            w_p = coarse_probabilities(coarse["pooled"][0], class_sub, bq, lin_scope)[0]
            w_x, log_rest_x = coarse_probabilities(within["block_lse"], class_sub, bq, lin_scope)
            a_x = pooled_weight(lse, log_rest_x, None)
            o_x = w_x @ coarse["pooled"][1]
            curves["pooled_exact_block_mass"].append(metrics.relative_l1(a_x * o_s + (1 - a_x) * o_x, dense))
            o_v = torch.einsum("rt,rtd->rd", w_p, within["v_exact"])
            curves["pooled_exact_block_values"].append(
                metrics.relative_l1(a_pooled * o_s + (1 - a_pooled) * o_v, dense))
            o_first = o_pooled + torch.einsum("rt,rtd->rd", w_p, within["u"])
            curves["pooled_first_order"].append(
                metrics.relative_l1(a_pooled * o_s + (1 - a_pooled) * o_first, dense))
            def first_order_block(weights):
                w_bar = torch.zeros(n_groups, tn, dtype=dt).index_add_(0, groups, weights) / group_rows
                state = torch.einsum("gt,tde->gde", w_bar, within["cov"])
                return sm_scale * torch.einsum("rd,rde->re", q_sub[h], state[groups])

            o_first_b = o_pooled + first_order_block(w_p)
            curves["pooled_first_order_block"].append(
                metrics.relative_l1(a_pooled * o_s + (1 - a_pooled) * o_first_b, dense))
            branches[s]["o_first_b"].append(o_first_b)
            # ... with the weights and a from the spread-raised logits ((a) above) as well.
            w_v = coarse_probabilities(coarse["spread"][0], class_sub, bq, lin_scope)[0]
            o_var_first = w_v @ coarse["spread"][1] + first_order_block(w_v)
            curves["pooled_spread_first_order_block"].append(
                metrics.relative_l1(a_var * o_s + (1 - a_var) * o_var_first, dense))
            # Finer coarse attention: key groups of half and a quarter of a block, each in its block's class.
            for name, _ in finer:
                o_g, log_rest_g = coarse_estimate(name, class_sub)
                a_g = pooled_weight(lse, log_rest_g, None)
                curves[name].append(metrics.relative_l1(a_g * o_s + (1 - a_g) * o_g, dense))
            if sla is not None:
                proj = torch.nn.functional.linear(o_l, sla.weight.to(o_l), None if sla.bias is None
                                                  else sla.bias.to(o_l))
                if sla.combine == "mass":
                    offset = None if sla.mass_offset is None else sla.mass_offset[h:h + 1].to(o_l)
                    a = mass_weight(lse, den, D, offset)
                    own = a * o_s + (1 - a) * proj
                elif sla.combine in POOLED_RULES:  # a and o_c: the key-block-mean estimates above
                    offset = None if sla.mass_offset is None else sla.mass_offset[h:h + 1].to(o_l)
                    a = pooled_weight(lse[None, None], log_rest[None, None], offset)[0, 0]
                    own = a * o_s + (1 - a) * ((o_first_b if sla.combine == "pooled_cov" else o_pooled) + proj)
                else:
                    own = o_s + proj
                curves["sla_own_projection"].append(metrics.relative_l1(own, dense))
            oracle_crit = _class_rows(crit_o, negl_o, tn) == CRITICAL
            curves["block_oracle_sparse_only"].append(
                metrics.relative_l1(_block_sparse(logits, v[h], oracle_crit, R, N, bq, bk)[0], dense))
        del logits
        if sla is None:
            curves["sla_own_projection"] = None
        for name in ("mass_rule_pooled_half", "mass_rule_pooled_quarter"):
            if name not in dict(finer):
                curves[name] = None
        head.update(curves)
        per_head.append(head)
        if progress is not None:
            progress.update(1)

    # A least-squares Proj shared by the heads: how far a trained projection could take SLA from
    # sparse-only at each sparsity on this layer, measured out of sample (two folds of query blocks).
    lsq_available = int(groups.max()) >= 1
    dense_stack = torch.stack(dense_all)
    for s in sparsities:
        o_s = torch.stack(branches[s]["o_s"])
        o_l = torch.stack(branches[s]["o_l"])
        if lsq_available:
            pred = metrics.fit_shared_projection(o_l, dense_stack - o_s, groups)
            for h in range(H):
                per_head[h].setdefault("sla_lstsq_projection", []).append(
                    metrics.relative_l1(o_s[h] + pred[h], dense_stack[h]))
            # The pooled rule, untrained (zero Proj, zero offsets), plus the best least-squares correction from the
            # linear branch: what a trained Proj could add to it, fitted to (dense - a o_s - (1 - a) o_c) from
            # (1 - a) o_l (its bias enters unscaled, one D-vector more freedom than the rule's (1 - a) b).
            a_p = torch.stack(branches[s]["a_pooled"])
            pooled = a_p * o_s + (1 - a_p) * torch.stack(branches[s]["o_pooled"])
            pred = metrics.fit_shared_projection((1 - a_p) * o_l, dense_stack - pooled, groups)
            for h in range(H):
                per_head[h].setdefault("pooled_lstsq_projection", []).append(
                    metrics.relative_l1(pooled[h] + pred[h], dense_stack[h]))
            # The same on top of the pooled rule with the first-order state per query block.
            first = a_p * o_s + (1 - a_p) * torch.stack(branches[s]["o_first_b"])
            pred = metrics.fit_shared_projection((1 - a_p) * o_l, dense_stack - first, groups)
            for h in range(H):
                per_head[h].setdefault("pooled_first_order_block_lstsq", []).append(
                    metrics.relative_l1(first[h] + pred[h], dense_stack[h]))
        else:
            for h in range(H):
                per_head[h]["sla_lstsq_projection"] = None
                per_head[h]["pooled_lstsq_projection"] = None
                per_head[h]["pooled_first_order_block_lstsq"] = None

    class_map = build_block_map(q[None], k[None], critical=config.critical, negligible=config.negligible,
                                block_q=bq, block_k=bk).class_map[0]

    def head_mean(getter):
        return _mean([getter(ph) for ph in per_head])

    def curve_mean(name):
        if per_head[0][name] is None:
            return None
        return [head_mean(lambda ph, i=i: ph[name][i]) for i in range(len(sparsities))]

    n_crit_cfg, n_negl_cfg = class_counts(config.critical, config.negligible, tn)
    cfg_index = sparsities.index(round(1.0 - config.critical, 6))
    result = {
        "seq_len_q": Lq,
        "seq_len_k": N,
        "head_dim": D,
        "num_heads_analysed": H,
        "query_rows": R,
        "query_blocks": blocks.tolist(),
        "distribution": {
            "frac_above_mean": head_mean(lambda ph: ph["distribution"]["frac_above_mean"]),
            "frac_below_mean_over_100": head_mean(lambda ph: ph["distribution"]["frac_below_mean_over_100"]),
            "mass_above_mean": head_mean(lambda ph: ph["distribution"]["mass_above_mean"]),
            "histogram": {
                "edges": per_head[0]["distribution"]["histogram"]["edges"],
                "counts": [sum(c) for c in zip(*[ph["distribution"]["histogram"]["counts"] for ph in per_head])],
            },
        },
        "stable_rank": {
            "top_fraction": config.rank_top,
            "full": head_mean(lambda ph: ph["stable_rank"]["full"]),
            "top": head_mean(lambda ph: ph["stable_rank"]["top"]),
            "rest": head_mean(lambda ph: ph["stable_rank"]["rest"]),
        },
        "errors": {
            "sparsity": sparsities,
            "block_achieved_sparsity": curve_mean("block_achieved_sparsity"),
            "token_topk_renormalised": curve_mean("token_topk_renormalised"),
            "token_topk_masked": curve_mean("token_topk_masked"),
            "block_pooled_sparse_only": curve_mean("block_pooled_sparse_only"),
            "block_oracle_sparse_only": curve_mean("block_oracle_sparse_only"),
            "sla_identity_projection": curve_mean("sla_identity_projection"),
            "sla_mass_rule": curve_mean("sla_mass_rule"),
            "mass_rule_true_a": curve_mean("mass_rule_true_a"),
            "mass_rule_exact_rest": curve_mean("mass_rule_exact_rest"),
            "mass_rule_true_a_exact_rest": curve_mean("mass_rule_true_a_exact_rest"),
            "mass_estimate_error": curve_mean("mass_estimate_error"),
            "mass_rule_pooled_a": curve_mean("mass_rule_pooled_a"),
            "mass_rule_pooled": curve_mean("mass_rule_pooled"),
            "mass_rule_true_a_pooled_rest": curve_mean("mass_rule_true_a_pooled_rest"),
            "pooled_mass_estimate_error": curve_mean("pooled_mass_estimate_error"),
            "mass_rule_pooled_var": curve_mean("mass_rule_pooled_var"),
            "pooled_var_mass_estimate_error": curve_mean("pooled_var_mass_estimate_error"),
            "mass_rule_pooled_half": curve_mean("mass_rule_pooled_half"),
            "mass_rule_pooled_quarter": curve_mean("mass_rule_pooled_quarter"),
            "pooled_exact_block_mass": curve_mean("pooled_exact_block_mass"),
            "pooled_exact_block_values": curve_mean("pooled_exact_block_values"),
            "pooled_first_order": curve_mean("pooled_first_order"),
            "pooled_first_order_block": curve_mean("pooled_first_order_block"),
            "pooled_spread_first_order_block": curve_mean("pooled_spread_first_order_block"),
            "pooled_first_order_block_lstsq": curve_mean("pooled_first_order_block_lstsq"),
            "sla_lstsq_projection": curve_mean("sla_lstsq_projection"),
            "pooled_lstsq_projection": curve_mean("pooled_lstsq_projection"),
            "sla_own_projection": curve_mean("sla_own_projection"),
        },
        "recall": {
            "sparsity": sparsities,
            "recall": curve_mean("recall"),
            "mass_pooled": curve_mean("mass_pooled"),
            "mass_oracle": curve_mean("mass_oracle"),
            "at_critical": {"critical": config.critical, "n_critical_blocks": n_crit_cfg,
                            "recall": curve_mean("recall")[cfg_index],
                            "mass_pooled": curve_mean("mass_pooled")[cfg_index],
                            "mass_oracle": curve_mean("mass_oracle")[cfg_index]},
        },
        "block_classes": {"num_query_blocks": int(class_map.shape[1]), "num_key_blocks": tn,
                          "n_critical": n_crit_cfg, "n_negligible": n_negl_cfg,
                          "n_marginal": tn - n_crit_cfg - n_negl_cfg},
        "linear_branch": {"feature_map": lin_feature, "linear_scope": lin_scope, "negligible": negl_cfg,
                          "own_projection": sla is not None},
        "per_head": per_head,
    }
    return result, class_map
