"""Ulysses context (sequence) parallelism for SLA in diffusers Wan models, on diffusers' own machinery.

How diffusers does context parallelism (0.36+; ``ContextParallelConfig``, ``model.enable_parallelism``): the model
class declares a ``_cp_plan``, and hooks from it split the token sequence across the ranks of a context-parallel
group before the first transformer block (``blocks.0``'s ``hidden_states`` and the RoPE tables, along the token
dimension) and all-gather the output after ``proj_out``. Between the two, every per-token layer (norms, FFN,
cross-attention to the full text) runs on the rank's own tokens. Self-attention is the one layer that needs every
token: diffusers sets ``processor._parallel_config`` on each attention processor, and its attention dispatcher then
runs Ulysses (an all-to-all from sequence shards to head shards, attention, and back) or ring attention for the
backends that support it.

SLA's processor does not go through that dispatcher (SLA is not one of its backends, and it owns parameters), so
before this module existed it refused a ``_parallel_config``. It now plugs into the same machinery: the hooks of
``_cp_plan`` split and gather exactly as for dense attention, and the SLA processor does the Ulysses exchange
itself around ``attn.sla`` (:func:`sequence_to_heads`, :func:`heads_to_sequence`), over the Ulysses process group
of the model's ``ContextParallelConfig``. SLA then sees every token of its heads, so its block scores, classes and
both branches are exactly those of one process; each rank computes ``H / N`` heads. Ring attention is refused
(SLA ranks each query block against *all* key blocks before attending, which a ring that streams key/value
chunks cannot provide), and so is ``ulysses_anything`` (uneven shards): errors say what to use instead.

Who sets the configuration: :func:`enable_context_parallel` (what ``sla finetune/sample --context-parallel N`` use)
or the user's own ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``; the processors read
it the same way. :func:`enable_context_parallel` does what ``enable_parallelism`` does for a context-parallel
config, on a mesh given by the caller (so that it can be the context-parallel part of a data x context mesh), and
without ``enable_parallelism``'s device lookup, which divides by the accelerator count and so fails on a machine
without one (diffusers 0.42.1: ``ZeroDivisionError`` on CPU; gloo on CPU is how the tests run it).

Layouts: diffusers' processors hold q, k, v as ``(B, L_local, H, D)`` (tokens of this rank, all heads); SLA takes
``(B, H, L, D)``. :func:`sequence_to_heads` turns the first into ``(B, H / N, L, D)`` holding heads ``r H/N ..
(r+1) H/N - 1`` of rank ``r`` with the tokens of every rank in rank order (the order of the split), and
:func:`heads_to_sequence` is its inverse. Gradients flow through both (the backward of an all-to-all is the
reverse all-to-all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FLAG = "--context-parallel"


class _AllToAll(torch.autograd.Function):
    """``out[j] = x[rank]`` of rank ``j``: slot ``j`` of the first dimension goes to rank ``j`` of ``group``, and slot
    ``j`` of the result came from rank ``j``. Its own transpose, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def sequence_to_heads(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """``[(B, L_local, H, D)]`` sequence shards -> ``[(B, H / N, N * L_local, D)]`` head shards (one all-to-all for
    all of them; ``N`` = size of ``group``, this rank ``r`` keeps heads ``r H/N .. (r+1) H/N - 1``)."""
    n = dist.get_world_size(group)
    b, l_local, h, d = tensors[0].shape
    if h % n:
        raise ValueError(f"{h} attention heads cannot be split over {n} context-parallel ranks; use a context-parallel "
                         f"degree ({FLAG}) that divides {h}")
    if len({t.dtype for t in tensors}) > 1:  # under autocast q/k (after the norms) and v may differ: keep each dtype
        return [sequence_to_heads([t], group)[0] for t in tensors]
    x = torch.stack(tensors)  # (T, B, L_local, H, D)
    x = x.unflatten(3, (n, h // n))  # (T, B, L_local, N, H/N, D): head group j is for rank j
    x = _AllToAll.apply(x.permute(3, 0, 1, 2, 4, 5), group)  # (N, T, B, L_local, H/N, D): slot j = tokens of rank j
    x = x.permute(1, 2, 4, 0, 3, 5).flatten(3, 4)  # (T, B, H/N, N * L_local, D)
    return list(x.unbind(0))


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads` for one tensor: ``(B, H / N, L, D)`` -> ``(B, L / N, H, D)``."""
    n = dist.get_world_size(group)
    b, h_local, length, d = x.shape
    x = x.unflatten(2, (n, length // n))  # (B, H/N, N, L_local, D): token block j belongs to rank j
    x = _AllToAll.apply(x.permute(2, 0, 3, 1, 4), group)  # (N, B, L_local, H/N, D): slot j = heads of rank j
    return x.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (B, L_local, H, D)


def ulysses_group(parallel_config, where: str):
    """The Ulysses process group of a diffusers ``ParallelConfig`` (what ``processor._parallel_config`` holds), or
    ``None`` when it asks for no context parallelism. Raises ``NotImplementedError`` for what SLA cannot run."""
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:  # tensor parallelism only: diffusers leaves attention to each rank's own heads
        return None
    if cp.ring_degree > 1:
        raise NotImplementedError(
            f"{where}: ring attention (ContextParallelConfig(ring_degree={cp.ring_degree})) cannot host SLA, which "
            f"ranks each query block against every key block before attending; use Ulysses: "
            f"ContextParallelConfig(ulysses_degree=N) (sla finetune/sample {FLAG} N)")
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError(
            f"{where}: ContextParallelConfig(ulysses_anything=True) splits tokens and heads unevenly, which SLA's "
            f"Ulysses exchange does not do; use ulysses_anything=False with a token count and a head count that "
            f"ulysses_degree={cp.ulysses_degree} divides")
    if cp.ulysses_degree <= 1:
        return None
    mesh = cp._ulysses_mesh
    if mesh is None:
        raise ValueError(f"{where}: the ContextParallelConfig was never set up (no Ulysses mesh); enable it with "
                         "model.enable_parallelism(config=...) or sla.integrations.context_parallel."
                         "enable_context_parallel(model, mesh)")
    return mesh.get_group()


def check_divisible(*, heads: int, tokens: int, degree: int, what: str = "the model") -> None:
    """Refuse a context-parallel degree that does not divide the head count or the token count, naming the flag."""
    if degree < 1:
        raise ValueError(f"{FLAG} must be >= 1, got {degree}")
    if heads % degree:
        ok = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ValueError(f"{FLAG} {degree}: {what} has {heads} attention heads, which Ulysses splits evenly over "
                         f"the ranks of a context-parallel group; use a degree that divides {heads}: {ok}")
    if tokens % degree:
        raise ValueError(f"{FLAG} {degree}: a clip of {what} has {tokens} tokens, which do not split evenly over "
                         f"{degree} ranks; use a degree that divides {tokens}, or a clip size (frames, height, width) "
                         f"whose token count it divides")


def parallel_mesh(context_parallel: int, device_type: str):
    """The ``(dp, ring, ulysses)`` device mesh of all ranks: ``world / N`` data-parallel groups of ``N``
    context-parallel ranks each (``ring`` has size 1; diffusers' ``ContextParallelConfig`` wants both dimensions).

    Rank ``r`` is in data-parallel group ``r // N`` at context-parallel position ``r % N``: the ranks of one
    context-parallel group are consecutive, so with ``N`` at most the GPUs per node (torchrun numbers the ranks of
    a node consecutively) the all-to-alls stay inside a node."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % context_parallel:
        raise ValueError(f"{FLAG} {context_parallel} does not divide the {world} processes; launch a multiple of "
                         f"{context_parallel} processes (torchrun --nproc_per_node ...), or change {FLAG}")
    return init_device_mesh(device_type, (world // context_parallel, 1, context_parallel),
                            mesh_dim_names=("dp", "ring", "ulysses"))


def enable_context_parallel(model, mesh, device) -> None:
    """Ulysses context parallelism for ``model`` (a diffusers transformer with a ``_cp_plan``, such as Wan), over
    the ``ring`` (size 1) and ``ulysses`` dimensions of ``mesh`` (see :func:`parallel_mesh`); in place.

    Does for the model what ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N, mesh=mesh))``
    does (see the module docstring for why not that call itself): record the config on the model and on every
    attention processor, and install the split/gather hooks of the model's ``_cp_plan``. Dense processors (cross-
    attention, dense layers, ``sla_disabled``) then run diffusers' own Ulysses through its dispatcher; SLA layers
    run SLA's exchange (see :class:`~sla.integrations.diffusers.WanSLAAttnProcessor`). Call it after
    :func:`sla.apply_sla` and before FSDP's ``fully_shard``.
    """
    try:
        from diffusers import ContextParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel
        from diffusers.models._modeling_parallel import ParallelConfig
    except ImportError as err:  # pragma: no cover - depends on the installed diffusers
        raise ImportError(f"{FLAG} needs diffusers' context parallelism (diffusers >= 0.36): pip install -U "
                          "diffusers") from err
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    plan = getattr(model, "_cp_plan", None)
    if plan is None:
        raise ValueError(f"{FLAG}: {type(model).__name__} has no context-parallel plan (_cp_plan) in diffusers; "
                         "context parallelism runs Wan transformers")
    if getattr(model, "_parallel_config", None) is not None:
        raise ValueError(f"{type(model).__name__} already has a parallel config (enable_parallelism was called); "
                         "enable context parallelism once")
    degree = mesh["ulysses"].size()
    cp = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device(device), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        if isinstance(module, (Attention, AttentionModuleMixin)):
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = config
    apply_context_parallel(model, cp, plan)
