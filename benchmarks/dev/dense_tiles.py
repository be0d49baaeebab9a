"""Tile sweep of the dense kernels (compressed and window branches: forward, dq, dk/dv), behind
nsa_kernels.DENSE_TILES. Each (rows, keys, warps, stages) is checked against the current tiles'
outputs on the same inputs, then timed (median), at 64k with G = 16 and 4 and at 8k with G = 16.
The backward kernels are timed as the whole branch backward with the other kernel at its current
tiles, so their rows differ only by the swept kernel. Run from the repository root on a GPU;
`--part i/n` sweeps every n-th configuration (one process per GPU):

    CUDA_VISIBLE_DEVICES=0 python benchmarks/dev/dense_tiles.py --part 0/2 --out tiles0.jsonl
"""
import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
import nsa_kernels as nk  # noqa: E402 (the repository root, above)

p = argparse.ArgumentParser()
p.add_argument("--part", default="0/1")
p.add_argument("--out", required=True)
args = p.parse_args()
part, parts = map(int, args.part.split("/"))

D, H = 128, 4
CASES = [(65536, 16), (65536, 4), (8192, 16)]  # (T, G)
CONFIGS = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))][part::parts]
scale = D ** -0.5
kstride, koff, no_window = nk._cmp_geometry(32, 16)
GEOMETRY = {"compressed": (kstride, koff, no_window), "window": (1, 0, 512)}


def inputs(T, G, branch):
    gen = torch.Generator(device="cuda").manual_seed(T + G)
    TK = T if branch == "window" else nk.num_compressed_blocks(T, 32, 16)
    q = torch.randn(1, T, G * H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, TK, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    do = torch.randn_like(q)
    return q, k, v, do


def run(q, k, v, do, branch):
    geo = GEOMETRY[branch]
    o, lse = nk._dense_fwd(q, k, v, *geo, scale)
    delta = (do.float() * o.float()).sum(-1)
    dq = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    dk, dv = nk._dense_bwd(q, k, v, do, lse, delta, dq, False, *geo, scale)
    return {"o": o.float(), "dq": dq, "dk": dk, "dv": dv}, (o, lse, delta, dq)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


default = {b: dict(t) for b, t in nk.DENSE_TILES.items()}
refs = {}
for T, G in CASES:
    for branch in GEOMETRY:
        x = inputs(T, G, branch)
        refs[T, G, branch] = x, run(*x, branch)[0]

with open(args.out, "w") as f:
    for kernel, cfg in itertools.product(("fwd", "dq", "dkdv"), CONFIGS):
        for (T, G), branch in itertools.product(CASES, GEOMETRY):
            for b in GEOMETRY:
                nk.DENSE_TILES[b] = dict(default[b])
            nk.DENSE_TILES[branch][kernel] = cfg
            (q, k, v, do), ref = refs[T, G, branch]
            row = dict(kernel=kernel, rows=cfg[0], keys=cfg[1], warps=cfg[2], stages=cfg[3],
                       T=T, G=G, branch=branch)
            try:
                out, (o, lse, delta, dq) = run(q, k, v, do, branch)
                errs = {name: rel_err(out[name], ref[name]) for name in ref}
                row["err"] = max(errs.values())
                geo = GEOMETRY[branch]
                if kernel == "fwd":
                    fn = lambda: nk._dense_fwd(q, k, v, *geo, scale)  # noqa: E731
                else:
                    fn = lambda: nk._dense_bwd(q, k, v, do, lse, delta, dq, False, *geo, scale)  # noqa: E731
                row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
            except Exception as e:  # a tile that does not fit (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
