"""Dev: the selected branch alone at 8k and 64k for G = 1, 4, 8, 16 (HQ = 4G, H = 4, D = 128),
forward order (per position / key blocks) x dq (per position / in the dk/dv kernel)."""
import json, os, sys
sys.path.insert(0, os.getcwd())
import torch, bench, nsa_kernels as nk
hp = dict(nk.PAPER_HP)
out = []
for T in (8192, 65536):
    for G in (1, 4, 8, 16):
        xs, do = bench.nsa_inputs(1, T, 4 * G, 4, 128, hp)
        f, wrt = bench.branch_fn(xs, hp, "selected")
        for order, dq in [(False, False), (True, False), (True, True)]:
            nk.SLC_BLOCK_ORDER_BELOW_G = 1000 if order else 0
            nk.SLC_DQ_BY_BLOCKS_BELOW_G = 1000 if dq else 0
            r = {"T": T, "G": G, "block_order_fwd": order, "dq_by_blocks": dq}
            for p in ("fwd", "fwd+bwd"):
                if p == "fwd" and dq:
                    continue
                try:
                    r[p] = bench.measure(bench.timed(f, wrt, do, p))
                except Exception as e:
                    r[p] = {"error": str(e)[:300]}
                torch.cuda.empty_cache()
            print(json.dumps(r), flush=True)
            out.append(r)
        del xs, do, f, wrt
        torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "slc.json"), "w"), indent=1)
