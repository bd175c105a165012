"""Shared memory of the SLA kernels as Triton compiles them for a GPU, beside ``launch_config``'s estimate.

Runs on a CPU, without a GPU: each kernel is compiled for a CUDA target (``triton.compile`` with a ``GPUTarget``;
Triton ships its own ``ptxas``) and the compiled kernel's ``metadata.shared`` is read. What a launch would get on
that architecture with this Triton; timing still needs the GPU.

    python bench/compiled_shared_memory.py --sm 90 --out bench/results_smem_sm90.json
    python bench/compiled_shared_memory.py --dtypes bf16 --head-dims 128 --blocks 64x64 --tma --resources

``--resources`` adds the registers and stack bytes per thread (``cuobjdump -res-usage``): a kernel at 255
registers with a stack spills, which is visible here without a GPU.

Per launch: kernel, dtype, head dim, block_q x block_k, num_warps, num_stages (the table's unless ``--stages``),
the compiler's bytes and the estimate's (``estimate_shared_memory``). ``TRITON_INTERPRET`` must be unset or 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointer arguments that are not in the inputs' dtype (the rest are): "state" is launch.state_dtype.
POINTERS = {"HS": "state", "DHS": "state", "ZS": "fp32", "DZS": "fp32", "W": "fp32", "BIAS": "fp32",
            "MASS_OFF": "fp32", "LSE": "fp32", "A": "fp32", "DELTA": "fp32", "G": "fp32", "DB_PART": "fp32",
            "LUT": "i32", "LUT_T": "i32", "LUT_T_OFF": "i32",
            # combine="pooled"/"pooled_cov": the coarse branch's row statistics, codes and the means' gradients
            "LOGN2": "fp32", "CODE": "u8", "LSE_C": "fp32", "LOG_REST": "fp32", "PBAR": "fp32", "U": "fp32",
            "DELTA_C": "fp32", "DKM": "fp32", "DVM": "fp32", "DKX": "fp32", "DVX": "fp32"}
INPUT_POINTERS = {"Q", "K", "V", "O", "OS", "OL", "DO", "DQ", "DK", "DV", "DO_S", "DO_L", "KM", "VM", "OC", "DOC"}
FLOATS = {"scale", "qk_scale", "log_d"}


def resource_usage(compiled) -> dict:
    """Registers per thread and stack bytes per thread (local memory: with no calls in these kernels, the
    register spills) of a compiled kernel, from ``cuobjdump -res-usage`` on its cubin: the ``cuobjdump`` Triton
    itself resolves (the one its NVIDIA backend ships, or ``TRITON_CUOBJDUMP_PATH``)."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise ValueError(f"cuobjdump -res-usage printed no REG/STACK line: {text[:200]!r}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}


