"""The training step of bench.py train (the 32k config's model) with each nsa_kernels.RECOMPUTE
choice, and full attention: ms and peak memory at 8k, 32k and 64k. One-off measurement behind
BENCHMARKS.md's recompute table; run from the repository root on a GPU:

    OUT=. python benchmarks/dev/recompute_memory.py      # writes ./mem.json
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import bench  # noqa: E402 (the repository root, above)
import common  # noqa: E402
import nsa_kernels as nk  # noqa: E402

fields = bench.model_fields(bench.TRAIN_CONFIG)
peak = common.peak_bf16_flops(torch.cuda.get_device_name())
out = []
for T in (8192, 32768, 65536):
    for attention, recompute in [("full", None), ("nsa", ()), ("nsa", ("window",)),
                                 ("nsa", ("compressed", "window")),
                                 ("nsa", ("compressed", "selected", "window"))]:
        if recompute is not None:
            nk.RECOMPUTE = recompute
        row = bench.train_speed(fields, attention, T, 3, peak)
        row.update(T=T, attention=attention, recompute=recompute)
        print(json.dumps(row), flush=True)
        out.append(row)
        torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "."), "mem.json"), "w") as f:
    json.dump(out, f, indent=1)
