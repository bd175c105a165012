"""Fine-tuning steps of a Wan2.1 transformer with SLA on one GPU and on several (FSDP2, Ulysses context parallelism).

For each ``--runs`` entry the script launches ``torch.distributed.run`` with that many processes, and every process
runs the training step of ``sla finetune`` (``sla.training.trainer._train_step``: the loss scaling of context
parallelism, FSDP's gradient sync, clipping, AdamW) on a model built the way ``sla finetune`` builds it (SLA applied,
context-parallel hooks, ``fully_shard`` per block with the same mixed-precision policy, rank 0's weights broadcast),
with two differences that keep a benchmark of a 14B model short and off the disk: the weights are random (seeded,
the same in every run: rank 0 draws them on its device and broadcasts them), and so are the clips (random latents
and text embeddings keyed by the clip's position in the training stream, the same in every run). Nothing is saved.

Every run has the same global batch (``--global-batch`` clips per step, split over the data-parallel ranks), so the
losses of all runs must agree (to reduction-order rounding, in bf16 to bf16's). Reported per run: median seconds per
step over the steps after ``--warmup`` (the first steps compile Triton kernels), throughput (clips per second), peak
GPU memory (``torch.cuda.max_memory_allocated``, the maximum over ranks), the losses, their largest relative
difference from the first run's, and the parallel efficiency against the first run: throughput / (processes x
throughput of the first run / its processes). JSON goes to ``--out``, a Markdown table beside it (``.md``).

Run specification: ``P`` (P processes, DDP if P > 1) or ``P:opt,opt`` with ``fsdp`` and ``cp=N``, e.g. ``1``,
``2:fsdp``, ``2:fsdp,cp=2``.

    # two H200s: Wan2.1-1.3B, 480p, 81 frames: one GPU against FSDP2 + Ulysses-2 (the losses must agree)
    python bench/bench_parallel.py --model 1.3b --runs 1 2:fsdp,cp=2 --steps 6 --out bench/parallel_wan13b.json
    # Wan2.1-14B, 720p (75,600 tokens), bf16, gradient checkpointing; one run per command (each takes minutes),
    # --append gathers them: full fine-tuning on 2 GPUs, then on 1 (224 GB of float32 weights, gradients and AdamW
    # moments: expected not to fit; the failure is recorded), then SLA's parameters only, which fits one GPU
    python bench/bench_parallel.py --model 14b --runs 2:fsdp,cp=2 --steps 4 --warmup 1 --out bench/parallel_wan14b.json
    python bench/bench_parallel.py --model 14b --runs 1 --steps 4 --warmup 1 --out bench/parallel_wan14b.json --append
    python bench/bench_parallel.py --model 14b --trainable proj --runs 1 --steps 4 --warmup 1 \
        --out bench/parallel_wan14b_proj.json
    python bench/bench_parallel.py --model 14b --trainable proj --runs 2:fsdp,cp=2 --steps 4 --warmup 1 \
        --out bench/parallel_wan14b_proj.json --append
    python bench/bench_parallel.py --tiny --out /tmp/parallel_tiny.json      # CPU, 2 gloo processes: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

# Wan2.1's transformer configurations (as in bench_e2e.py); TINY runs on a CPU in seconds.
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32,
            freq_dim=32, in_channels=4, out_channels=4)
MODELS = {"1.3b": WAN_1_3B, "14b": WAN_14B, "tiny": TINY}
# Latent clip (channels from the model; frames, height, width in latent units): the Wan VAE compresses 81 frames
# to 21 and 8x in space.
RESOLUTIONS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (2, 8, 8)}
TEXT_LEN = 512
WORKER_ENV = "SLA_BENCH_PARALLEL_WORKER"


def parse_run(spec: str) -> dict:
    procs, _, opts = spec.partition(":")
    try:
        run = dict(spec=spec, procs=int(procs), fsdp=False, cp=1)
        for opt in filter(None, opts.split(",")):
            if opt == "fsdp":
                run["fsdp"] = True
            elif opt.startswith("cp="):
                run["cp"] = int(opt[3:])
            else:
                raise ValueError(opt)
    except ValueError:
        raise SystemExit(f"--runs {spec!r}: expected P or P:opt,... with opt fsdp or cp=N (e.g. 2:fsdp,cp=2)")
    if run["procs"] < 1 or run["cp"] < 1 or run["procs"] % run["cp"]:
        raise SystemExit(f"--runs {spec!r}: cp={run['cp']} must divide the {run['procs']} processes")
    return run


# ------------------------------------------------------------------------------------------------------------------
# worker: one run, every process of it (started by torch.distributed.run)
# ------------------------------------------------------------------------------------------------------------------

def _clip(position: int, latent_shape, text_dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    return dict(video=torch.randn(latent_shape, generator=g),
                text_embeds=0.1 * torch.randn(TEXT_LEN, text_dim, generator=g))


def _batches(cfg, layout, steps: int, latent_shape, text_dim: int):
    """This rank's micro-batches, in the trainer's order (positions by data-parallel rank)."""
    import torch

    from sla.training.trainer import micro_positions

    for step in range(steps):
        for m in range(cfg.grad_accum):
            clips = [_clip(p, latent_shape, text_dim, cfg.seed)
                     for p in micro_positions(step, m, layout.dp_rank, layout.dp, cfg.batch_size, cfg.grad_accum)]
            yield {k: torch.stack([c[k] for c in clips]) for k in ("video", "text_embeds")}


def _random_model(config: dict, device, seed: int):
    """The seeded random Wan, drawn on ``device`` (fast on a GPU; every run draws on the same kind of device, so
    every run gets the same weights)."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            return WanTransformer3DModel(**config)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from sla.integrations.context_parallel import check_divisible, enable_context_parallel
    from sla.training.config import make_config
    from sla.training.distributed import make_layout, materialize_from_rank0, shard_model
    from sla.training.trainer import _train_step, param_groups, prepare_student

    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = parse_run(args.run)
    config = MODELS[args.model]
    latent_shape = (config["in_channels"], *RESOLUTIONS[args.resolution])
    dp = world // run["cp"]
    cfg = make_config(attention="sla", critical=args.critical, negligible=args.negligible, block_q=args.block,
                      block_k=args.block, backend=args.backend, trainable=args.trainable, steps=args.steps,
                      batch_size=args.global_batch // dp, lr=args.lr, warmup_steps=1, bf16=args.bf16,
                      gradient_checkpointing=args.gradient_checkpointing, fsdp=run["fsdp"],
                      context_parallel=run["cp"], seed=0, output_dir=tempfile.gettempdir(), progress=False)
    layout = make_layout(world, rank, device, run["fsdp"], run["cp"])
    pt, ph, pw = config["patch_size"]
    tokens = latent_shape[1] // pt * (latent_shape[2] // ph) * (latent_shape[3] // pw)
    check_divisible(heads=config["num_attention_heads"], tokens=tokens, degree=run["cp"], what=args.model)

    if run["fsdp"]:
        from diffusers import WanTransformer3DModel

        full = cpu = None
        if rank == 0:  # as sla finetune --fsdp: rank 0 holds the full model on the CPU and broadcasts it
            cpu = prepare_student(_random_model(config, device, 0).cpu(), cfg)
            full = cpu.state_dict()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with torch.device("meta"):
            model = prepare_student(WanTransformer3DModel(**config), cfg)
        if run["cp"] > 1:
            enable_context_parallel(model, layout.mesh, device)
        shard_model(model, layout, cfg.bf16)
        materialize_from_rank0(model, layout, full, cpu)
        del full, cpu
        student = model.train()
    else:
        # Every rank draws the same seeded weights (DDP also broadcasts rank 0's).
        student = prepare_student(_random_model(config, device, 0), cfg).to(device).train()
        if run["cp"] > 1:
            enable_context_parallel(student, layout.mesh, device)
        model = student
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = _batches(cfg, layout, args.steps, latent_shape, config["text_dim"])
    stop = type("NoSignal", (), {"requested": None})()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    losses, seconds = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        out = _train_step(cfg, step, model, None, opt, None, [p for _, p in named], named, batches, layout, autocast,
                          t0, stop)  # float(grad_norm) inside waits for the device: the step is complete
        seconds.append(time.perf_counter() - t0)
        losses.append(out["loss"])
    peak = 0.0
    if device.type == "cuda":
        t = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump(dict(run, losses=losses, step_seconds=seconds, peak_memory_gib=peak, tokens=tokens,
                           batch_per_data_parallel_rank=cfg.batch_size, data_parallel=dp,
                           device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"), f)
    # Without this barrier a rank that finishes first tears down its communicator while the other still has
    # context-parallel collectives in flight; under CPU load gloo then aborts the process at exit
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------------------------

def summarise(rows: list[dict], failed: list[dict], global_batch: int, warmup: int) -> None:
    """Step time and throughput per row; efficiency and loss difference against the baseline: the run with the
    fewest processes (a failed run with fewer processes, e.g. one GPU out of memory, leaves them ``None``)."""
    for row in rows:
        timed = row["step_seconds"][warmup:] or row["step_seconds"]
        row["median_step_seconds"] = statistics.median(timed)
        row["clips_per_second"] = global_batch / row["median_step_seconds"]
    fewest = min(r["procs"] for r in rows + failed)
    base = next((r for r in sorted(rows, key=lambda r: r["procs"]) if r["procs"] == fewest), None)
    for row in rows:
        row["baseline"] = base["spec"] if base else None
        per_process = base["clips_per_second"] / base["procs"] if base else None
        row["parallel_efficiency"] = row["clips_per_second"] / (row["procs"] * per_process) if base else None
        row["max_rel_loss_diff_vs_baseline"] = (max(abs(a - b) / max(abs(b), 1e-12)
                                                    for a, b in zip(row["losses"], base["losses"])) if base else None)


def markdown(result: dict) -> str:
    lines = [f"Wan2.1-{result['model']} ({result['tokens']} tokens per clip), SLA critical {result['critical']}, "
             f"global batch {result['global_batch']}, bf16 {result['bf16']}, gradient checkpointing "
             f"{result['gradient_checkpointing']}, trainable {result['trainable']}; {result['device']}, torch "
             f"{result['torch']}, commit {result['commit']}, {result['date']}",
             "",
             "| run | processes | FSDP | context parallel | s/step (median) | clips/s | parallel efficiency | "
             "peak GiB per GPU | max rel. loss diff vs baseline |",
             "|---|---|---|---|---|---|---|---|---|"]

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in result["rows"]:
        lines.append(f"| {r['spec']} | {r['procs']} | {r['fsdp']} | {r['cp']} | {r['median_step_seconds']:.3f} | "
                     f"{r['clips_per_second']:.3f} | {num(r['parallel_efficiency'], '.2f')} | "
                     f"{'-' if r['device'] == 'cpu' else format(r['peak_memory_gib'], '.1f')} | "
                     f"{num(r['max_rel_loss_diff_vs_baseline'], '.2e')} |")
    lines.append(f"\nBaseline (efficiency 1, loss differences against it): {result['rows'][0]['baseline']}; the "
                 f"median is over steps {result['warmup'] + 1}..{result['steps']}.")
    failed = result.get("failed", [])
    for f in failed:
        lines.append(f"\n{f['spec']} failed: {f['error']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1.3b", "14b"], default="1.3b")
    p.add_argument("--resolution", choices=["480p", "720p"], default=None, help="default: 480p for 1.3b, 720p for 14b")
    p.add_argument("--tiny", action="store_true", help="tiny model and clip on CPU with gloo (checks the script)")
    p.add_argument("--runs", nargs="+", default=None, help="run specifications (default: 1 2:fsdp,cp=2)")
    p.add_argument("--global-batch", type=int, default=1, help="clips per optimizer step in every run")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--trainable", default="full", choices=["full", "proj"])
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--critical", type=float, default=0.05)
    p.add_argument("--negligible", type=float, default=0.10)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", required=True)
    p.add_argument("--append", action="store_true",
                   help="add these runs to those already in --out (same settings), e.g. one run per command under "
                        "a time limit; the table is recomputed over all of them")
    p.add_argument("--quiet", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--bench-worker"]:
        # A process of one run. Its settings come in the environment: torch.distributed.run parses the options that
        # follow the script too whenever they abbreviate one of its own (--run would be --run-path).
        worker(argparse.Namespace(**json.loads(os.environ[WORKER_ENV])))
        # Leave without the interpreter's teardown: the result is written and the process group destroyed, and on
        # a loaded 2-core CPU a gloo process still aborted now and then at this point ("terminate called without an
        # active exception": a C++ thread destroyed un-joined), about 1 run in 12-30 even after the barrier above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    args = p.parse_args(argv)
    args.cpu = False
    if args.tiny:
        args.model, args.resolution, args.cpu = "tiny", "tiny", True
        args.bf16 = args.gradient_checkpointing = False
        args.block, args.critical, args.negligible, args.backend = 16, 0.5, 0.0, "torch"
        args.steps, args.warmup, args.lr = 2, 1, 1e-3
        args.runs = args.runs or ["1", "2:fsdp,cp=2"]
        args.global_batch = 2 if args.global_batch == 1 else args.global_batch
    args.resolution = args.resolution or {"1.3b": "480p", "14b": "720p"}[args.model]

    import torch

    from provenance import git_commit

    runs = [parse_run(s) for s in (args.runs or ["1", "2:fsdp,cp=2"])]
    for r in runs:
        if args.global_batch % (r["procs"] // r["cp"]):
            raise SystemExit(f"--global-batch {args.global_batch} does not split over the {r['procs'] // r['cp']} "
                             f"data-parallel ranks of run {r['spec']}")
    rows, failed = [], []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.cpu:
        env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"))
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            result = os.path.join(tmp, f"run{len(rows) + len(failed)}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(r["procs"]),
                   os.path.abspath(__file__), "--bench-worker"]
            env[WORKER_ENV] = json.dumps(dict(vars(args), run=r["spec"], result=result))
            if not args.quiet:
                print(f"run {r['spec']}: {r['procs']} process(es)", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            if proc.returncode != 0 or not os.path.isfile(result):
                log = (proc.stdout or "") + (proc.stderr or "")
                # torchrun's last lines only say which rank died; the cause is the first error line above them.
                cause = [ln for ln in log.splitlines() if re.search(r"Error|error:|terminate called|what\(\)", ln)]
                tail = cause[:2] + log.strip().splitlines()[-2:]
                failed.append(dict(spec=r["spec"], returncode=proc.returncode, error=" | ".join(tail)[-1200:]))
                if os.environ.get("SLA_BENCH_FAILED_LOG"):
                    with open(os.environ["SLA_BENCH_FAILED_LOG"], "a") as f:
                        f.write(f"=== run {r['spec']} exit {proc.returncode}\n{log}\n")
                print(f"run {r['spec']} failed after {time.perf_counter() - t0:.0f} s: {failed[-1]['error']}",
                      file=sys.stderr)
                continue
            with open(result) as f:
                rows.append(json.load(f))
    settings = dict(model=args.model, resolution=args.resolution, critical=args.critical, negligible=args.negligible,
                    global_batch=args.global_batch, steps=args.steps, warmup=args.warmup, bf16=args.bf16,
                    gradient_checkpointing=args.gradient_checkpointing, trainable=args.trainable, lr=args.lr)
    if args.append and os.path.isfile(args.out):
        with open(args.out) as f:
            before = json.load(f)
        differ = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if differ:
            raise SystemExit(f"--append: {args.out} was measured with other settings {differ}; use another --out")
        done = {r["spec"] for r in rows + failed}
        rows = [r for r in before["rows"] if r["spec"] not in done] + rows
        failed = [r for r in before.get("failed", []) if r["spec"] not in done] + failed
    if not rows:
        print("no run finished", file=sys.stderr)
        return 1
    summarise(rows, failed, args.global_batch, args.warmup)
    out = dict(model=args.model, resolution=args.resolution, tokens=rows[0]["tokens"], critical=args.critical,
               negligible=args.negligible, global_batch=args.global_batch, steps=args.steps, warmup=args.warmup,
               bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, trainable=args.trainable,
               lr=args.lr, device=rows[0]["device"], torch=torch.__version__, python=platform.python_version(),
               commit=git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"), rows=rows,
               failed=failed)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    md = markdown(out)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(md)
    if not args.quiet:
        print(md)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
