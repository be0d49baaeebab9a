"""The top-n selection kernel's tile at small G: nsa_select at 64k (HQ = 4G, H = 4, D = 128,
paper hyperparameters) for each number of positions per tile, its choice checked against the
default tile's (the same block set in every row), then the whole nsa_attention at G = 1 with the
default tile and the fastest one, beside cuDNN. One-off measurement behind the tile comment in
nsa_kernels._select_tiles; run from the repository root on a GPU:

    OUT=. python benchmarks/dev/select_tiles.py        # writes ./select_tiles.json

benchmarks/select_tiles_h200_2026-11-29.jsonl also holds, per tile, the insertion-round merge
("rounds": true) that the kernel used at G < 8 until it was deleted; its rows were measured at
commit 37d025f by an earlier form of this script.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
import bench  # noqa: E402 (the repository root, above)
import nsa_kernels as nk  # noqa: E402

hp = dict(nk.PAPER_HP)
T = 65536
default_tiles = nk._select_tiles
out, best = [], {}


def emit(row):
    print(json.dumps(row), flush=True)
    out.append(row)


for G, positions in ((1, (32, 64, 128, 256)), (4, (16, 32, 64))):
    xs, do = bench.nsa_inputs(1, T, 4 * G, 4, 128, hp)
    q, k_cmp = xs[0].detach(), xs[3].detach()
    _, sel_hp, lse, idx = bench.selection(xs, hp)
    want = idx.sort(-1).values
    tiles = default_tiles(G, 128, 2, *(hp[k] for k in ("block_len", "block_stride",
                                                       "select_block", "n_select")))
    for BT in positions:
        variant = (BT,) + tiles[1:]
        nk._select_tiles = lambda *args, variant=variant: variant
        got = nk.nsa_select(q, k_cmp, lse, **sel_hp).sort(-1).values
        ms = triton.testing.do_bench(lambda: nk.nsa_select(q, k_cmp, lse, **sel_hp), warmup=25,
                                     rep=100, return_mode="median")
        differing = (got != want).any(-1).float().mean().item()
        emit(dict(G=G, BT=BT, default=variant == tiles, ms=ms, rows_differing=differing))
        if differing == 0 and (G not in best or ms < best[G][0]):
            best[G] = (ms, variant)
    nk._select_tiles = default_tiles
    del xs, do
    torch.cuda.empty_cache()

xs, do = bench.nsa_inputs(1, T, 4, 4, 128, hp)
for name, variant in (("default", None), ("best", best[1][1])):
    nk._select_tiles = default_tiles if variant is None else (lambda *args, v=variant: v)
    for p in ("fwd", "fwd+bwd"):
        emit(dict(G=1, nsa=name, tiles=variant, **{"pass": p}, **bench.measure(
            bench.timed(lambda: nk.nsa_attention(*xs, **hp), xs, do, p))))
nk._select_tiles = default_tiles
q, k, v = xs[:3]
for p in ("fwd", "fwd+bwd"):
    emit(dict(G=1, sdpa="cudnn", **{"pass": p}, **bench.measure(
        bench.timed(lambda: bench.sdpa(q, k, v, bench.SDPA["cudnn"]), (q, k, v), do, p))))
with open(os.path.join(os.environ.get("OUT", "."), "select_tiles.json"), "w") as fh:
    json.dump(out, fh, indent=1)
