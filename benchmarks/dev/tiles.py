"""Launch-settings sweep of the attention kernels, behind nsa_kernels.DENSE_TILES (compressed and
window branches: forward, dq, dk/dv) and nsa_kernels.SLC_TILES (selected branch: the forward and
dq that run one position per program from G = 16, the key-block forward below G = 16, the dk/dv).
Each setting is checked against the current settings' outputs on the same inputs, then timed
(median), at 64k with G = 16 and 4 and at 8k with G = 16, where the kernel runs at that G. A
backward kernel is timed as its branch's whole backward with the other kernels at their current
settings, so its rows differ only by the swept kernel. Run from the repository root on a GPU;
--part i/n sweeps every n-th setting (one process per GPU); --kernels picks and orders them:

    CUDA_VISIBLE_DEVICES=0 python benchmarks/dev/tiles.py --part 0/2 --out tiles0.jsonl \\
        --kernels selected.fwd,selected.dq,selected.dkdv,compressed.dkdv
"""
import argparse
import copy
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
import nsa_kernels as nk  # noqa: E402 (the repository root, above)

DENSE = ("compressed", "window")
ROW_TILES = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))  # dense
PER_POSITION = list(itertools.product((1, 2, 4, 8), (1, 2, 3, 4)))           # warps, stages
BLOCKS = list(itertools.product((64, 128), (4, 8), (2, 3, 4)))               # + rows
SETTINGS = {"fwd": PER_POSITION, "dq": PER_POSITION, "blocks_fwd": BLOCKS, "dkdv": BLOCKS}
ALL = [f"{b}.{k}" for b in DENSE for k in ("fwd", "dq", "dkdv")] + \
    [f"selected.{k}" for k in ("fwd", "dq", "blocks_fwd", "dkdv")]

p = argparse.ArgumentParser()
p.add_argument("--part", default="0/1")
p.add_argument("--out", required=True)
p.add_argument("--kernels", default=",".join(ALL), help=f"comma-separated, of {ALL}")
p.add_argument("--cases", default="65536:16,65536:4,8192:16", help="T:G,...")
args = p.parse_args()
part, parts = map(int, args.part.split("/"))
kernels = args.kernels.split(",")
if not set(kernels) <= set(ALL):
    p.error(f"--kernels: unknown {sorted(set(kernels) - set(ALL))}")

D, H, BLOCK_LEN, BLOCK_STRIDE, SELECT_BLOCK, N_SELECT = 128, 4, 32, 16, 64, 16
CASES = [tuple(map(int, c.split(":"))) for c in args.cases.split(",")]  # (T, G)
# without a GPU (TRITON_INTERPRET=1, small --cases): check the settings, time nothing
DEV = "cuda" if torch.cuda.is_available() else "cpu"
scale = D ** -0.5
GEOMETRY = {"compressed": nk._cmp_geometry(BLOCK_LEN, BLOCK_STRIDE), "window": (1, 0, 512)}


def runs_at(kernel, G):
    """Whether the selected-branch kernel runs at this G (the dense ones run at every G)."""
    branch, name = kernel.split(".")
    if branch != "selected":
        return True
    if name == "fwd":
        return G >= nk.SLC_BLOCK_ORDER_BELOW_G
    if name == "blocks_fwd":
        return G < nk.SLC_BLOCK_ORDER_BELOW_G
    if name == "dq":
        return G >= nk.SLC_DQ_PIECES_BELOW_G
    return True


