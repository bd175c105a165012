"""What token tiles cost: SLA on raster-ordered tokens against SLA on tokens listed tile by tile.

    python bench/bench_token_tile.py --out bench/results_token_tile_h200.json          # GPU, Wan2.1-1.3B 480p
    python bench/bench_token_tile.py --device cpu --shape 1,2,1536,64 --grid 6,16,16 --out /tmp/tt.json

``apply_sla(token_tile=...)`` gathers q, k and v into tile order before SLA and the output back after it, in
every SLA layer. This times, in one process with alternating rounds, the whole op as the diffusers processor
runs it (q, k, v are transposed views of ``(B, L, H, D)`` tensors, as diffusers holds them): ``raster`` (no
gather), ``tile-index`` (the gathers written as ``x[:, :, perm]``, the first implementation) and ``tile``
(``sla.ops.sla.tiles.permute_tokens``, the current one), forward and forward+backward, plus the four gathers
alone. Writes JSON (``--out``) and a Markdown table beside it (same stem, ``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON result path; the Markdown table goes to the same stem + .md")
    p.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D (default: Wan2.1-1.3B at 480p, 81 frames)")
    p.add_argument("--grid", default="21,30,52", help="F,H,W token grid with F*H*W = L (default: %(default)s)")
    p.add_argument("--tile", default="4,4,4", help="token tile tf,th,tw (default: %(default)s)")
    p.add_argument("--critical", type=float, default=0.05)
    p.add_argument("--negligible", type=float, default=0.10)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    p.add_argument("--iters", type=int, default=20, help="calls per timing")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu only checks that the script runs (timings there say nothing about a GPU)")
    args = p.parse_args(argv)
    args.shape = tuple(int(x) for x in args.shape.split(","))
    args.grid = tuple(int(x) for x in args.grid.split(","))
    args.tile = tuple(int(x) for x in args.tile.split(","))
    if len(args.shape) != 4 or len(args.grid) != 3 or len(args.tile) != 3:
        p.error("--shape takes B,H,L,D; --grid F,H,W; --tile tf,th,tw")
    if args.grid[0] * args.grid[1] * args.grid[2] != args.shape[2]:
        p.error(f"--grid {args.grid} holds {args.grid[0] * args.grid[1] * args.grid[2]} tokens, --shape has "
                f"L={args.shape[2]}: make F*H*W equal L")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: pass --device cpu for a check that the script runs")
    return args


def timer(device):
    def run(fn, iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    import sla
    from sla._paths import atomic_write_text
    from sla.ops.sla.tiles import permute_tokens, tile_permutation

    B, H, L, D = args.shape
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    # (B, L, H, D) storage seen as (B, H, L, D), as diffusers' attention processors hand q, k, v over.
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    do = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=g)
    perm, inv = tile_permutation(args.grid, args.tile, device=dev)
    op = dict(critical=args.critical, negligible=args.negligible)

    def raster():
        return sla.sparse_linear_attention(q, k, v, **op)

    def tile_index():
        return sla.sparse_linear_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], **op)[:, :, inv]

    def tile():
        out = sla.sparse_linear_attention(*(permute_tokens(t, perm, inv) for t in (q, k, v)), **op)
        return permute_tokens(out, inv, perm)

    def gathers_index():
        return q[:, :, perm], k[:, :, perm], v[:, :, perm], do[:, :, inv]

    def gathers():
        return [permute_tokens(t, perm, inv) for t in (q, k, v)] + [permute_tokens(do, inv, perm)]

    def fwdbwd(fn):
        def step():
            fn().backward(do)
            q.grad = k.grad = v.grad = None
        return step

    # Same op, same inputs: the tiled outputs agree with each other exactly (the same gathers) and are finite.
    with torch.no_grad():
        a, b = tile_index(), tile()
        assert torch.equal(a, b) and torch.isfinite(a).all(), "tile and tile-index disagree"
    cases = {}
    for name, fn in (("raster", raster), ("tile-index", tile_index), ("tile", tile)):
        cases[f"{name} fwd"] = lambda fn=fn: torch.no_grad()(fn)()
        cases[f"{name} fwd+bwd"] = fwdbwd(fn)
    cases["4 gathers, tile-index"] = lambda: torch.no_grad()(gathers_index)()
    cases["4 gathers, tile"] = lambda: torch.no_grad()(gathers)()
    run = timer(dev)
    for fn in cases.values():  # compile / warm up
        run(fn, 2)
    times = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(run(fn, args.iters))
    ms = {name: statistics.median(t) for name, t in times.items()}

    from provenance import git_commit

    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = dict(card=card, torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d"),
                  shape=list(args.shape), grid=list(args.grid), tile=list(args.tile), critical=args.critical,
                  negligible=args.negligible, dtype=str(dtype).replace("torch.", ""), ms=ms)
    lines = [f"Token tiles on {card}, torch {torch.__version__}, shape {args.shape}, grid {args.grid}, tile "
             f"{args.tile}, {result['dtype']}, critical {args.critical}; median of {args.rounds} alternating rounds.",
             "", "| case | forward ms | fwd+bwd ms | forward vs raster | fwd+bwd vs raster |", "|---|---|---|---|---|"]
    for name in ("raster", "tile-index", "tile"):
        f, fb = ms[f"{name} fwd"], ms[f"{name} fwd+bwd"]
        lines.append(f"| {name} | {f:.3f} | {fb:.3f} | {f / ms['raster fwd'] - 1:+.1%} | "
                     f"{fb / ms['raster fwd+bwd'] - 1:+.1%} |")
    lines += ["", f"The four gathers alone (q, k, v, output): {ms['4 gathers, tile-index']:.3f} ms as x[:, :, perm], "
              f"{ms['4 gathers, tile']:.3f} ms with permute_tokens.", ""]
    md = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
