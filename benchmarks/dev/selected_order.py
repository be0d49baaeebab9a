"""The selected branch alone at 8k and 64k for G = 1, 4, 8, 16 (HQ = 4G, H = 4, D = 128, paper
hyperparameters), in each loop order: forward per position or in key-block order, dq per
position or stored by the dk/dv kernel as pieces and merged. One-off measurement behind the
thresholds nsa_kernels.SLC_BLOCK_ORDER_BELOW_G and SLC_DQ_PIECES_BELOW_G; run from the
repository root on a GPU (benchmarks/selected_order_h200_2026-11-29b.jsonl also holds a third
dq order, atomic adds in the dk/dv kernel, measured at commit f35640e and deleted since):

    OUT=. python benchmarks/dev/selected_order.py        # writes ./slc.json
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import bench  # noqa: E402 (the repository root, above)
import nsa_kernels as nk  # noqa: E402

hp = dict(nk.PAPER_HP)
out = []
for T in (8192, 65536):
    for G in (1, 4, 8, 16):
        xs, do = bench.nsa_inputs(1, T, 4 * G, 4, 128, hp)
        f, wrt = bench.branch_fn(xs, hp, "selected")
        for block_order, dq in [(False, "position"), (True, "position"), (True, "pieces")]:
            nk.SLC_BLOCK_ORDER_BELOW_G = 1000 if block_order else 0
            nk.SLC_DQ_PIECES_BELOW_G = 1000 if dq == "pieces" else 0
            row = {"T": T, "G": G, "block_order_fwd": block_order, "dq": dq}
            for p in ("fwd", "fwd+bwd"):
                if p == "fwd" and dq != "position":
                    continue  # the dq choice does not touch the forward
                row[p] = bench.measure(bench.timed(f, wrt, do, p))
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            out.append(row)
        del xs, do, f, wrt
        torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "."), "slc.json"), "w") as fh:
    json.dump(out, fh, indent=1)