def inputs(T, G):
    """q, k, v, do, the compressed keys and values, and the selection they give."""
    gen = torch.Generator(device=DEV).manual_seed(T + G)
    Tc = nk.num_compressed_blocks(T, BLOCK_LEN, BLOCK_STRIDE)

    def randn(*shape):
        return torch.randn(*shape, device=DEV, dtype=torch.bfloat16, generator=gen)

    q, do = randn(1, T, G * H, D), randn(1, T, G * H, D)
    k, v = randn(1, T, H, D), randn(1, T, H, D)
    k_cmp, v_cmp = randn(1, Tc, H, D), randn(1, Tc, H, D)
    _, lse = nk._dense_fwd(q, k_cmp, v_cmp, *GEOMETRY["compressed"], scale)
    idx = nk._select(q, k_cmp, lse, BLOCK_LEN, BLOCK_STRIDE, SELECT_BLOCK, N_SELECT, scale)
    return dict(q=q, do=do, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, idx=idx)


def branch_fns(x, branch):
    """(forward, backward) of one branch on inputs x: the outputs to compare, and callables to
    time (the backward's from the forward's saved outputs)."""
    q, do = x["q"], x["do"]
    if branch == "selected":
        o, lse, inv = nk._slc_fwd(q, x["k"], x["v"], x["idx"], SELECT_BLOCK, scale)
        delta = (do.float() * o.float()).sum(-1)
        dq = torch.empty(q.shape, dtype=torch.float32, device=DEV)
        dk, dv = (torch.zeros(x["k"].shape, dtype=torch.float32, device=DEV) for _ in "kv")

        def bwd():
            dk.zero_()
            dv.zero_()
            nk._slc_bwd(q, x["k"], x["v"], x["idx"], inv, do, lse, delta, dq, False, dk, dv,
                        SELECT_BLOCK, scale)

        def fwd():
            return nk._slc_fwd(q, x["k"], x["v"], x["idx"], SELECT_BLOCK, scale)
    else:
        k, v = (x["k"], x["v"]) if branch == "window" else (x["k_cmp"], x["v_cmp"])
        geo = GEOMETRY[branch]
        o, lse = nk._dense_fwd(q, k, v, *geo, scale)
        delta = (do.float() * o.float()).sum(-1)
        dq = torch.empty(q.shape, dtype=torch.float32, device=DEV)
        dk = dv = None

        def bwd():
            nonlocal dk, dv
            dk, dv = nk._dense_bwd(q, k, v, do, lse, delta, dq, False, *geo, scale)

        def fwd():
            return nk._dense_fwd(q, k, v, *geo, scale)
    bwd()
    return {"o": o.float(), "dq": dq.clone(), "dk": dk.clone(), "dv": dv.clone()}, fwd, bwd


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def set_setting(kernel, setting):
    branch, name = kernel.split(".")
    if branch == "selected":
        nk.SLC_TILES[name] = setting
    else:
        nk.DENSE_TILES[branch][name] = setting


default = copy.deepcopy({"dense": nk.DENSE_TILES, "slc": nk.SLC_TILES})
data = {case: inputs(*case) for case in CASES}
refs = {}
with open(args.out, "w") as f:
    for kernel in kernels:
        branch, name = kernel.split(".")
        settings = (ROW_TILES if branch != "selected" else SETTINGS[name])[part::parts]
        for setting, (T, G) in itertools.product(settings, CASES):
            if not runs_at(kernel, G):
                continue
            for b in DENSE:
                nk.DENSE_TILES[b] = copy.deepcopy(default["dense"][b])
            nk.SLC_TILES.update(copy.deepcopy(default["slc"]))
            if (branch, T, G) not in refs:
                refs[branch, T, G] = branch_fns(data[T, G], branch)[0]
            set_setting(kernel, setting)
            row = dict(kernel=kernel, setting=setting, T=T, G=G)
            try:
                out, fwd, bwd = branch_fns(data[T, G], branch)
                ref = refs[branch, T, G]
                row["err"] = max(rel_err(out[n], ref[n]) for n in ref)
                fn = fwd if name in ("fwd", "blocks_fwd") else bwd
                if DEV == "cuda":
                    row["ms"] = triton.testing.do_bench(fn, warmup=25, rep=150,
                                                        return_mode="median")
            except Exception as e:  # a setting that does not fit (shared memory, registers)
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
