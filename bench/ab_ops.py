"""A/B of the whole SLA Triton op against another commit's, in one process on one GPU.

    git archive REV sla/ops/sla | tar -x -C .ab     # the other commit's operator package (.ab is git-ignored)
    python bench/ab_ops.py --base .ab/sla/ops/sla --out ab.json [--combine mass|paper|pooled|pooled_cov]

The base package is imported under another name (its ``torch.library`` namespace renamed so both can be
registered), and both run their package's ``sparse_linear_attention(..., backend="triton")`` (GPU block map, both
branches, projection; the rule ``--combine`` names, else each package's default, mass offsets at their zero
default) on the same inputs: the forward (inference and training) and the forward+backward through autograd.
Rounds alternate A and B and the medians over rounds are reported, so drifting clocks hit both alike. The outputs
and gradients of A and B are compared, and each kernel's device time per forward+backward comes from
torch.profiler for both. This is how a change that spans kernels and launchers is measured before it stays.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from bench_kernels import Runner, bench, kernel_profile, peak_memory_gb  # noqa: E402
from provenance import git_commit  # noqa: E402


def load_base_ops(src: str):
    """Import a copy of an ``sla/ops/sla`` package directory as ``sla_base_ops`` (custom ops as ``sla_base::``) and
    return the package. Every commit's copy has ``interface.sparse_linear_attention``, whose ``backend="triton"``
    builds the block map on the GPU on CUDA (since cf1a926)."""
    root = tempfile.mkdtemp(prefix="sla_ab_")
    pkg = os.path.join(root, "sla_base_ops")
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for path in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        with open(path) as f:
            text = f.read()
        depth = os.path.relpath(path, pkg).count(os.sep)  # 0 for the package's own modules

        def absolute(match, depth=depth):
            # A relative import that leaves the copied package (``from ...settings import`` in sla/ops/sla) names
            # a module of the installed library: sla.ops is one level above the package, sla two.
            above = len(match.group(1)) - 1 - depth
            if above <= 0:
                return match.group(0)
            return f"from {'.'.join(['sla', 'ops', 'sla'][:3 - above])}.{match.group(2)} import"

        text = re.sub(r"from (\.+)([\w.]+) import", absolute, text)
        with open(path, "w") as f:
            f.write(text.replace('"sla::', '"sla_base::'))
    sys.path.insert(0, root)
    import sla_base_ops  # noqa: PLC0415 (the copy exists only now)

    return sla_base_ops


def triton_entry(package):
    """``package.interface.sparse_linear_attention`` with ``backend="triton"``: the whole op of one copy."""
    def run(*args, **kwargs):
        return package.interface.sparse_linear_attention(*args, backend="triton", **kwargs)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="directory of the other commit's sla/ops/sla package")
    p.add_argument("--shapes", default="1,12,32760,128", help="B,H,L,D;B,H,L,D;... (bf16)")
    p.add_argument("--blocks", default="64x64", help="block_qxblock_k, comma separated")
    p.add_argument("--launch-configs", nargs="*", default=[],
                   help="more variants of the new op with other launch configs, e.g. 'dq:4,3' or "
                        "'dq:4,3+dkdv:4,3' (kernel:num_warps,num_stages; kernel names as in launch_config.KERNELS)")
    p.add_argument("--combine", choices=("mass", "paper", "pooled", "pooled_cov"), default=None,
                   help="combination rule of both ops (default: not passed, each package's own default; a base "
                        "from before commit fff4491 has no combine argument)")
    p.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_ops.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import sla.ops.sla as new_package
    from sla.ops.sla.triton.launch_config import launch_overrides

    base_package = load_base_ops(args.base)
    # name -> (the op, launch-config overrides of the new op's kernels while it runs)
    impls = {"new": (triton_entry(new_package), {}), "base": (triton_entry(base_package), {})}
    for spec in args.launch_configs:
        overrides = {}
        for item in spec.split("+"):
            kernel, config = item.split(":")
            warps, stages = (int(x) for x in config.split(","))
            overrides[kernel] = {"num_warps": warps, "num_stages": stages}
        launch_overrides(overrides)  # checks the names now, before any variant has run
        impls[f"new, {spec}"] = (triton_entry(new_package), overrides)

    def variant(name):  # the overrides of the new op's kernels; the base copy always runs its own table
        return launch_overrides(impls[name][1])

    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "commit": git_commit(), "base": os.path.abspath(args.base), "combine": args.combine, "runs": []}
    rule = {} if args.combine is None else {"combine": args.combine}
    for shape in args.shapes.split(";"):
        B, H, L, D = (int(x) for x in shape.split(","))
        r = Runner(B, H, L, D)
        for blocks in args.blocks.split(","):
            bq, bk = (int(x) for x in blocks.split("x"))

            def call(name):
                op = impls[name][0]
                return lambda: op(r.q, r.k, r.v, critical=0.05, negligible=0.10, block_q=bq, block_k=bk,
                                  linear_scope="marginal", proj_weight=r.w, proj_bias=r.b, **rule)

            row = {"shape": [B, H, L, D], "blocks": blocks}
            grads = {}
            for name in impls:  # warm-up (compiles) and the outputs / gradients to compare
                for x in r.leaves:
                    x.grad = None
                with variant(name):
                    o = call(name)()
                    o.backward(r.do)
                grads[name] = [o.detach()] + [x.grad.detach().clone() for x in r.leaves]
                for x in r.leaves:
                    x.grad = None
            labels = ["o", "dq", "dk", "dv", "dw", "db"]
            row["max_abs_diff_vs_new"] = {
                name: {lab: float((a.float() - b.float()).abs().max()) for lab, a, b in zip(labels, grads["new"], g)}
                for name, g in grads.items() if name != "new"}
            times = {f"{name} {what}": [] for name in impls for what in ("fwd_inference", "fwd_train", "fwd_bwd")}
            for _ in range(args.rounds):
                for name in impls:
                    fn = call(name)
                    with variant(name):
                        with torch.no_grad():
                            times[f"{name} fwd_inference"].append(bench(fn))
                        times[f"{name} fwd_train"].append(bench(fn))
                        times[f"{name} fwd_bwd"].append(bench(r.fwd_bwd(fn), 300, grad_to_none=r.leaves))
                    for x in r.leaves:
                        x.grad = None
            row["median_ms"] = {key: statistics.median(v) for key, v in times.items()}
            row["all_ms"] = times
            for name in impls:
                with variant(name):
                    row[f"{name} peak_memory_gb"] = peak_memory_gb(r.fwd_bwd(call(name)))
                    for x in r.leaves:
                        x.grad = None
                    row[f"{name} per_kernel_ms_fwd_bwd"] = kernel_profile(call(name), r)
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if "per_kernel" not in k and k != "all_ms"}, indent=1),
                  flush=True)
            for name in impls:
                print(name, json.dumps(row[f"{name} per_kernel_ms_fwd_bwd"], indent=1), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=1)
        r = None  # frees this shape's tensors before the next one is allocated
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
