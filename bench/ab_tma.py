"""The SLA kernels' launch forms against each other, in one process on one GPU.

Two choices, each a ``launch_config`` override: the sparse kernels (``fwd``, ``dq``, ``dkdv``) gather their tiles
with pointer loads or, on compute capability 9.0+, through TMA descriptors (``{kernel: {"tma": ..}}``,
``launch_config.tma_loads``), and the forward runs as one launch or two (``{"fwd": {"split": ..}}``: the sparse loop
alone, then linear branch, projection and mix; ``launch_config.fwd_split``). This times SLA end to end
(``sla.sparse_linear_attention(backend="triton")``: inference forward, training forward, forward+backward) in each
form, per rule and block shape, alternating the forms over rounds so that drift hits all alike, profiles the kernels
of one forward+backward in each form, and compares the forms' outputs and gradients with the first form's:

    python bench/ab_tma.py --out ab_tma.json
    python bench/ab_tma.py --forms pointer,tma,tma+split --mix-configs 4x1,8x1 --out ab.json
"""

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

def overrides(form: str, mix=None) -> dict:
    """The launch overrides of a form: ``pointer`` or ``tma``, optionally ``+split`` (with the second launch's
    ``mix`` = (num_warps, num_stages), else the table's)."""
    tma = form.split("+")[0] == "tma"
    out = {kernel: {"tma": tma} for kernel in ("fwd", "dq", "dkdv")}
    out["fwd"]["split"] = form.endswith("+split")
    if mix is not None:
        out["fwd_mix"] = {"num_warps": mix[0], "num_stages": mix[1]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: %(default)s)")
    p.add_argument("--cases", default="mass:64x64,mass:128x64,pooled_cov:64x64",
                   help="comma-separated combine:BQxBK (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the forms per case")
    p.add_argument("--forms", default="pointer,tma", help="comma-separated forms: pointer or tma, each optionally "
                   "with +split (default: %(default)s)")
    p.add_argument("--mix-configs", default="", help="for the +split forms: comma-separated num_warps x num_stages "
                   "of the second launch to try, e.g. 4x1,8x1 (default: the table's)")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)

    from bench.bench_kernels import Runner, bench, kernel_profile, sla_fn
    from sla.ops.sla.triton.launch_config import launch_overrides

    B, H, L, D = (int(x) for x in args.shape.split(","))
    r = Runner(B, H, L, D)
    meta = {"shape": [B, H, L, D], "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "commit": os.environ.get("SLA_COMMIT", ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "critical": 0.05, "negligible": 0.10, "scope": "marginal", "dtype": "bfloat16"}
    mixes = [tuple(int(x) for x in m.split("x")) for m in args.mix_configs.split(",") if m]
    rows = []
    for case in args.cases.split(","):
        combine, blocks = case.split(":")
        bq, bk = (int(x) for x in blocks.split("x"))
        f = sla_fn(r, 0.05, 0.10, bq, bk, "marginal", combine=combine)
        forms = {}
        for form in args.forms.split(","):
            for mix in (mixes if form.endswith("+split") and mixes else [None]):
                forms[form + (f" mix {mix[0]}x{mix[1]}" if mix else "")] = overrides(form, mix)
        results = {}
        for form, ov in forms.items():
            with launch_overrides(ov):
                for x in r.leaves:
                    x.grad = None
                o = f()
                o.backward(r.do)
                results[form] = [o.detach().float()] + [x.grad.float() for x in r.leaves[:3]]
        first = next(iter(forms))
        diff = {form: {name: (a - b).abs().max().item()
                       for name, a, b in zip(("o", "dq", "dk", "dv"), results[first], results[form])}
                for form in forms}
        times = {form: {"inference": [], "fwd": [], "fwdbwd": []} for form in forms}
        for _ in range(args.rounds):
            for form, ov in forms.items():
                with launch_overrides(ov):
                    t_fwd, t_fb, _ = r.time_pair(f)
                    with torch.no_grad():
                        t_inf = bench(f)
                times[form]["inference"].append(t_inf)
                times[form]["fwd"].append(t_fwd)
                times[form]["fwdbwd"].append(t_fb)
        profiles = {}
        for form, ov in forms.items():
            with launch_overrides(ov):
                prof = kernel_profile(f, r)
            profiles[form] = {k: v for k, v in prof.items() if k.startswith("sla_") or k.startswith("(sum")}
        row = {"combine": combine, "blocks": blocks, f"max_abs_diff_vs_{first}": diff,
               "median_ms": {form: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for form, t in times.items()},
               "all_ms": times, "kernels_ms": profiles}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("combine", "blocks", f"max_abs_diff_vs_{first}", "median_ms")}),
              flush=True)
        print(json.dumps(profiles), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
