"""Several processes for ``sla finetune``: data parallel (DDP or FSDP2) x context parallel (Ulysses).

Layout. ``W`` processes (torchrun, any number of nodes) with context-parallel degree ``N`` (``--context-parallel``)
form ``W / N`` data-parallel groups of ``N`` consecutive ranks: rank ``r`` has data-parallel rank ``r // N`` and
context-parallel rank ``r % N`` (:func:`sla.integrations.context_parallel.parallel_mesh`, a ``(dp, ring, ulysses)``
device mesh with ``ring`` of size 1). The ``N`` ranks of a group load the same clips and draw the same noise (the
training stream is indexed by data-parallel rank), each runs the model on its ``1 / N`` of every clip's tokens, and
the hooks of diffusers' context-parallel plan gather the output, so every rank of the group computes the same loss.

Gradients. A rank's backward yields the part of the gradient that comes from its own tokens (from its own heads
inside attention); the true gradient of the group's loss is the *sum* over its ``N`` ranks. DDP and FSDP average
over all ``W`` ranks, which gives ``1 / N`` of the data-parallel mean, so each rank back-propagates ``N`` times its
loss: the update is then the mean over the global batch, whatever ``W`` and ``N`` are.

FSDP2 (``--fsdp``). ``fully_shard`` over all ``W`` ranks (one flat dimension: context-parallel ranks hold the same
parameters, so they shard them too): one unit per transformer block, then the root. With ``--bf16`` the units
compute with bf16 parameters (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: bf16
all-gathers, float32 gradient reduction) while the sharded master weights and the optimizer stay float32; the
activations follow ``torch.autocast`` as without FSDP (``cast_forward_inputs=False``: the timestep in particular
stays float32). Autocast already runs every matrix product in bf16, so bf16 parameters change only what uses a
parameter outside one (norm weights, Wan's ``scale_shift_table``, which are then rounded to bf16). SLA's
parameters are kept out of that: each ``attn1.sla`` (the projection, and the per-head mass offsets, which are added
to log-sum-exps, where bf16's 8-bit mantissa would round an offset of 0.01 away at a log-mass of 10) is a unit of
its own with float32 parameters, because FSDP2 gives each unit one compute dtype.

Loading with FSDP. Every rank builds the model on the ``meta`` device (no memory), shards it, and allocates only
its shards; rank 0 alone loads the weights on the CPU and broadcasts them shard by shard
(``set_model_state_dict(..., broadcast_from_rank0=True)``), so a node holds one CPU copy of the model however many
ranks it runs. Buffers outside the state dict (Wan's RoPE tables) are broadcast from rank 0 too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Layout:
    """Where this process sits. ``mesh`` is the ``(dp, ring, ulysses)`` mesh (``None`` on one process without
    FSDP); ``shard_mesh`` the flat mesh of all ranks that FSDP shards over (``None`` without FSDP)."""

    world: int
    rank: int
    device: torch.device
    fsdp: bool
    cp: int
    mesh: object = None
    shard_mesh: object = None

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_layout(world: int, rank: int, device: torch.device, fsdp: bool, context_parallel: int) -> Layout:
    """The layout of this run; call after the process group exists (when ``world > 1``, ``fsdp`` or
    ``context_parallel > 1``)."""
    layout = Layout(world=world, rank=rank, device=device, fsdp=fsdp, cp=context_parallel)
    if context_parallel > 1 or fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from ..integrations.context_parallel import parallel_mesh

        layout.mesh = parallel_mesh(context_parallel, device.type)
        if fsdp:
            layout.shard_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return layout


def init_single_process_group(device: torch.device) -> None:
    """A process group of one rank (FSDP and DeviceMesh need one even then), without torchrun's environment."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def shard_model(model, layout: Layout, bf16: bool) -> None:
    """``fully_shard`` ``model`` (a diffusers Wan transformer, possibly with SLA) in place; see the module docstring.

    Inner units first, as FSDP2 requires: each block's ``attn1.sla`` (with ``bf16``), each block, the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = layout.shard_mesh
    main = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"--fsdp shards a Wan transformer block by block, but {type(model).__name__} has no .blocks")
    for block in blocks:
        if bf16:
            for name, sub in block.named_modules():
                if name.endswith(".sla") and any(True for _ in sub.parameters()):
                    fully_shard(sub, mesh=mesh, mp_policy=fp32)
        fully_shard(block, mesh=mesh, mp_policy=main)
    fully_shard(model, mesh=mesh, mp_policy=main)


def materialize_from_rank0(model, layout: Layout, full_state: dict | None, cpu_model=None) -> None:
    """Allocate the shards of a model sharded on the ``meta`` device and fill them with rank 0's ``full_state``
    (a full CPU state dict on rank 0, ignored elsewhere); buffers that are not in the state dict (non-persistent,
    such as Wan's RoPE tables) come from rank 0's ``cpu_model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=layout.device)
    set_model_state_dict(model, full_state if layout.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    in_state = set(model.state_dict().keys())
    cpu_buffers = dict(cpu_model.named_buffers()) if layout.is_main else {}
    for name, buf in model.named_buffers():
        if name in in_state:
            continue
        if layout.is_main:
            buf.copy_(cpu_buffers[name].to(buf.device))
        dist.broadcast(buf, src=0)


def gather_full_state_dict(model) -> dict:
    """The full (unsharded) state dict on CPU on rank 0, ``{}`` elsewhere; a collective (call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_value(t) -> torch.Tensor:
    """A DTensor's full value (a collective), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
