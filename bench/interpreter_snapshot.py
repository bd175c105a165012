"""Bit-for-bit check of a kernel-source refactoring, in Triton's CPU interpreter (no GPU).

    python bench/interpreter_snapshot.py save /tmp/before.pt     # on the commit before the change
    python bench/interpreter_snapshot.py compare /tmp/before.pt  # after it: exit 1 unless every tensor is equal

Runs the Triton backend's forward (training and inference) and backward on fixed-seed cases that cover fp32 and fp16,
``combine`` "paper" and "mass", the three linear scopes, the three feature maps, ragged lengths and blocks 64x64,
128x64 and 32x16, and saves every output and gradient. A change meant to leave the kernels' arithmetic alone (same
operations in the same order) must reproduce them exactly (``torch.equal``); the interpreter cannot say anything
about compiled code (``bench/compiled_shared_memory.py`` and a GPU A/B with ``bench/ab_ops.py`` do). bf16 is left
out: its dots are wrong in the interpreter.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

from sla.ops.sla.triton.testing import patch_triton_interpreter  # noqa: E402

patch_triton_interpreter()
from sla.ops.sla.blockmap import build_block_map  # noqa: E402
from sla.ops.sla.triton import triton_sparse_linear_attention  # noqa: E402

CASES = [  # B, H, Lq, Lk, D, block_q, block_k, linear_scope, feature_map, proj, bias, combine, dtype
    (1, 2, 200, 200, 64, 64, 64, "marginal", "softmax", True, True, "paper", torch.float32),
    (1, 2, 200, 200, 64, 64, 64, "marginal", "softmax", True, True, "mass", torch.float16),
    (1, 2, 300, 190, 64, 128, 64, "noncritical", "elu", True, False, "mass", torch.float32),
    (1, 2, 300, 190, 64, 128, 64, "noncritical", "elu", True, True, "paper", torch.float16),
    (2, 1, 130, 257, 32, 32, 16, "all", "relu", False, False, "paper", torch.float32),
    (2, 1, 130, 257, 32, 32, 16, "all", "relu", False, False, "mass", torch.float16),
    (1, 1, 77, 141, 32, 32, 16, "marginal", "elu", True, True, "mass", torch.float32),
    (1, 1, 150, 99, 64, 64, 64, "noncritical", "softmax", False, False, "paper", torch.float16),
    (1, 1, 150, 99, 64, 128, 64, "all", "softmax", True, True, "mass", torch.float16),
]


def run():
    """Every case's outputs and gradients, keyed "case/name"."""
    out = {}
    for ci, (B, H, Lq, Lk, D, bq, bk, scope, feat, proj, bias, comb, dt) in enumerate(CASES):
        g = torch.Generator().manual_seed(1000 + ci)
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(dt).requires_grad_() for L in (Lq, Lk, Lk))
        w = (0.2 * torch.randn(D, D, generator=g)).requires_grad_() if proj else None
        b = torch.randn(D, generator=g).requires_grad_() if bias else None
        mo = torch.randn(H, generator=g).requires_grad_() if comb == "mass" else None
        bm = build_block_map(q.detach(), k.detach(), critical=0.4, negligible=0.3, block_q=bq, block_k=bk)
        do = torch.randn(B, H, Lq, D, generator=g).to(dt)
        o = triton_sparse_linear_attention(q, k, v, bm, feature_map=feat, linear_scope=scope, proj_weight=w,
                                           proj_bias=b, combine=comb, mass_offset=mo)
        wrt = [x for x in (q, k, v, w, b, mo) if x is not None]
        grads = torch.autograd.grad(o, wrt, do)
        out[f"{ci}/o"] = o.detach().clone()
        for j, gr in enumerate(grads):
            out[f"{ci}/g{j}"] = gr.clone()
        with torch.no_grad():  # inference path (STORE_AUX off)
            out[f"{ci}/o_inf"] = triton_sparse_linear_attention(q, k, v, bm, feature_map=feat, linear_scope=scope,
                                                                proj_weight=w, proj_bias=b, combine=comb,
                                                                mass_offset=mo).clone()
    return out


def main(argv) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, path = argv
    res = run()
    if mode == "save":
        torch.save(res, path)
        print("saved", len(res), "tensors to", path)
        return 0
    ref = torch.load(path)
    if ref.keys() != res.keys():
        print("different cases: the snapshot is from another version of this script", file=sys.stderr)
        return 1
    bad = [k for k in ref if not torch.equal(ref[k], res[k])]
    print("compared", len(ref), "tensors; differing:", bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
