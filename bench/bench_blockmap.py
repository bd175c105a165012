"""GPU check and micro-benchmark of the block classifier ``build_block_map_triton``, old against new.

Usage (CUDA machine, < 90 s on an H100/H200):

    python3 bench/bench_blockmap.py --out results/blockmap.json

    python3 bench/bench_blockmap.py --cpu-smoke --out /tmp/smoke.json   # tiny shapes, Triton interpreter

"old" is ``bench/blockmap_triton_before.py`` (the builder as of f5165ed: pooling, torch matmul, one
bitonic sort per row, ~20 launches); "new" is ``sla/ops/sla/triton/blockmap.py`` (three launches).

1. Checks, each printed PASS/FAIL:

   * ``exact``: block-constant small-integer inputs (bf16), whose block scores are exact in fp32 in any
     summation order and tie often, so the new map must equal ``sla.ops.sla.blockmap.build_block_map``
     field by field (ragged L, Lq != Lk, 64x64 and 128x64, the big shapes, NaN/inf scores).
   * ``random``: Gaussian inputs at the big shapes, where fp32 rounding differs between builders and decides
     near-ties: fraction of class-map entries that differ from the PyTorch builder (< 1e-3, also reported for
     the old builder), exact per-row counts, LUTs and transposes equal to what ``BlockMap.from_class_map``
     derives from the new class map, and no selected block scoring (by the PyTorch scores) more than a
     rounding tolerance below an unselected one.

2. Timing (``triton.testing.do_bench`` medians, ms): old and new builder called eagerly and replayed from a
   CUDA graph (the graph removes the host launch overhead, so it is close to the GPU time).
3. ``torch.profiler``: kernels per call (launch count) and device time per kernel.
4. Sweep of the select kernel's launch shape (rows per program, head-dim slice, warps, dot precision): each
   config's time and whether its map passes the exact check; a config that fails to compile is reported.

Writes everything to ``--out`` as JSON; the exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

FIELDS = ("class_map", "critical_lut", "negligible_lut", "critical_lut_t_offsets", "critical_lut_t",
          "negligible_lut_t_offsets", "negligible_lut_t")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results_blockmap.json", help="JSON output path (default: %(default)s)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every code path at tiny shapes on CPU under TRITON_INTERPRET=1 (no timings of value)")
    p.add_argument("--no-sweep", action="store_true", help="skip the select-kernel launch-shape sweep")
    p.add_argument("--time-budget", type=float, default=70.0,
                   help="seconds; timing rows and sweep entries are skipped once this is spent (default: %(default)s)")
    p.add_argument("--rep-ms", type=int, default=30, help="do_bench measuring time per timing (default: %(default)s)")
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=HERE,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        self.smoke = args.cpu_smoke
        self.dev = "cpu" if self.smoke else "cuda"
        self.dtype = torch.float32 if self.smoke else torch.bfloat16  # bf16 dots are wrong in the interpreter
        self.t0 = time.time()
        self.failed = False
        self.results = {"checks": [], "timing": [], "profile": [], "sweep": []}

    # ----------------------------------------------------------------------------------------------- inputs
    def quantized(self, B, H, L, D, block, seed, zero_mean=False):
        """Block-constant integers in [-2, 2] (one block adjusted by multiples of 1/block): exact block means,
        exact fp32 scores in any order. ``zero_mean``: every dim sums to 0, so smooth-K's mean is exact."""
        import torch

        g = torch.Generator(device=self.dev).manual_seed(seed)
        nb, tail = -(-L // block), L % block
        vals = torch.randint(-2, 3, (B, H, nb, D), generator=g, device=self.dev).float()
        if zero_mean:
            n_full = L // block
            half = n_full // 2
            vals[:, :, half:2 * half] = -vals[:, :, :half]
            vals[:, :, 2 * half:n_full] = 0.0
        x = vals.repeat_interleave(block, dim=2)[:, :, :L].clone()
        if zero_mean and tail:
            x[:, :, :tail] -= vals[:, :, -1:]
        return x.to(self.dtype)

    def gaussian(self, B, H, L, D, seed, offset):
        import torch

        g = torch.Generator(device=self.dev).manual_seed(seed)
        return (torch.randn(B, H, L, D, generator=g, device=self.dev) + offset).to(self.dtype)

    # ----------------------------------------------------------------------------------------------- checks
    def record_check(self, name, ok, detail):
        status = "PASS" if ok else "FAIL"
        self.failed |= not ok
        print(f"[{status}] {name}: {detail}", flush=True)
        self.results["checks"].append({"case": name, "status": status, "detail": detail})

    def exact_check(self, name, q, k, crit, negl, bq, bk, builder=None):
        from sla.ops.sla.blockmap import build_block_map
        from sla.ops.sla.triton import build_block_map_triton

        try:
            ref = build_block_map(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
            got = (builder or build_block_map_triton)(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
            bad = [f for f in FIELDS if getattr(ref, f).shape != getattr(got, f).shape
                   or not bool((getattr(ref, f) == getattr(got, f)).all())]
            diff = float((ref.class_map != got.class_map).float().mean())
            self.record_check(name, not bad, f"fields differing: {bad or 'none'}; class-map mismatch {diff:.2e}; "
                              f"T_m={got.num_query_blocks} T_n={got.num_key_blocks} n_crit={got.n_critical} "
                              f"n_negl={got.n_negligible}")
        except Exception as e:  # a crash is a failed check, reported, and the rest still runs
            self.record_check(name, False, f"raised {type(e).__name__}: {e}")
            traceback.print_exc()

    def random_check(self, name, q, k, crit, negl, bq, bk):
        import torch

        from blockmap_triton_before import build_block_map_triton_before
        from sla.ops.sla.blockmap import BlockMap, build_block_map, pooled_block_scores
        from sla.ops.sla.triton import build_block_map_triton

        try:
            Lq, Lk = q.shape[2], k.shape[2]
            ref = build_block_map(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
            got = build_block_map_triton(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
            mism = float((ref.class_map != got.class_map).float().mean())
            try:  # the old builder's own trouble is reported, not counted against the new one
                old = build_block_map_triton_before(q, k, critical=crit, negligible=negl, block_q=bq, block_k=bk)
                mism_old = f"{float((ref.class_map != old.class_map).float().mean()):.2e}"
                del old
            except Exception as e:
                mism_old = f"raised {type(e).__name__}: {str(e)[:200]}"
            rebuilt = BlockMap.from_class_map(got.class_map, Lq, Lk, bq, bk)  # checks equal counts per row
            bad = [f for f in FIELDS if not torch.equal(getattr(rebuilt, f), getattr(got, f))]
            counts_ok = (rebuilt.n_critical, rebuilt.n_negligible) == (ref.n_critical, ref.n_negligible)
            # Ranking against the PyTorch scores: the worst critical must not trail the best non-critical by more
            # than fp32 rounding, nor the best negligible lead the worst non-negligible.
            s = pooled_block_scores(q, k, bq, bk)
            tol = 1e-5 * float(s.abs().amax()) + 1e-30
            cm = got.class_map
            inf = torch.tensor(float("inf"), device=s.device)
            gap_c = float((torch.where(cm != 1, s, -inf).amax(-1) - torch.where(cm == 1, s, inf).amin(-1)).max())
            gap_n = float((torch.where(cm == -1, s, -inf).amax(-1) - torch.where(cm != -1, s, inf).amin(-1)).max())
            ok = mism < 1e-3 and not bad and counts_ok and gap_c <= tol and (got.n_negligible == 0 or gap_n <= tol)
            self.record_check(name, ok, f"class-map mismatch vs PyTorch builder {mism:.2e} (old GPU builder "
                              f"{mism_old}); LUT/transpose fields inconsistent with class map: {bad or 'none'}; "
                              f"counts ok: {counts_ok}; worst rank inversion crit {gap_c:.2e} negl {gap_n:.2e} "
                              f"(tol {tol:.2e})")
        except Exception as e:
            self.record_check(name, False, f"raised {type(e).__name__}: {e}")
            traceback.print_exc()

    def run_checks(self):
        import torch

        if self.smoke:
            exact = [("exact ragged Lq!=Lk 64x64", 1, 2, 300, 450, 64, 64, 64, 0.2, 0.3),
                     ("exact 128x64", 1, 2, 600, 257, 64, 128, 64, 0.25, 0.25)]
            rand = [("random 64x64", 1, 2, 700, 700, 64, 64, 64, 0.05, 0.10)]
            nan_shape = (1, 1, 512, 64)
        else:
            exact = [
                ("exact (1,12,32760,128) 64x64", 1, 12, 32760, 32760, 128, 64, 64, 0.05, 0.10),
                ("exact (1,12,32760,128) 128x64", 1, 12, 32760, 32760, 128, 128, 64, 0.05, 0.10),
                ("exact (2,16,32760,128) 128x64", 2, 16, 32760, 32760, 128, 128, 64, 0.05, 0.10),
                ("exact (1,40,75600,128) 64x64", 1, 40, 75600, 75600, 128, 64, 64, 0.05, 0.10),
                ("exact (1,40,75600,128) 128x64", 1, 40, 75600, 75600, 128, 128, 64, 0.05, 0.10),
                ("exact Lq=20000 Lk=33333 64x64 crit .2 negl .3", 1, 4, 20000, 33333, 128, 64, 64, 0.2, 0.3),
                ("exact Lq=33333 Lk=5000 128x64 crit 1 negl 0", 1, 4, 33333, 5000, 64, 128, 64, 1.0, 0.0),
                ("exact Lq=4097 Lk=4000 64x64 D=64 crit .5 negl .5", 2, 3, 4097, 4000, 64, 64, 64, 0.5, 0.5),
            ]
            rand = [("random (1,12,32760,128) 64x64", 1, 12, 32760, 32760, 128, 64, 64, 0.05, 0.10),
                    ("random (1,12,32760,128) 128x64", 1, 12, 32760, 32760, 128, 128, 64, 0.05, 0.10),
                    ("random (1,40,75600,128) 64x64", 1, 40, 75600, 75600, 128, 64, 64, 0.05, 0.10)]
            nan_shape = (1, 2, 4096, 128)
        for i, (name, B, H, Lq, Lk, D, bq, bk, crit, negl) in enumerate(exact):
            q = self.quantized(B, H, Lq, D, bq, seed=10 + i)
            k = self.quantized(B, H, Lk, D, bk, seed=100 + i, zero_mean=True)
            self.exact_check(name, q, k, crit, negl, bq, bk)
            del q, k
        # NaN and +-inf scores: an infinite query block meets key blocks above/below/at the key mean.
        B, H, L, D = nan_shape
        q = self.quantized(B, H, L, D, 64, seed=7).float()
        q[:, :, 64:128, 0] = float("inf")
        q[:, :, 256:320, 3] = float("nan")
        k = self.quantized(B, H, L, D, 64, seed=8, zero_mean=True).float()
        nb = L // 64
        k.view(B, H, nb, 64, D)[..., 0] = torch.tensor([2.0, -1.0, 0.0, -1.0] * (nb // 4), device=self.dev)[:, None]
        self.exact_check(f"exact NaN/inf scores {nan_shape}", q.to(self.dtype), k.to(self.dtype), 0.25, 0.25, 64, 64)
        for i, (name, B, H, Lq, Lk, D, bq, bk, crit, negl) in enumerate(rand):
            q = self.gaussian(B, H, Lq, D, seed=200 + i, offset=0.3)
            k = self.gaussian(B, H, Lk, D, seed=300 + i, offset=0.5)
            self.random_check(name, q, k, crit, negl, bq, bk)
            del q, k

    # ----------------------------------------------------------------------------------------------- timing
    def time_ms(self, fn):
        import torch

        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton

        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=self.args.rep_ms, return_mode="median"))

    def graph_time_ms(self, fn):
        """Median time of replaying ``fn`` captured in a CUDA graph (no host launch overhead)."""
        import torch

        if self.smoke:
            return None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self.time_ms(graph.replay)
        del graph
        return ms

    def kernel_profile(self, fn, iters=5):
        """Kernels per call and device ms per call of each kernel, from torch.profiler."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        fn()
        if self.smoke:
            with profile(activities=[ProfilerActivity.CPU]):
                fn()
            return {"launches_per_call": None, "gpu_ms_per_call": None, "kernels_ms": {}}
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        kernels, launches = {}, 0
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None)
            if t is None:
                t = getattr(evt, "cuda_time_total", 0.0)
            if t > 0:
                kernels[evt.key[:90]] = round(t / 1e3 / iters, 4)
                launches += evt.count
        kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
        return {"launches_per_call": launches / iters, "gpu_ms_per_call": round(sum(kernels.values()), 4),
                "kernels_ms": kernels}

    def run_timing(self):
        from blockmap_triton_before import build_block_map_triton_before
        from sla.ops.sla.triton import build_block_map_triton

        shapes = [(1, 2, 700, 64)] if self.smoke else [(1, 12, 32760, 128), (2, 16, 32760, 128), (1, 40, 75600, 128)]
        blocks = [(64, 64), (128, 64)]
        for shape in shapes:
            B, H, L, D = shape
            q = self.gaussian(B, H, L, D, seed=1, offset=0.0)
            k = self.gaussian(B, H, L, D, seed=2, offset=0.5)
            for bq, bk in blocks:
                row = {"shape": list(shape), "blocks": f"{bq}x{bk}", "critical": 0.05, "negligible": 0.10}
                if time.time() - self.t0 > self.args.time_budget:
                    row["status"] = "skipped (time budget)"
                    print("timing", json.dumps(row), flush=True)
                    self.results["timing"].append(row)
                    continue
                for tag, builder in (("old", build_block_map_triton_before), ("new", build_block_map_triton)):
                    def fn(builder=builder, q=q, k=k, bq=bq, bk=bk):
                        return builder(q, k, critical=0.05, negligible=0.10, block_q=bq, block_k=bk)
                    try:
                        row[f"{tag}_eager_ms"] = round(self.time_ms(fn), 4)
                        g = self.graph_time_ms(fn)
                        row[f"{tag}_graph_ms"] = None if g is None else round(g, 4)
                        prof = self.kernel_profile(fn)
                        row[f"{tag}_launches_per_call"] = prof["launches_per_call"]
                        row[f"{tag}_gpu_ms_per_call"] = prof["gpu_ms_per_call"]
                        self.results["profile"].append({"shape": list(shape), "blocks": f"{bq}x{bk}",
                                                        "builder": tag, **prof})
                    except Exception as e:
                        row[f"{tag}_error"] = f"{type(e).__name__}: {e}"
                        traceback.print_exc()
                        if tag == "new":
                            self.failed = True
                if row.get("old_eager_ms") and row.get("new_eager_ms"):
                    row["speedup_eager"] = round(row["old_eager_ms"] / row["new_eager_ms"], 2)
                if row.get("old_graph_ms") and row.get("new_graph_ms"):
                    row["speedup_graph"] = round(row["old_graph_ms"] / row["new_graph_ms"], 2)
                print("timing", json.dumps(row), flush=True)
                self.results["timing"].append(row)
            del q, k

    # ------------------------------------------------------------------------------------------------ sweep
    def run_sweep(self):
        from sla.ops.sla.blockmap import build_block_map
        from sla.ops.sla.triton import blockmap as gpu_blockmap

        C = gpu_blockmap.SelectConfig
        if self.smoke:
            plan = [((1, 2, 700, 64), 64, 64, [C(16, 16, 4), C(32, 32, 8, 1, "tf32x3")])]
        else:
            # Defaults first (select_config), then alternatives, most informative first: the sweep stops at the
            # time budget.
            bt512 = [C(32, 32, 8), C(16, 16, 8), C(32, 32, 16), C(16, 32, 4), C(32, 32, 8, 1, "tf32x3"),
                     C(64, 32, 16), C(32, 16, 8), C(16, 32, 8, 1, "tf32x3"), C(32, 32, 8, 2)]
            bt2048 = [C(16, 16, 16), C(8, 16, 8), C(16, 16, 16, 1, "tf32x3"), C(16, 16, 8), C(8, 16, 16),
                      C(16, 16, 32), C(32, 16, 16)]
            plan = [((1, 12, 32760, 128), 64, 64, bt512), ((1, 40, 75600, 128), 64, 64, bt2048),
                    ((1, 12, 32760, 128), 128, 64, bt512[:4])]
        for shape, bq, bk, configs in plan:
            B, H, L, D = shape
            q = self.quantized(B, H, L, D, bq, seed=21)
            k = self.quantized(B, H, L, D, bk, seed=22, zero_mean=True)
            ref = build_block_map(q, k, critical=0.05, negligible=0.10, block_q=bq, block_k=bk)
            for cfg in configs:
                entry = {"shape": list(shape), "blocks": f"{bq}x{bk}", "rows": cfg.rows, "dk": cfg.dk,
                         "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "precision": cfg.precision}
                if time.time() - self.t0 > self.args.time_budget:
                    entry["status"] = "skipped (time budget)"
                else:
                    def fn(cfg=cfg, q=q, k=k, bq=bq, bk=bk):
                        return gpu_blockmap._build_block_map(q, k, 0.05, 0.10, bq, bk, config=cfg)
                    try:
                        got = fn()
                        entry["exact"] = all(bool((getattr(ref, f) == getattr(got, f)).all()) for f in FIELDS)
                        entry["eager_ms"] = round(self.time_ms(fn), 4)
                        g = self.graph_time_ms(fn)
                        entry["graph_ms"] = None if g is None else round(g, 4)
                        entry["status"] = "ok"
                    except Exception as e:
                        entry["status"] = f"error {type(e).__name__}: {str(e)[:300]}"
                print("sweep", json.dumps(entry), flush=True)
                self.results["sweep"].append(entry)
            del q, k, ref


def print_summary(results):
    """The numbers that matter, compactly, at the end of the log."""
    print("\n== summary (ms; eager = called from Python, graph = replayed CUDA graph, gpu = sum of kernel times)")
    print("shape               blocks  old eager/graph/gpu/launches     new eager/graph/gpu/launches")
    for r in results["timing"]:
        def cell(tag):
            if f"{tag}_error" in r:
                return "error".ljust(32)
            vals = [r.get(f"{tag}_{m}") for m in ("eager_ms", "graph_ms", "gpu_ms_per_call", "launches_per_call")]
            return " / ".join("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                               for v in vals).ljust(32)
        print(f"{str(tuple(r['shape'])):20s}{r['blocks']:8s}{cell('old')} {cell('new')} {r.get('status', '')}")
    for p in results["profile"]:
        if p["builder"] == "new" or p["shape"] == [1, 12, 32760, 128]:
            top = ", ".join(f"{k[:40]} {v:.4f}" for k, v in list(p["kernels_ms"].items())[:6])
            print(f"kernels {p['builder']} {tuple(p['shape'])} {p['blocks']}: {top}")
    for e in results["sweep"]:
        print(f"sweep {tuple(e['shape'])} {e['blocks']} rows={e['rows']} dk={e['dk']} warps={e['num_warps']} "
              f"stages={e['num_stages']} {e['precision']}: {e['status']} exact={e.get('exact')} "
              f"eager={e.get('eager_ms')} graph={e.get('graph_ms')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton / sla.ops.sla.triton are imported
    import torch
    import triton

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_blockmap.py needs a CUDA GPU; use --cpu-smoke to exercise it on CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the PyTorch builder's fp32 scores stay fp32
    bench = Bench(args)
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": git_commit(), "torch": torch.__version__, "triton": triton.__version__,
            "device": "cpu (TRITON_INTERPRET=1)" if args.cpu_smoke else torch.cuda.get_device_name(),
            "dtype": str(bench.dtype), "cpu_smoke": args.cpu_smoke}
    print("meta", json.dumps(meta), flush=True)
    bench.results["meta"] = meta
    stages = [("checks", bench.run_checks), ("timing", bench.run_timing)]
    if not args.no_sweep:
        stages.append(("sweep", bench.run_sweep))
    for name, stage in stages:
        t = time.time()
        try:
            stage()
        except Exception as e:
            bench.failed = True
            bench.results.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        print(f"-- {name} done in {time.time() - t:.1f} s", flush=True)
    bench.results["elapsed_s"] = round(time.time() - bench.t0, 1)
    bench.results["all_checks_passed"] = not bench.failed
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(bench.results, f, indent=1)
    print_summary(bench.results)
    n_fail = sum(c["status"] == "FAIL" for c in bench.results["checks"])
    n_pass = len(bench.results["checks"]) - n_fail
    print(f"checks: {n_pass} passed, {n_fail} failed; total {bench.results['elapsed_s']} s; wrote {args.out}")
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
