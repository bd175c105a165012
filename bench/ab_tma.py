"""TMA descriptor loads against pointer loads in the SLA kernels, in one process on one GPU.

The sparse kernels (``fwd``, ``dq``, ``dkdv``) gather their tiles with pointer loads or, on compute capability 9.0+,
through TMA descriptors (``launch_config.tma_loads``; ``launch_overrides({kernel: {"tma": ..}})`` picks). This
times SLA end to end (``sla.sparse_linear_attention(backend="triton")``, forward and forward+backward) with all three
kernels in each form, per rule and block shape, alternating the forms over rounds so that drift hits both alike,
profiles the kernels of one forward+backward in each form, and compares the forms' outputs and gradients:

    python bench/ab_tma.py --out ab_tma.json
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

FORMS = {"pointer": False, "tma": True}


def overrides(tma: bool) -> dict:
    return {kernel: {"tma": tma} for kernel in ("fwd", "dq", "dkdv")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: %(default)s)")
    p.add_argument("--cases", default="mass:64x64,mass:128x64,pooled_cov:64x64",
                   help="comma-separated combine:BQxBK (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two forms per case")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    from bench.bench_kernels import Runner, kernel_profile, sla_fn
    from sla.ops.sla.triton.launch_config import launch_overrides

    B, H, L, D = (int(x) for x in args.shape.split(","))
    r = Runner(B, H, L, D)
    meta = {"shape": [B, H, L, D], "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "commit": os.environ.get("SLA_COMMIT", ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "critical": 0.05, "negligible": 0.10, "scope": "marginal", "dtype": "bfloat16"}
    rows = []
    for case in args.cases.split(","):
        combine, blocks = case.split(":")
        bq, bk = (int(x) for x in blocks.split("x"))
        f = sla_fn(r, 0.05, 0.10, bq, bk, "marginal", combine=combine)
        results = {}
        for form, tma in FORMS.items():
            with launch_overrides(overrides(tma)):
                for x in r.leaves:
                    x.grad = None
                o = f()
                o.backward(r.do)
                results[form] = [o.detach().float()] + [x.grad.float() for x in r.leaves[:3]]
        diff = {name: (a - b).abs().max().item()
                for name, a, b in zip(("o", "dq", "dk", "dv"), results["pointer"], results["tma"])}
        times = {form: {"fwd": [], "fwdbwd": []} for form in FORMS}
        for _ in range(args.rounds):
            for form, tma in FORMS.items():
                with launch_overrides(overrides(tma)):
                    t_fwd, t_fb, _ = r.time_pair(f)
                times[form]["fwd"].append(t_fwd)
                times[form]["fwdbwd"].append(t_fb)
        profiles = {}
        for form, tma in FORMS.items():
            with launch_overrides(overrides(tma)):
                prof = kernel_profile(f, r)
            profiles[form] = {k: v for k, v in prof.items() if k.startswith("sla_") or k.startswith("(sum")}
        row = {"combine": combine, "blocks": blocks, "max_abs_diff_pointer_vs_tma": diff,
               "median_ms": {form: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for form, t in times.items()},
               "all_ms": times, "kernels_ms": profiles}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("combine", "blocks", "max_abs_diff_pointer_vs_tma", "median_ms")}),
              flush=True)
        print(json.dumps(profiles), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