def compile_kernel(kernel: str, dtype: torch.dtype, head_dim: int, block_q, block_k, num_warps: int,
                   num_stages: int, sm: int, combine: str = "mass", tma: bool = False):
    """``kernel`` compiled for ``sm`` with the library's defaults (softmax features, a projection with bias, aux
    outputs stored) under ``combine`` (``"mass"``, ``"pooled"`` or ``"pooled_cov"``; the coarse kernels' ``block_k``
    is their chunk of key-block means). ``tma``: the sparse kernels' TMA form (their descriptor arguments typed as
    the launcher builds them); ``"fwd"`` is the one-launch forward (PART 0), ``"fwd_mix"`` the split forward's
    second launch (PART 2). Triton's compiled kernel: its ``metadata.shared`` and ``asm["cubin"]`` are read without
    a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sla.ops.sla.triton import kernels
    from sla.ops.sla.triton.launch import _dot_precision, state_dtype
    from sla.ops.sla.triton.launch_config import KERNELS, epilogue_chunk

    fn = getattr(kernels, KERNELS[kernel])
    constants = {"H": 12, "D": head_dim, "BM": block_q, "BN": block_k, "FEATURE": "softmax", "HAS_PROJ": True,
                 "HAS_BIAS": True, "STORE_AUX": True, "MASS": True, "PREC": _dot_precision(dtype),
                 "POOLED": combine != "mass", "COV": combine == "pooled_cov", "BT": block_k, "TMA": tma,
                 "PART": 2 if kernel == "fwd_mix" else 0, "DC": epilogue_chunk(head_dim, dtype)}
    # TMA descriptors: (B, H, L, D) tensors, one block of the rows the sparse loop gathers
    rows_of = {"KD": block_k, "VD": block_k, "QD": block_q, "DOD": block_q}
    kinds = {"input": TRITON_TYPES[dtype], "state": TRITON_TYPES[state_dtype(dtype)], "fp32": "fp32", "i32": "i32",
             "u8": "u8"}
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name]
        elif name in rows_of:  # a tensor placeholder in the pointer form
            signature[name] = (f"tensordesc<{kinds['input']}[1, 1, {rows_of[name]}, {head_dim}]>" if tma
                               else "*" + kinds["input"])
        elif name in INPUT_POINTERS:
            signature[name] = "*" + kinds["input"]
        elif name in POINTERS:
            signature[name] = "*" + kinds[POINTERS[name]]
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", sm, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sm", type=int, default=90, help="compute capability x 10 (default: %(default)s)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--blocks", default="64x64,128x64,128x128", help="block_qxblock_k, comma separated")
    p.add_argument("--kernels", default="state,fwd,dq,linear_q,dkdv")
    p.add_argument("--stages", default="table", help="'table', or comma-separated num_stages to compile each with")
    p.add_argument("--combine", default="mass", help="mass, pooled or pooled_cov (the coarse kernels: coarse_fwd, "
                   "coarse_dq, coarse_dkdv, whose block_k is the chunk of means)")
    p.add_argument("--tma", action="store_true", help="the sparse kernels' TMA form (fwd, dq, dkdv)")
    p.add_argument("--warps", default="table", help="'table', or comma-separated num_warps to compile each with")
    p.add_argument("--resources", action="store_true",
                   help="also registers and stack bytes per thread (the spills) from cuobjdump -res-usage")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted", file=sys.stderr)
        return 2
    import triton

    from sla.ops.sla.triton.launch_config import estimate_shared_memory, table_config

    rows = []
    for kernel in args.kernels.split(","):
        seen = set()
        for dt in args.dtypes.split(","):
            for d in (int(x) for x in args.head_dims.split(",")):
                for blocks in args.blocks.split(","):
                    bq, bk = (int(x) for x in blocks.split("x"))
                    # the tiles the launch passes: none for the axis the kernel does not tile
                    bq, bk = (None, bk) if kernel == "state" else (bq, None) if kernel == "linear_q" else (bq, bk)
                    if (dt, d, bq, bk) in seen:
                        continue
                    seen.add((dt, d, bq, bk))
                    config = table_config(kernel, bq, bk, d, DTYPES[dt])
                    stages = ([config["num_stages"]] if args.stages == "table"
                              else [int(s) for s in args.stages.split(",")])
                    warps = ([config["num_warps"]] if args.warps == "table"
                             else [int(w) for w in args.warps.split(",")])
                    for s, w in ((s, w) for w in warps for s in stages):
                        row = {"kernel": kernel, "combine": args.combine, "tma": args.tma, "dtype": dt, "head_dim": d,
                               "block_q": bq,
                               "block_k": bk,
                               "num_warps": w, "num_stages": s,
                               "estimate": estimate_shared_memory(kernel, bq, bk, d, DTYPES[dt], s)}
                        try:
                            compiled = compile_kernel(kernel, DTYPES[dt], d, bq, bk, w, s, args.sm, args.combine,
                                                      args.tma)
                            row["compiled"] = int(compiled.metadata.shared)
                            if args.resources:
                                row.update(resource_usage(compiled))
                        except Exception as exc:  # a launch the compiler rejects is a result too
                            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"sm": args.sm, "triton": triton.__version__, "torch": torch.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
