"""Validation loss of train.py runs against steps and against wall-clock time, from their
log.jsonl files (wall-clock estimated as the sum of the logged ms_per_iter, each standing for
the log_interval steps since the previous record; evaluations not counted).

    python benchmarks/dev/plot_runs.py OUT.png RUN.jsonl [RUN.jsonl ...]
"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def curves(path):
    steps, times, vals = [], [], []
    elapsed, last = 0.0, 0
    for rec in map(json.loads, open(path)):
        if "ms_per_iter" in rec:
            elapsed += rec["ms_per_iter"] / 1000 * (rec["iter"] - last)
            last = rec["iter"]
        if "val_loss" in rec:
            steps.append(rec["iter"])
            times.append(elapsed)
            vals.append(rec["val_loss"])
    return steps, times, vals


out, runs = sys.argv[1], sys.argv[2:]
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for path in runs:
    steps, times, vals = curves(path)
    name = os.path.basename(path).removesuffix(".jsonl").removeprefix("train_")
    axes[0].plot(steps[1:], vals[1:], marker="o", label=name)
    axes[1].plot(times[1:], vals[1:], marker="o", label=name)
axes[0].set(xlabel="step", ylabel="validation loss")
axes[1].set(xlabel="training seconds (sum of logged step times)", ylabel="validation loss")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=110)
