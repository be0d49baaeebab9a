"""How much of a position's selection its neighbour also selected, in a trained NSA model (issue
11). bench.py measures this "share" on random inputs (~25% at 64k: the three forced blocks and
chance), where a selected kernel that stacks neighbouring positions over the union of their
blocks would do more work than it saves in loads. This reads the selections that a trained
checkpoint makes on validation text: per layer, the share of position t's selected blocks that
position t - s also selected, for strides s = 1, 2, 4, 8 (a kernel over s + 1 positions loads
each shared block once), over --windows windows of block_size tokens; and the same share among
the blocks chosen by score (not block 0 or the two local blocks, which every position takes).
Such a kernel was built and timed (BENCHMARKS.md, seventh session): at a trained model's share
(~78%) its forward was 11% faster, on random inputs 41-59% slower, so it was dropped.

    python benchmarks/dev/neighbour_share.py --out_dir=out-passkey-nsa-1337 --json share.json
    TRITON_INTERPRET=1 python benchmarks/dev/neighbour_share.py --out_dir=out --device=cpu

The selection is the kernels' (nsa_kernels.nsa_select, under the interpreter on a CPU).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import common  # noqa: E402 (the repository root, above)
import eval as ev  # noqa: E402
import nsa_kernels as nk  # noqa: E402
from bench import neighbour_share  # noqa: E402

STRIDES = (1, 2, 4, 8)

p = argparse.ArgumentParser()
p.add_argument("--out_dir", required=True)
p.add_argument("--windows", type=int, default=4)
p.add_argument("--device", default="cuda")
p.add_argument("--data_dir", default=None)
p.add_argument("--json")
args = p.parse_args()

model, ckpt = common.load_model(os.path.join(args.out_dir, "ckpt.pt"), args.device)
cfg = model.config
if cfg.attention != "nsa":
    sys.exit(f"{args.out_dir} is a {cfg.attention} attention run: nothing is selected")
config = ckpt.get("config") or {}
data = ev.read_split(args.data_dir or config.get("data_dir", "data"), config["dataset"], "val")
T = min(cfg.block_size, len(data))
starts = torch.linspace(0, len(data) - T, args.windows).long().tolist()
idx = torch.stack([torch.from_numpy(data[s:s + T].astype(np.int64)) for s in starts])
dev = torch.device(args.device)
hp = dict(block_len=cfg.block_len, block_stride=cfg.block_stride)
rows = []
with torch.no_grad(), common.autocast(dev, "bfloat16" if dev.type == "cuda" else "float32"), \
        ev.activations(model, True) as acts:
    model(idx.to(dev))
    for layer, x in sorted(acts["attn"].items()):
        attn = model.transformer.h[layer].attn
        q, _, _, k_raw, v_raw, _, _ = attn.project(x, torch.arange(T, device=x.device))
        k_cmp, v_cmp = attn.compress(k_raw, v_raw)
        _, lse = nk.compressed_attention(q, k_cmp, v_cmp, **hp)
        sel = nk.nsa_select(q, k_cmp, lse, select_block=cfg.select_block,
                            n_select=cfg.n_select, **hp)                       # [B, T, H, n]
        # the forced blocks (block 0 and the two local ones) are shared by construction: the
        # share among the free choices says whether neighbours agree where the scores decide
        cur = (torch.arange(T, device=sel.device) // cfg.select_block)[None, :, None, None]
        free = (sel >= 0) & (sel != 0) & (sel != cur) & (sel != cur - 1)
        share = {s: neighbour_share(sel, s) for s in STRIDES}
        share_free = {s: neighbour_share(sel, s, free) for s in STRIDES}
        rows.append({"layer": layer, "share": share, "share_of_free_choices": share_free})
        print(f"layer {layer}: " + ", ".join(f"stride {s}: {100 * share[s]:.0f}% "
                                             f"({100 * share_free[s]:.0f}% of free choices)"
                                             for s in STRIDES))
if args.json:
    record = {"out_dir": args.out_dir, "iter_num": ckpt.get("iter_num"), "T": T,
              "windows": starts, "rows": rows, "environment": common.environment()}
    common.atomic_write(args.json, lambda f: f.write(json.dumps(record, indent=1) + "\n"),
                        mode="w")
