"""SLA's settings as one frozen object, and the option lists every layer of the library checks against.

:class:`SLASettings` holds what decides SLA's output for given inputs and parameters: the block classification
(``critical``, ``negligible``, ``block_q``, ``block_k``), the linear branch (``feature_map``, ``linear_scope``)
and the combination of the branches (``combine``); ``docs/semantics.md`` says what each means. It is checked once,
when it is made, and passed on whole: from the module (:class:`sla.SparseLinearAttention`) to the operator, from
:func:`sla.apply_sla` to each layer, from the training and analysis configs (whose flat fields, read from files
and flags, are turned into one with :meth:`SLASettings.of`). A new setting is added here, once.

Run-time choices that do not change the result (``backend``) and integration choices (``token_tile``, dense
layers) live with whatever makes them, not here. No torch import: configs and the CLI read this module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("marginal", "noncritical", "all")
# How the two branches are combined: "paper" = o_s + Proj(o_l) (arXiv 2509.24006, Eq. 6); "mass" =
# a * o_s + (1 - a) * Proj(o_l) with a the estimated share of the attention mass in the critical blocks;
# "pooled" = a * o_s + (1 - a) * (o_c + Proj(o_l)) with a and the coarse attention o_c from the key blocks' means
# (docs/semantics.md); "pooled_cov" (experimental) = "pooled" with each mean value corrected to
# first order for the spread of its block's keys, one D x D state per query block.
COMBINE_RULES = ("paper", "mass", "pooled", "pooled_cov")
# The rules that mix the branches by a per-row weight a, with a learnable per-head offset ``mass_offset``.
MIXING_RULES = ("mass", "pooled", "pooled_cov")
# The rules with the coarse branch over the key blocks' means (o_c, log_rest).
POOLED_RULES = ("pooled", "pooled_cov")
# combine="auto" (sla.apply_sla, sla finetune; not the operator or the module, which know no token order): the rule
# the experiments support for the model's blocks. With 3D token tiles "pooled_cov", the only rule that closed half
# of the sparse-only-to-full gap (wan8k, docs/results.md, fourth experiment and its backend control); without them
# "mass", since the pooled rules were measured with tiles only.
COMBINE_AUTO = "auto"
# Implementations: "auto" picks by device (sla.ops.sla.interface.resolve_backend); the others are the names in
# the interface's BACKENDS table (a test keeps the two lists equal).
BACKEND_NAMES = ("auto", "torch", "triton", "reference")


def check_sla_config(critical, negligible, block_q, block_k, feature_map, linear_scope) -> None:
    """Check SLA hyperparameters; raise ``TypeError``/``ValueError`` naming the argument and the fix."""
    for name, val in (("critical", critical), ("negligible", negligible)):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{name} must be a float fraction of key blocks in [0, 1], got {val!r}")
        if not 0.0 <= float(val) <= 1.0:
            raise ValueError(f"{name}={val} is outside [0, 1]; it is a fraction of key blocks (0.05 means 5%)")
    if float(critical) + float(negligible) > 1.0 + 1e-12:
        raise ValueError(
            f"critical + negligible = {critical} + {negligible} > 1; lower one of them so that every key block "
            f"gets exactly one class"
        )
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int number of tokens per block, got {val!r}")
        if val < 1:
            raise ValueError(f"{name}={val} must be >= 1 (tokens per block; the paper uses 64)")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is unknown; choose one of {FEATURE_MAPS}")
    if linear_scope not in LINEAR_SCOPES:
        raise ValueError(
            f"linear_scope={linear_scope!r} is unknown; choose one of {LINEAR_SCOPES} "
            f"('marginal' is the paper, 'noncritical' the public SLA-1 code, 'all' the public main branch)"
        )


def check_combine_rule(combine) -> None:
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine={combine!r} is unknown; choose one of {COMBINE_RULES} ('paper' = o_s + Proj(o_l) "
                         f"as in the paper, 'mass' = a * o_s + (1 - a) * Proj(o_l) with a the critical blocks' "
                         f"estimated attention mass, 'pooled' = the same with a and a coarse attention over the key "
                         f"blocks' means, 'pooled_cov' = 'pooled' with the blocks' key-value covariance added)")


def resolve_combine(combine, token_tile) -> str:
    """The rule that ``combine`` names for a model whose blocks are ``token_tile`` (``None``: raster order):
    ``"auto"`` is ``"pooled_cov"`` with tiles and ``"mass"`` without (:data:`COMBINE_AUTO`); any other value is
    returned as it is once checked."""
    if combine == COMBINE_AUTO:
        return "mass" if token_tile is None else "pooled_cov"
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine={combine!r} is unknown; choose 'auto' (the default: 'pooled_cov' with token tiles, "
                         f"'mass' without) or one of {COMBINE_RULES}")
    return combine


def check_backend_name(backend) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKEND_NAMES}")


@dataclass(frozen=True)
class SLASettings:
    """The settings that define SLA's output (defaults: the paper's, with this library's ``combine="mass"``).

    Attributes:
        critical: fraction of key blocks per query-block row computed exactly, in [0, 1].
        negligible: fraction of lowest-scoring key blocks skipped, in [0, 1]; ``critical + negligible <= 1``.
        block_q, block_k: tokens per query and key block (positive ints; the GPU kernels and the diffusers
            integration take 16, 32, 64 or 128).
        feature_map: ``phi`` of the linear branch, one of :data:`FEATURE_MAPS`.
        linear_scope: key blocks the linear branch covers, one of :data:`LINEAR_SCOPES`.
        combine: how the branches are combined, one of :data:`COMBINE_RULES`.

    Made and checked once; ``replace(**changes)`` gives a checked copy with some fields changed.
    """

    critical: float = 0.05
    negligible: float = 0.10
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    linear_scope: str = "marginal"
    combine: str = "mass"

    def __post_init__(self):
        check_sla_config(self.critical, self.negligible, self.block_q, self.block_k, self.feature_map,
                         self.linear_scope)
        check_combine_rule(self.combine)
        # Fractions given as ints (critical=1) are stored as floats so that equal settings compare equal.
        object.__setattr__(self, "critical", float(self.critical))
        object.__setattr__(self, "negligible", float(self.negligible))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return _NAMES

    @classmethod
    def of(cls, obj, **changes) -> "SLASettings":
        """The settings held by ``obj``'s attributes of the same names (a flat config such as
        :class:`sla.training.config.FinetuneConfig`), or by ``obj``'s keys when it is a dict; ``changes`` override
        them. Fields ``obj`` lacks keep their defaults."""
        get = obj.get if isinstance(obj, dict) else (lambda name, default: getattr(obj, name, default))
        defaults = cls()
        values = {name: get(name, getattr(defaults, name)) for name in cls.names()}
        return cls(**{**values, **changes})

    def replace(self, **changes) -> "SLASettings":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """``{field: value}``; also the keyword arguments of :func:`sla.sparse_linear_attention`,
        :class:`sla.SparseLinearAttention` and :func:`sla.apply_sla` for these settings."""
        # Read on every forward of every SLA layer: a plain comprehension (dataclasses.asdict deep-copies each
        # value, ~10x slower, for fields that are all immutable scalars and strings).
        return {name: getattr(self, name) for name in _NAMES}


_NAMES = tuple(f.name for f in fields(SLASettings))
