"""The tables of BENCHMARKS.md's DDP section from the logs of benchmarks/ddp_h200x2_2026-11-29/
(written by its run.sh on an nvidia-h200-x2 machine):

    python benchmarks/dev/ddp_summary.py benchmarks/ddp_h200x2_2026-11-29   # -> summary.json there
"""
import itertools
import json
import os
import statistics
import sys

folder = sys.argv[1]


def records(name):
    with open(os.path.join(folder, name + ".jsonl")) as f:
        return [json.loads(line) for line in f]


def steps(name, run=-1):
    """{step: record} of the run-th run in the log (a resume appends a second run)."""
    runs = [[]]
    for r in records(name):
        if r.get("event") == "start":
            runs.append([])
        elif "train_loss" in r:
            runs[-1].append(r)
    return {r["iter"]: r for r in runs[1:][run]}


def losses(name):
    """{step: train loss}; a step logged again after a resume counts with its later record."""
    return {r["iter"]: r["train_loss"] for r in records(name) if "train_loss" in r}


def vals(name):
    return [(r["iter"], r["val_loss"]) for r in records(name) if "val_loss" in r]


def rel(a, b):
    return abs(a - b) / abs(b)


summary = {"scaling": [], "parity": {}, "resume": {}}
for T, skip in (("8k", 3), ("32k", 2)):
    for attention in ("nsa", "full"):
        one = None
        for n in (1, 2):
            s = steps(f"s_{T}_{attention}_{n}")
            ms = statistics.median(r["ms_per_iter"] for i, r in s.items() if i >= skip)
            last = s[max(s)]
            tokens = last["tokens_per_s"] * last["ms_per_iter"] / 1000  # tokens per step
            per_gpu = tokens / (ms / 1000) / n
            one = one or per_gpu
            summary["scaling"].append(dict(
                T=T, attention=attention, gpus=n, ms_per_step=ms, tokens_per_step=tokens,
                tokens_per_s=per_gpu * n, tokens_per_s_per_gpu=per_gpu,
                scaling=per_gpu / one, peak_mem_gib=last["peak_mem_gib"],
                steps_timed=sum(i >= skip for i in s),
                max_rel_loss_diff_vs_1_gpu=None if n == 1 else max(
                    rel(r["train_loss"], steps(f"s_{T}_{attention}_1")[i]["train_loss"])
                    for i, r in s.items())))

one, two = steps("one"), steps("two")
again = steps("kill", 0)  # the killed run: the same command as `two`, steps 0..33
val = {name: vals(name) for name in ("one", "two", "kill")}
summary["parity"] = {
    "step_1_rel_diff_1_vs_2_gpus": rel(two[1]["train_loss"], one[1]["train_loss"]),
    "max_rel_diff_steps_0_24": {"1_vs_2_gpus": max(rel(two[i]["train_loss"], one[i]["train_loss"])
                                                   for i in range(25)),
                                "2_gpus_run_to_run": max(rel(again[i]["train_loss"],
                                                             two[i]["train_loss"])
                                                         for i in range(25))},
    "val_loss": val,
    "ms_per_step": {"1_gpu": statistics.median(r["ms_per_iter"] for i, r in one.items() if i >= 5),
                    "2_gpus": statistics.median(r["ms_per_iter"] for i, r in two.items()
                                                if i >= 5)}}
# every 50-step parity run: 1 GPU (one; parity2_one_gpu0/1, a second call) and 2 GPUs (two,
# kill: its first 34 steps and then the resume; parity2_two_b)
summary["parity"]["runs"] = {
    name: {"gpus": 1 if "one" in name else 2,
           "val_loss": vals(name),
           "mean_train_loss_40_49": statistics.mean(losses(name)[i] for i in range(40, 50))}
    for name in ("one", "parity2_one_gpu0", "parity2_one_gpu1", "two", "kill", "parity2_two_b")}
# per-step mean |difference| / loss between two runs, within each side and across the sides
curves = {name: losses(name) for name in summary["parity"]["runs"]}
one_gpu = [n for n in curves if summary["parity"]["runs"][n]["gpus"] == 1]
two_gpus = [n for n in curves if summary["parity"]["runs"][n]["gpus"] == 2]


def spread(pairs, lo, hi):
    return [statistics.mean(rel(curves[a][i], curves[b][i]) for i in range(lo, hi))
            for a, b in pairs]


summary["parity"]["mean_rel_diff_per_step"] = {
    f"steps_{lo}_{hi - 1}": {
        "within_1_gpu": spread(itertools.combinations(one_gpu, 2), lo, hi),
        "within_2_gpus": spread(itertools.combinations(two_gpus, 2), lo, hi),
        "1_vs_2_gpus": spread(itertools.product(one_gpu, two_gpus), lo, hi)}
    for lo, hi in ((0, 25), (25, 50))}
killed, resumed = steps("kill", 0), steps("kill", 1)
summary["resume"] = {
    "killed_after_step": max(killed), "resumed_from": min(resumed),
    "rel_diff_after_resume": {i: rel(resumed[i]["train_loss"], killed[i]["train_loss"])
                              for i in sorted(set(killed) & set(resumed))}}
with open(os.path.join(folder, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)

print("| T | attention | GPUs | ms/step | tokens/s | per GPU | of linear | peak GiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in summary["scaling"]:
    print(f"| {r['T']} | {r['attention']} | {r['gpus']} | {r['ms_per_step']:.0f} | "
          f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
          f"{100 * r['scaling']:.1f}% | {r['peak_mem_gib']:.1f} |")
print(json.dumps({k: summary[k] for k in ("parity", "resume")}, indent=1))
