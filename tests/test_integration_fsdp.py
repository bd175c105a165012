"""SLA-patched diffusers Wan under PyTorch FSDP2 (``fully_shard``): two CPU processes (gloo) against one process.

One ``torch.distributed.run`` launch (2 ranks, gloo, CPU) runs every sharded scenario and writes what it saw to a
folder; the tests here compute the unsharded single-process references and compare:

* fp32, ``fully_shard`` on every transformer block and on the root: forward outputs, full gradients and the full
  state dict after one AdamW step match one process running the whole global batch (each rank runs half of it),
  the ``...attn1.sla.proj.weight/bias`` included; those are DTensors sharded by FSDP and have moved from zero.
* bf16 with the default ``keep_proj_fp32=True``: sharding the block as one unit fails on FSDP2's rule that the
  trainable parameters of one ``fully_shard`` unit share one dtype; giving each ``attn1.sla`` its own unit works,
  and so does keeping the model in fp32 with ``MixedPrecisionPolicy(param_dtype=bf16)`` (the usual FSDP2 recipe).

SLA runs on the PyTorch backend with 16-token blocks: 192 tokens per clip make 12 key blocks, of which 3 are
critical (exact), 3 negligible (skipped) and 6 marginal (linear branch), so the layer really is sparse.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("diffusers")

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
# The paper's rule: these tests are about how FSDP shards SLA's projections (combine="mass" adds one more small
# per-layer parameter of the same kind, the per-head mass offsets, covered by the single-process tests).
SLA_SETTINGS = dict(critical=0.25, negligible=0.25, block_q=16, block_k=16, backend="torch", combine="paper")
GLOBAL_BATCH = 4  # 2 clips per rank
WORLD_SIZE = 2
LR = 1e-3
# Adam's first step moves each weight by about lr * sign(grad): a gradient entry near 0 whose sign differs between the
# sharded and the one-process reduction (summation order) would move its weight by 2 * lr. A large eps makes the step
# ~ lr * grad / eps, continuous in the gradient, so the states can be compared at gradient precision.
ADAM_EPS = 1.0
SLA_PARAMS = [f"blocks.{i}.attn1.sla.proj.{p}" for i in range(WAN["num_layers"]) for p in ("weight", "bias")]


def build_model(dtype=torch.float32, keep_proj_fp32=True):
    """The same tiny random Wan2.1-style model with SLA in every rank and in the reference (seeded)."""
    from diffusers import WanTransformer3DModel

    import sla

    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN)
    sla.apply_sla(model, keep_proj_fp32=keep_proj_fp32, **SLA_SETTINGS)
    return model.to(dtype)


def global_batch():
    """Inputs and regression target for the whole batch; 3 frames x 8 x 8 patches = 192 tokens per clip."""
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(GLOBAL_BATCH, 4, 3, 16, 16, generator=g),
                  timestep=torch.tensor([100, 400, 700, 950]),
                  encoder_hidden_states=torch.randn(GLOBAL_BATCH, 8, 32, generator=g))
    target = torch.randn(GLOBAL_BATCH, 4, 3, 16, 16, generator=g)
    return inputs, target


def local_slice(batch, rank):
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}


def train_step(model, inputs, target, dtype):
    """One forward, MSE loss averaged over the (local) batch, backward. Returns the detached output (fp32)."""
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = model(**inputs, return_dict=False)[0]
    # Mean over the local batch: FSDP averages gradients over ranks, so equal halves give the global mean.
    torch.nn.functional.mse_loss(out.float(), target).backward()
    return out.detach().float()


# ---------------------------------------------------------------------------------------------------------------
# The 2-rank run (executed by torch.distributed.run; see _main at the bottom)
# ---------------------------------------------------------------------------------------------------------------


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()


def _run_scenario(name, model, dtype, out_dir, rank):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    inputs, target = global_batch()
    local_inputs = local_slice(inputs, rank)
    local_target = local_slice({"t": target}, rank)["t"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    out = train_step(model, local_inputs, local_target, dtype)
    # full_tensor() is a collective: every rank calls it for every parameter, in the same order.
    grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    sharding = {n: dict(is_dtensor=isinstance(p, DTensor), placements=str(getattr(p, "placements", None)),
                        local_shape=tuple(p.to_local().shape) if isinstance(p, DTensor) else None,
                        full_shape=tuple(p.shape), dtype=str(p.dtype))
                for n, p in model.named_parameters() if ".sla." in n}
    optimizer.step()
    in_optimizer = {n: p in optimizer.state and "exp_avg" in optimizer.state[p] for n, p in model.named_parameters()}
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save(dict(out=out), os.path.join(out_dir, f"{name}_out_rank{rank}.pt"))
    if rank == 0:
        state = {k: v.detach().cpu() for k, v in state.items()}
        torch.save(dict(grads=grads, sharding=sharding, state=state, in_optimizer=in_optimizer),
                   os.path.join(out_dir, f"{name}_rank0.pt"))
    dist.barrier()
    print(f"rank {rank}: {name} written", file=sys.stderr, flush=True)  # where a failed run got to


def _main(out_dir):
    import functools

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as _fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD_SIZE
    # An explicit CPU mesh: fully_shard's default mesh is CUDA whenever a GPU is visible, which would move the
    # parameters there and run gloo on CUDA tensors.
    fully_shard = functools.partial(_fully_shard, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))

    # fp32: one FSDP unit per transformer block (the SLA module's parameters go with its block), then the root.
    model = build_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    _run_scenario("fp32", model, torch.float32, out_dir, rank)

    # bf16 with the fp32 projection, block as one unit: FSDP2 refuses at the first forward (lazy init).
    model = build_model(torch.bfloat16)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    inputs, target = global_batch()
    try:
        train_step(model, local_slice(inputs, rank), local_slice({"t": target}, rank)["t"], torch.bfloat16)
        error = None
    except Exception as err:  # noqa: BLE001 - recorded and checked by the test
        error = f"{type(err).__name__}: {err}"
    if rank == 0:
        torch.save(dict(error=error), os.path.join(out_dir, "bf16_one_unit_rank0.pt"))
    dist.barrier()

    # bf16 with the fp32 projection, each attn1.sla its own unit (inner units first, as fully_shard requires).
    model = build_model(torch.bfloat16)
    for block in model.blocks:
        fully_shard(block.attn1.sla)
        fully_shard(block)
    fully_shard(model)
    _run_scenario("bf16_sla_unit", model, torch.bfloat16, out_dir, rank)

    # fp32 master weights, bf16 compute, fp32 gradient reduction: SLA needs nothing special.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = build_model()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    _run_scenario("mixed_precision", model, torch.float32, out_dir, rank)  # inputs cast by the policy

    # Every result is on disk and both ranks passed the last barrier: leave without gloo's teardown. In CI (2 cores)
    # one rank intermittently aborted with "terminate called without an active exception" (a C++ thread destroyed
    # while joinable, the signature of a teardown), failing the run: seen in three CI runs, 2026-12-05/06, never in
    # 20 direct runs. Where it happened is unknown (the log had nothing after the first forward's warnings); the
    # markers printed above say how far a failed run got. The test compares the files, so the teardown adds nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# Tests (single process: the references, and the comparisons)
# ---------------------------------------------------------------------------------------------------------------


def _reference(dtype=torch.float32):
    """Unsharded single-process run of the whole global batch: output, gradients, state after one AdamW step."""
    model = build_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=ADAM_EPS)
    inputs, target = global_batch()
    out = train_step(model, inputs, target, dtype)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(out=out, grads=grads, state=state)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD_SIZE), os.path.abspath(__file__), str(out_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-12000:]
    print(f"2-rank FSDP2 run: {time.perf_counter() - start:.1f} s")

    def load(name):
        run = torch.load(out_dir / f"{name}_rank0.pt", weights_only=False)
        if name != "bf16_one_unit":
            run["out"] = torch.cat([torch.load(out_dir / f"{name}_out_rank{r}.pt")["out"] for r in range(WORLD_SIZE)])
        return run

    return load


@pytest.fixture(scope="module")
def reference_fp32():
    return _reference(torch.float32)


@pytest.fixture(scope="module")
def reference_bf16():
    return _reference(torch.bfloat16)


def test_sla_is_active_at_this_size(reference_fp32):
    # Guards the premise of the comparisons: with these blocks SLA computes something other than dense attention.
    from sla.integrations.diffusers import sla_disabled

    model = build_model()
    inputs, _ = global_batch()
    with torch.no_grad(), sla_disabled(model):
        dense = model(**inputs, return_dict=False)[0]
    sla_out = reference_fp32["out"]
    assert (sla_out - dense).norm() > 1e-2 * dense.norm()


def test_fp32_forward_matches_single_process(fsdp_run, reference_fp32):
    torch.testing.assert_close(fsdp_run("fp32")["out"], reference_fp32["out"], rtol=1e-5, atol=1e-6)


def test_fp32_gradients_and_step_match_single_process(fsdp_run, reference_fp32):
    run = fsdp_run("fp32")
    ref = reference_fp32
    assert run["grads"].keys() == ref["grads"].keys()
    assert set(SLA_PARAMS) <= run["grads"].keys()
    for name in ref["grads"]:
        # Sharded reduce-scatter sums in another order than one backward over the whole batch.
        torch.testing.assert_close(run["grads"][name], ref["grads"][name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(run["in_optimizer"].values())  # AdamW holds state for every (sharded) parameter, SLA's included

    assert run["state"].keys() == ref["state"].keys()
    for name in ref["state"]:
        assert run["state"][name].dtype == ref["state"][name].dtype, name
        torch.testing.assert_close(run["state"][name], ref["state"][name], rtol=1e-5, atol=1e-6, msg=name)
    for name in SLA_PARAMS:
        assert run["grads"][name].abs().max() > 0, name
        assert run["state"][name].abs().max() > 1e-7, f"{name} did not move from its zero initialisation"


def test_sla_projection_is_sharded_by_fsdp(fsdp_run):
    sharding = fsdp_run("fp32")["sharding"]
    assert sorted(sharding) == sorted(SLA_PARAMS)
    head_dim = WAN["attention_head_dim"]
    for name, info in sharding.items():
        assert info["is_dtensor"], name
        assert info["placements"] == "(Shard(dim=0),)", (name, info)
        assert info["full_shape"][0] == head_dim
        assert info["local_shape"][0] == head_dim // WORLD_SIZE, (name, info)  # each rank stores half the rows


def test_bf16_fp32_projection_in_the_block_unit_is_refused_by_fsdp2(fsdp_run):
    # FSDP2 asserts that the trainable parameters of one fully_shard unit share one dtype (torch 2.13:
    # FSDPParamGroup._init_mp_dtypes, raised at the first forward). If this ever passes, torch relaxed the rule:
    # update the FSDP paragraph of docs/integration.md.
    error = fsdp_run("bf16_one_unit")["error"]
    assert error is not None and "FSDP expects uniform original parameter dtype" in error, error


def test_bf16_with_sla_as_its_own_unit(fsdp_run, reference_bf16):
    run, ref = fsdp_run("bf16_sla_unit"), reference_bf16
    for name, info in run["sharding"].items():
        assert info["is_dtensor"] and info["dtype"] == "torch.float32", (name, info)
    torch.testing.assert_close(run["out"], ref["out"], rtol=1e-2, atol=1e-2)
    for name in SLA_PARAMS:
        # The projection's gradient is computed from bf16 activations on both sides; it is reduced in fp32.
        g, g_ref = run["grads"][name], ref["grads"][name]
        assert (g - g_ref).norm() <= 2e-2 * g_ref.norm(), name
        assert run["state"][name].dtype == torch.float32
        assert run["state"][name].abs().max() > 1e-7, name
        # With ADAM_EPS the step is ~ lr * grad: the fp32 projections land within rounding of the reference.
        torch.testing.assert_close(run["state"][name], ref["state"][name], rtol=0, atol=1e-5, msg=name)


def test_mixed_precision_policy_keeps_fp32_master_weights(fsdp_run, reference_bf16, reference_fp32):
    run = fsdp_run("mixed_precision")
    # Forward in bf16 (parameters cast by the policy) equals the bf16 model's forward.
    torch.testing.assert_close(run["out"], reference_bf16["out"], rtol=1e-2, atol=1e-2)
    assert all(v.dtype == torch.float32 for v in run["state"].values())
    for name, g_ref in reference_fp32["grads"].items():
        # bf16 compute, fp32 reduction: close to the fp32 gradient at bf16 accuracy.
        assert (run["grads"][name] - g_ref).norm() <= 5e-2 * g_ref.norm() + 1e-6, name
    for name in SLA_PARAMS:
        assert run["state"][name].abs().max() > 1e-7, name


if __name__ == "__main__":
    _main(sys.argv[1])
