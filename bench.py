"""
Benchmarks for nanoNSA on one NVIDIA GPU: NSA's Triton kernels against PyTorch's SDPA
(FlashAttention and cuDNN backends), one decoding step with a KV cache, and whole training
steps of the GPT with NSA or full attention.

    python bench.py kernel --json out/kernel.json --plot out/kernel.png   # <= 4 min on an H200
    python bench.py kernel --shape=model                  # heads of config/train_python_8k_nsa.py
    python bench.py decode --json out/decode.json                         # <= 1.5 min
    python bench.py train --json out/train.json                           # <= 3 min
    python bench.py all --json out/bench.json --plot out/kernel.png       # the three, <= 8.5 min
    python bench.py kernel --quick                                        # smoke test, T <= 16k

The upper bounds are the modes' time budgets (--budget): past them no new row starts.

kernel: attention alone, forward and forward+backward, causal, bf16, at T = 4k ... 128k
    (--T 4k,8k,...). Default shape B=1, 64 query heads, 4 KV heads, D=128 with the paper's
    l=32, d=16, l'=64, n=16, w=512; --shape=model takes heads, D and block sizes from the
    repo's GPU config. A check of nsa_attention against nsa_attention_ref runs first and
    aborts on failure (--no-check skips it). Also times each NSA branch alone through the
    per-branch entry points of nsa_kernels, and groups a profile's GPU kernels by name.
decode: one new token against a KV cache of T for one layer, batch 1 and 16 (--batch),
    NSA (what the model's decode path calls now) vs SDPA, with the paper's memory-access model.
train: fwd + bwd + AdamW step of the GPT (bf16 autocast, batch 1, random tokens) at 8k ... 64k,
    NSA vs full attention: tokens/s, MFU, peak memory, and the largest context that fits.

Timing: warm-up call first (compilation, autotuning, cuDNN plans), then the median of
triton.testing.do_bench for short calls and of CUDA-event-timed calls for long ones, so that a
3 s call costs seconds, not do_bench's minimum of ~8 calls. Every mode stops starting new rows
when its time budget (--budget, seconds) would be exceeded, and writes each row to --json as
soon as it is measured, so a killed run still leaves its data.
"""
import argparse
import ast
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone

import torch
import torch.nn.attention
import torch.nn.functional as F
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import nsa_kernels as nk
from train import peak_flops  # the dense bf16 peak of a GPU, by name (train.py's table)

# ----------------------------------------------------------------------------- settings
PAPER_HP = dict(block_len=32, block_stride=16, select_block=64, n_select=16, window=512)
PAPER_SHAPE = dict(B=1, HQ=64, H=4, D=128)       # the paper's GQA: 4 groups x 16 query heads
MODEL_CONFIG = "config/train_python_8k_nsa.py"
KERNEL_T = [4096, 8192, 16384, 32768, 65536, 131072]
DECODE_T = [8192, 16384, 32768, 65536, 131072]
DECODE_B = [1, 16]
TRAIN_T = [8192, 16384, 32768, 65536]
TRAIN_MAX_T = 131072                             # the search for the largest context stops here
QUICK_MAX_T = 16384
MODE_BUDGET_S = {"kernel": 225, "decode": 80, "train": 170}
# Long calls are timed one by one with CUDA events: a window of LONG_REP_MS, 3 to 10 calls.
LONG_REP_MS = 1000.0
MIN_LONG_REPS, MAX_LONG_REPS = 3, 10
# Relative errors ||out - ref|| / ||ref|| allowed in the check: bf16 operands land between
# 1e-3 and 1e-2; gradients go through one more bf16 rounding of do and of the outputs.
CHECK_TOL_OUT, CHECK_TOL_GRAD = 2e-2, 5e-2
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
IMPL_LABEL = {"nsa": "NSA", "sdpa_flash": "flash", "sdpa_cudnn": "cuDNN",
              "nsa_ref": "NSA (ref)", "nsa_decode": "NSA (kernel)"}
NSA_INPUT_NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win")
# Errors that end one row, not the run: a backend refusing a shape, a kernel failing to compile,
# a bad argument. torch.cuda.OutOfMemoryError (a RuntimeError) is caught before these.
ROW_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError,
              CompilationError, OutOfResources)


class FatalCudaError(Exception):
    """The CUDA context is unusable (illegal address, launch failure): stop measuring."""


class CheckFailed(Exception):
    """nsa_attention disagrees with nsa_attention_ref: kernel timings would mean nothing."""


def log(msg=""):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- FLOP counting
def nsa_key_counts(T, block_len, block_stride, select_block, n_select, window, **_):
    """Keys each branch attends to, summed over the query positions t = 0 .. T-1 (per batch
    element and query head), exactly as the reference semantics define them:
      compressed: blocks i with i*d + l <= t + 1           -> max(0, (t + 1 - l) // d + 1)
      selected:   tokens s <= t of the n chosen blocks: every chosen block but the current one
                  is whole, so min(t + 1, (n - 1) * l' + t % l' + 1) (the cap n*l' minus the
                  unfinished part of the current block)
      window:     t - w < s <= t                           -> min(w, t + 1)
      causal:     s <= t (full attention)                  -> t + 1"""
    t = torch.arange(T, dtype=torch.int64)
    compressed = ((t + 1 - block_len).div(block_stride, rounding_mode="floor") + 1).clamp(min=0)
    selected = torch.minimum(t + 1, (n_select - 1) * select_block + t % select_block + 1)
    windowed = torch.clamp(t + 1, max=window)
    return {"compressed": int(compressed.sum()), "selected": int(selected.sum()),
            "window": int(windowed.sum()), "causal": T * (T + 1) // 2}


def nsa_flops(B, T, HQ, D, hp, pass_):
    """FLOPs NSA really does. Per query, head and attended key the forward costs 4*D (q.k and
    p.v, 2*D each); top-n scoring recomputes q.k_cmp over the visible compressed blocks (2*D per
    block, no p.v); the backward costs 2.5x the forward's attention (q.k again, dp, dv, dq, dk:
    10*D per key) and scoring has none (selection is not differentiable):
        fwd     = B*HQ * (4*D*(cmp + slc + win) + 2*D*cmp)
        fwd+bwd = fwd + B*HQ * 10*D*(cmp + slc + win)
    with cmp, slc, win the key counts of nsa_key_counts summed over t."""
    c = nsa_key_counts(T, **hp)
    attended = c["compressed"] + c["selected"] + c["window"]
    fwd = B * HQ * (4 * D * attended + 2 * D * c["compressed"])
    return fwd if pass_ == "fwd" else fwd + B * HQ * 10 * D * attended


def nsa_branch_flops(B, T, HQ, D, hp, branch, pass_):
    """FLOPs of one branch run alone (same counting as nsa_flops)."""
    c = nsa_key_counts(T, **hp)
    if branch == "selection":
        return B * HQ * 2 * D * c["compressed"]
    keys = c[branch]
    return B * HQ * (4 if pass_ == "fwd" else 14) * D * keys


def sdpa_flops(B, T, HQ, D, pass_):
    """Causal attention: 4*D per (query, head, key s <= t) forward, 3.5x that with backward."""
    fwd = B * HQ * 4 * D * (T * (T + 1) // 2)
    return fwd if pass_ == "fwd" else fwd * 7 // 2


def decode_tokens_read(T, block_len, block_stride, select_block, n_select, window, **_):
    """The paper's memory-access model of one decoding step (Table 4): tokens loaded per KV
    head, (T - l)/d compressed + n*l' selected + w window, against T for full attention."""
    return (T - block_len) / block_stride + n_select * select_block + window


# ----------------------------------------------------------------------------- arguments
def parse_lengths(text):
    """'4k,8192,128k' -> [4096, 8192, 131072]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        n = int(item[:-1]) * 1024 if item.endswith("k") else int(item)
        if n < 1:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {item}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("empty list of lengths")
    return out


def build_parser():
    p = argparse.ArgumentParser(description="nanoNSA benchmarks (needs an NVIDIA GPU)",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("mode", choices=["kernel", "decode", "train", "all"])
    p.add_argument("--T", type=parse_lengths, default=None,
                   help="comma-separated contexts, e.g. 4k,8k,16k (default per mode)")
    p.add_argument("--batch", type=parse_lengths, default=None,
                   help="decode batch sizes (default 1,16)")
    p.add_argument("--shape", choices=["paper", "model"], default="paper",
                   help="kernel/decode attention shape: the paper's (HQ=64, H=4, D=128) or the "
                        "repo's GPU model (from --config)")
    p.add_argument("--config", default=MODEL_CONFIG,
                   help="nanoGPT-style config for --shape=model and train (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: T <= 16k, fewer and shorter repetitions")
    p.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms (25)")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetition, ms (100)")
    p.add_argument("--row-budget", type=float, default=None,
                   help="seconds one measurement may take at most, warm-up included (10)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per mode after which no new row starts (kernel 225, decode 80, "
                        "train 170)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per row (3)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the correctness check of the kernels before timing")
    p.add_argument("--json", default=None, help="write every row and the environment here")
    p.add_argument("--plot", default=None, help="kernel mode: log-log time vs T plot (PNG)")
    return p


def parse_args(argv=None):
    """Parse and fill the defaults that depend on --quick."""
    args = build_parser().parse_args(argv)
    quick = args.quick
    if args.warmup is None:
        args.warmup = 10.0 if quick else 25.0
    if args.rep is None:
        args.rep = 40.0 if quick else 100.0
    if args.row_budget is None:
        args.row_budget = 3.0 if quick else 10.0
    if args.steps is None:
        args.steps = 2 if quick else 3
    if args.batch is None:
        args.batch = list(DECODE_B)
    return args


def lengths_for(args, default):
    Ts = args.T if args.T is not None else default
    if args.quick and args.T is None:
        Ts = [T for T in Ts if T <= QUICK_MAX_T]
    return Ts


def fmt_T(T):
    return f"{T // 1024}k" if T % 1024 == 0 else str(T)


# ----------------------------------------------------------------------------- model config
def read_assignments(path):
    """Top-level `name = literal` assignments of a nanoGPT-style config file. The file is parsed,
    not executed; assignments whose value is not a literal are skipped."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError):
                continue
    return out


def repo_path(path):
    """path as given if it exists (relative to the working directory), else next to bench.py."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return beside if os.path.exists(beside) else path


def load_model_fields(config_path):
    """GPTConfig fields (less block_size and attention) of the repo's GPU model, as train.py
    would build it: GPTConfig defaults, then train.py's globals, then the config file. Without
    the config file: GPTConfig's defaults (12 layers, 16 query heads, 1 KV head, n_embd 1024,
    D=64, the paper's block sizes). Returns (fields, source)."""
    from model import GPTConfig
    names = [f.name for f in dataclasses.fields(GPTConfig)]
    fields = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    source = "GPTConfig defaults (no " + config_path + ")"
    config_path, train_py = repo_path(config_path), repo_path("train.py")
    if os.path.exists(config_path):
        if os.path.exists(train_py):
            fields.update({k: v for k, v in read_assignments(train_py).items() if k in names})
        fields.update({k: v for k, v in read_assignments(config_path).items() if k in names})
        source = config_path
    for k in ("block_size", "attention"):
        fields.pop(k, None)
    fields["dropout"] = 0.0
    return fields, source


def attention_shape(args):
    """(label, shape dict B/HQ/H/D, NSA hyperparameters) for kernel and decode modes."""
    if args.shape == "paper":
        return "paper", dict(PAPER_SHAPE), dict(PAPER_HP)
    fields, source = load_model_fields(args.config)
    shape = dict(B=1, HQ=fields["n_head"], H=fields["n_kv_head"],
                 D=fields["n_embd"] // fields["n_head"])
    hp = {k: fields[k] for k in PAPER_HP}
    log(f"model shape from {source}: {shape} {hp}")
    return "model", shape, hp


# ----------------------------------------------------------------------------- results
class Recorder:
    """Rows of every measurement; rewrites the JSON file after each row (atomically), so a run
    that is killed keeps everything measured so far."""

    def __init__(self, path, env):
        self.path, self.env, self.rows = path, env, []
        self.save()

    def add(self, row):
        self.rows.append(row)
        self.save()
        log(describe_row(row))
        return row

    def save(self):
        if not self.path:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"env": self.env, "rows": self.rows}, f, indent=1)
        os.replace(tmp, self.path)


def load_results(path):
    with open(path) as f:
        data = json.load(f)
    return data["env"], data["rows"]


def environment():
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + shlex.join(sys.argv),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
        impl = getattr(torch.nn.attention, "current_flash_attention_impl", None)
        if impl is not None:
            env["flash_impl"] = str(impl())
    if hasattr(nk, "TUNING"):
        env["nsa_tuning"] = dict(nk.TUNING)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None  # the working-tree copy on the GPU machine may have no .git
    return env


def fmt_num(x):
    """Three significant figures without exponents: 0.0123, 3.35, 12.9, 852, 3040."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def describe_row(row):
    """One progress line per row."""
    kind = row["kind"]
    head = f"[{kind}]"
    if kind == "check":
        return (f"{head} {row['case']}: out rel {row['out_rel']:.2e} "
                f"(max abs {row['out_max']:.2e}); grad rel worst {row['grad_rel_worst']:.2e} "
                f"({row['grad_worst']}) -> {'OK' if row['ok'] else 'FAIL'}"
                + ("" if row["ok"] else " all grads: " + ", ".join(
                    f"{k} {v:.2e}" for k, v in row["grad_rel"].items())))
    where = " ".join(f"{k}={fmt_T(row[k]) if k == 'T' else row[k]}"
                     for k in ("shape", "T", "B", "impl", "attention", "branch", "pass")
                     if k in row)
    if row["status"] != "ok":
        return f"{head} {where}: {row['status']} {row.get('error', '')[:300]}"
    if kind == "kernel_profile":
        top = sorted(row["groups"].items(), key=lambda kv: -kv[1])
        return f"{head} {where}: " + ", ".join(f"{g} {us / 1000:.2f} ms" for g, us in top)
    if kind in ("train", "train_fit") and row.get("tokens_per_s") is None:
        return f"{head} {where}: fits (peak {row['peak_gib']:.1f} GiB)"
    if kind == "train":
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        return (f"{head} {where}: {row['ms']:.0f} ms/step, {row['tokens_per_s']:.0f} tok/s{mfu}, "
                f"peak {row['peak_gib']:.1f} GiB")
    extra = f", {row['tflops']:.1f} TFLOP/s" if row.get("tflops") else ""
    finite = "" if row.get("finite", True) else ", NON-FINITE OUTPUT"
    return (f"{head} {where}: {fmt_num(row['ms'])} ms ({row['method']} x{row['reps']}){extra}, "
            f"peak {row['peak_gib']:.2f} GiB{finite}")


def markdown_table(headers, lines):
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _cell(row):
    """A time cell: the time in ms, or why there is none."""
    if row is None:
        return "-"
    if row["status"] == "ok":
        return fmt_num(row["ms"])
    return row["status"]


def _ok_ms(row):
    return row["ms"] if row is not None and row["status"] == "ok" else None


def kernel_table(rows):
    """Markdown tables of kernel mode, one per shape: times in ms, speedup of NSA over the
    faster SDPA backend, achieved TFLOP/s (NSA counted as in nsa_flops), peak memory."""
    kernel_rows = [r for r in rows if r["kind"] == "kernel"]
    blocks = []
    for shape in dict.fromkeys(r["shape"] for r in kernel_rows):
        sel = [r for r in kernel_rows if r["shape"] == shape]
        index = {(r["T"], r["impl"], r["pass"]): r for r in sel}
        desc = sel[0]["shape_desc"]
        lines = []
        for T in sorted(dict.fromkeys(r["T"] for r in sel)):
            line = [fmt_T(T)]
            tflops, peaks = [], []
            for pass_ in ("fwd", "fwd+bwd"):
                nsa = index.get((T, "nsa", pass_))
                sdpa = [index.get((T, impl, pass_)) for impl in SDPA_BACKENDS]
                line += [_cell(nsa)] + [_cell(r) for r in sdpa]
                best = min((r for r in sdpa if _ok_ms(r)), key=lambda r: r["ms"], default=None)
                nsa_ms = _ok_ms(nsa)
                line.append(f"{best['ms'] / nsa_ms:.2f}x" if best and nsa_ms else "-")
                tflops.append(f"{fmt_num(nsa['tflops']) if nsa_ms else '-'} / "
                              f"{fmt_num(best['tflops']) if best else '-'}")
                if pass_ == "fwd+bwd":
                    peaks.append(f"{nsa['peak_gib']:.1f}" if nsa_ms else "-")
                    peaks.append(f"{best['peak_gib']:.1f}" if best else "-")
            line += tflops + [" / ".join(peaks)]
            lines.append(line)
        headers = ["T", "NSA fwd", "flash fwd", "cuDNN fwd", "fwd speedup", "NSA fwd+bwd",
                   "flash fwd+bwd", "cuDNN fwd+bwd", "fwd+bwd speedup",
                   "TFLOP/s fwd NSA / SDPA", "TFLOP/s fwd+bwd NSA / SDPA",
                   "peak GiB fwd+bwd NSA / SDPA"]
        blocks.append(f"Attention alone, {desc}; times in ms (median), speedup = faster SDPA "
                      f"backend / NSA\n\n" + markdown_table(headers, lines))
    return "\n\n".join(blocks)


BRANCHES = ("compressed", "selection", "selected", "window")


def branch_table(rows):
    """Each NSA branch timed alone, in ms and as a share of the whole nsa_attention call; the
    rest (gates/combine kernels, casts, launch gaps) is the whole minus the branches."""
    whole = {(r["shape"], r["T"], r["pass"]): r for r in rows
             if r["kind"] == "kernel" and r["impl"] == "nsa" and r["status"] == "ok"}
    parts = {}
    for r in rows:
        if r["kind"] == "branch" and r["status"] == "ok":
            parts.setdefault((r["shape"], r["T"], r["pass"]), {})[r["branch"]] = r
    lines = []
    for key in sorted(parts, key=lambda k: (k[0], k[2], k[1])):
        shape, T, pass_ = key
        total = whole.get(key)
        line = [shape, fmt_T(T), pass_]
        # selection has no backward: inside a fwd+bwd call it costs its forward
        used = dict(parts[key])
        if "selection" not in used and "selection" in parts.get((shape, T, "fwd"), {}):
            used["selection"] = parts[(shape, T, "fwd")]["selection"]
        for b in BRANCHES:
            r = used.get(b)
            if r is None:
                line.append("-")
            elif total:
                line.append(f"{fmt_num(r['ms'])} ({100 * r['ms'] / total['ms']:.0f}%, "
                            f"{fmt_num(r['tflops'])} TF/s)")
            else:
                line.append(f"{fmt_num(r['ms'])} ({fmt_num(r['tflops'])} TF/s)")
        if total:
            rest = total["ms"] - sum(r["ms"] for r in used.values())
            line += [f"{fmt_num(rest) if rest >= 0 else '<0'} ({100 * rest / total['ms']:.0f}%)",
                     fmt_num(total["ms"])]
        else:
            line += ["-", "-"]
        lines.append(line)
    if not lines:
        return ""
    headers = ["shape", "T", "pass", "compressed", "selection (top-n)", "selected", "window",
               "gates/combine + rest", "nsa_attention"]
    return ("NSA branches timed alone through nsa_kernels' entry points (ms, share of the "
            "whole call, TFLOP/s); selection has no backward, its forward is counted in fwd+bwd"
            "\n\n" + markdown_table(headers, lines))


def profile_table(rows):
    """GPU kernel time inside one nsa_attention call, grouped by kernel name (largest T)."""
    prof = [r for r in rows if r["kind"] == "kernel_profile" and r["status"] == "ok"]
    if not prof:
        return ""
    T_max = max(r["T"] for r in prof)
    lines = []
    for r in (r for r in prof if r["T"] == T_max):
        total = sum(r["kernels"].values()) or 1.0
        for name, us in sorted(r["kernels"].items(), key=lambda kv: -kv[1]):
            if us < 0.01 * total:
                continue
            lines.append([r["shape"], fmt_T(r["T"]), r["pass"], name[:48],
                          kernel_group(name), f"{us / 1000:.3f}", f"{100 * us / total:.1f}%"])
    headers = ["shape", "T", "pass", "GPU kernel", "branch", "ms", "share"]
    return ("GPU kernels inside one nsa_attention call (torch.profiler, by name, >= 1%)\n\n"
            + markdown_table(headers, lines))


def decode_table(rows):
    sel = [r for r in rows if r["kind"] == "decode"]
    if not sel:
        return ""
    index = {(r["B"], r["T"], r["impl"]): r for r in sel}
    impls = list(dict.fromkeys(r["impl"] for r in sel))
    nsa_impls = [i for i in impls if i.startswith("nsa")]
    lines = []
    for B, T in sorted(dict.fromkeys((r["B"], r["T"]) for r in sel)):
        any_row = next(r for r in sel if r["B"] == B and r["T"] == T)
        line = [B, fmt_T(T)]
        for impl in impls:
            r = index.get((B, T, impl))
            line.append(fmt_num(r["ms"] * 1000) if r and r["status"] == "ok"
                        else (r["status"] if r else "-"))
        best_sdpa = min((index[(B, T, i)]["ms"] for i in SDPA_BACKENDS
                         if (B, T, i) in index and index[(B, T, i)]["status"] == "ok"),
                        default=None)
        best_nsa = min((index[(B, T, i)]["ms"] for i in nsa_impls
                        if (B, T, i) in index and index[(B, T, i)]["status"] == "ok"),
                       default=None)
        line.append(f"{best_sdpa / best_nsa:.2f}x" if best_sdpa and best_nsa else "-")
        kv = any_row.get("kv_bytes")
        line.append(f"{kv / (best_sdpa * 1e-3) / 1e12:.2f}" if kv and best_sdpa else "-")
        line += [f"{any_row['tokens_read_nsa']:.0f}", T,
                 f"{T / any_row['tokens_read_nsa']:.1f}x"]
        lines.append(line)
    headers = (["B", "T"] + [f"{IMPL_LABEL.get(i, i)} us" for i in impls]
               + ["SDPA / NSA", "SDPA KV TB/s", "tokens read NSA", "tokens read full",
                  "model ratio"])
    return (f"One decoding step, one layer, {sel[0]['shape_desc']}: us per token (median); "
            f"tokens read per step per KV head by the paper's model (T-l)/d + n*l' + w vs T\n\n"
            + markdown_table(headers, lines))


def train_table(rows):
    sel = [r for r in rows if r["kind"] in ("train", "train_fit")]
    if not sel:
        return ""
    order = list(dict.fromkeys(r["attention"] for r in sel))
    sel = sorted(sel, key=lambda r: (order.index(r["attention"]), r["T"]))
    full_ms = {r["T"]: r["ms"] for r in sel if r["attention"] == "full" and r.get("ms")}
    lines = []
    for r in sel:
        if r["status"] != "ok":
            lines.append([r["attention"], fmt_T(r["T"]), r["status"], "-", "-", "-", "-"])
        elif r.get("tokens_per_s") is None:
            lines.append([r["attention"], fmt_T(r["T"]), "fits (1 step)", "-", "-", "-",
                          f"{r['peak_gib']:.1f}"])
        else:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            vs = (f"{full_ms[r['T']] / r['ms']:.2f}x"
                  if r["attention"] != "full" and r["T"] in full_ms else "-")
            lines.append([r["attention"], fmt_T(r["T"]), f"{r['ms']:.0f}",
                          f"{r['tokens_per_s']:.0f}", vs, mfu, f"{r['peak_gib']:.1f}"])
    largest = []
    for att in dict.fromkeys(r["attention"] for r in sel):
        ok = [r["T"] for r in sel if r["attention"] == att and r["status"] == "ok"]
        oom = [r["T"] for r in sel if r["attention"] == att and r["status"] == "OOM"]
        if ok:
            bound = (" (search bound)" if max(ok) >= TRAIN_MAX_T
                     else (" (next OOM)" if oom else " (search stopped)"))
            largest.append(f"{att}: {fmt_T(max(ok))}{bound}")
        else:
            largest.append(f"{att}: none")
    headers = ["attention", "T", "ms/step", "tokens/s", "speedup vs full", "MFU", "peak GiB"]
    return (f"Training step (fwd+bwd+AdamW, bf16 autocast, batch 1), {sel[0]['model_desc']}\n\n"
            + markdown_table(headers, lines)
            + "\n\nLargest context that fits: " + "; ".join(largest))


def check_lines(rows):
    return [describe_row(r) for r in rows if r["kind"] == "check"]


def all_tables(rows):
    # the most important last: a reader who sees only the tail of the output gets those
    parts = ["\n".join(check_lines(rows)), profile_table(rows), branch_table(rows),
             kernel_table(rows), decode_table(rows), train_table(rows)]
    return "\n\n".join(p for p in parts if p)


def plot_kernel(rows, path):
    """Log-log time vs T, forward and forward+backward, NSA and each SDPA backend."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"note: matplotlib is not importable, no plot written to {path}")
        return False
    kernel_rows = [r for r in rows if r["kind"] == "kernel" and r["status"] == "ok"]
    if not kernel_rows:
        log("note: no kernel rows measured, no plot")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, pass_ in zip(axes, ("fwd", "fwd+bwd")):
        for shape in dict.fromkeys(r["shape"] for r in kernel_rows):
            for impl in ("nsa", *SDPA_BACKENDS):
                pts = sorted((r["T"], r["ms"]) for r in kernel_rows
                             if r["shape"] == shape and r["impl"] == impl and r["pass"] == pass_)
                if pts:
                    label = IMPL_LABEL[impl] + ("" if shape == "paper" else f" ({shape})")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        Ts = sorted(dict.fromkeys(r["T"] for r in kernel_rows))
        ax.set_xticks(Ts)
        ax.set_xticklabels([fmt_T(T) for T in Ts])
        ax.set_xlabel("context T (tokens)")
        ax.set_ylabel("time (ms)")
        ax.set_title(f"attention {pass_}, {kernel_rows[0]['shape_desc']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written to {path}")
    return True


# ----------------------------------------------------------------------------- timing
class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left_ms(self):
        return 1000 * (self.end - time.monotonic())


def event_time_ms(fn):
    """One call of fn timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def do_bench_median(fn, warmup, rep):
    if "return_mode" in inspect.signature(triton.testing.do_bench).parameters:
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0]


def all_finite(result):
    if isinstance(result, torch.Tensor):
        return bool(torch.isfinite(result).all())
    if isinstance(result, (tuple, list)):
        return all(all_finite(x) for x in result if x is not None)
    return True


def measure(fn, args, deadline):
    """Median time of fn in ms. The first call warms up (compilation, autotuning, cuDNN plans)
    and gives the peak memory; a second call, timed, decides how: do_bench when a call is short
    enough for it to get >= 5 repetitions, else CUDA events around each of 3-10 calls in a
    LONG_REP_MS window, fewer when the row budget or the mode's deadline would be overrun."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    finite = all_finite(result)
    del result
    est = max(event_time_ms(fn), 1e-3)
    if est * 5 <= args.rep:
        ms, method = do_bench_median(fn, args.warmup, args.rep), "do_bench"
        reps = max(1, int(args.rep / est))      # about what do_bench ran
    else:
        n = min(MAX_LONG_REPS, max(MIN_LONG_REPS, int(LONG_REP_MS / est)))
        n = min(n, 1 + int((1000 * args.row_budget - 2 * est) / est),
                1 + int(deadline.left_ms() / est))
        times = [est] + [event_time_ms(fn) for _ in range(max(1, n) - 1)]
        ms, method, reps = statistics.median(times), "events", len(times)
    return dict(ms=ms, method=method, reps=reps, peak_gib=peak / 2**30, finite=finite)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def is_fatal(err):
    """Errors after which the CUDA context cannot be used any more."""
    msg = str(err).lower()
    return any(s in msg for s in ("illegal memory access", "illegal instruction",
                                  "unspecified launch failure", "misaligned address",
                                  "device-side assert"))


class Predictor:
    """Predicts a row's time from the same (impl, pass) at smaller T, to skip rows that would
    overrun the mode's budget: ms grows as T^p, p fitted on the last two sizes (in [1, 2.2]),
    else 2 (attention's worst case)."""

    def __init__(self):
        self.seen = {}

    def add(self, key, T, ms):
        self.seen.setdefault(key, []).append((T, ms))

    def predict(self, key, T):
        pts = self.seen.get(key)
        if not pts:
            return None
        (T1, ms1) = pts[-1]
        p = 2.0
        if len(pts) >= 2 and pts[-2][0] != T1 and pts[-2][1] > 0:
            T0, ms0 = pts[-2]
            p = min(2.2, max(1.0, math.log(ms1 / ms0) / math.log(T1 / T0)))
        return ms1 * (T / T1) ** p


def run_row(rec, base, make_fn, args, deadline, predictor=None, key=None, flops=None):
    """Measure one row: make_fn() builds inputs and returns the callable to time. Records 'OOM',
    'unsupported' (an SDPA backend refusing), 'error' or 'skipped' instead of a time; raises
    FatalCudaError when the CUDA context is gone."""
    row = dict(base)
    T = base.get("T")
    predicted = predictor.predict(key, T) if predictor is not None else None
    # the warm-up plus one timed call are the least a row costs
    if predicted is not None and 2 * predicted > deadline.left_ms():
        row.update(status="skipped",
                   error=f"time budget: predicted {predicted / 1000:.1f} s per call, "
                         f"{max(0, deadline.left_ms()) / 1000:.0f} s left (--budget)")
        return rec.add(row)
    if deadline.left_ms() <= 0:
        row.update(status="skipped", error="time budget exhausted (--budget)")
        return rec.add(row)
    fatal = None
    # keep each distinct warning once (an SDPA backend's refusal says why in warnings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            fn = make_fn()
            row.update(measure(fn, args, deadline), status="ok")
            del fn
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="OOM", error=str(e).split("\n")[0][:300])
        except ROW_ERRORS as e:
            msg = f"{type(e).__name__}: {e}"
            reasons = "; ".join(str(w.message) for w in caught)[:1500]
            refused = ("no available kernel" in msg.lower() or "cudnn" in msg.lower())
            row.update(status="unsupported" if base.get("impl", "").startswith("sdpa")
                       and refused else "error",
                       error=(msg[:1500] + (f" [warnings: {reasons}]" if reasons else "")))
            if is_fatal(e):
                fatal = msg
        if caught:
            row["warnings"] = "; ".join(dict.fromkeys(str(w.message) for w in caught))[:1500]
    free_memory()
    if row["status"] == "ok":
        if flops is not None:
            row["flops"] = flops
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        if predictor is not None:
            predictor.add(key, T, row["ms"])
    rec.add(row)
    if fatal:
        raise FatalCudaError(fatal)
    return row


# ----------------------------------------------------------------------------- inputs
def nsa_inputs(B, T, HQ, H, D, hp, dtype=torch.bfloat16, requires_grad=True, Tq=None,
               dev="cuda"):
    """Random NSA inputs (normal, gates uniform in [0, 1]): q [B, Tq, HQ, D] for the last Tq
    positions, k, v [B, T, H, D], k_cmp, v_cmp [B, Tc, H, D], gates [B, Tq, HQ]."""
    Tq = T if Tq is None else Tq
    Tc = nk.num_compressed_blocks(T, hp["block_len"], hp["block_stride"])
    xs = [torch.randn(B, Tq, HQ, D, device=dev, dtype=dtype),
          torch.randn(B, T, H, D, device=dev, dtype=dtype),
          torch.randn(B, T, H, D, device=dev, dtype=dtype),
          torch.randn(B, Tc, H, D, device=dev, dtype=dtype),
          torch.randn(B, Tc, H, D, device=dev, dtype=dtype)]
    xs += [torch.rand(B, Tq, HQ, device=dev, dtype=dtype) for _ in range(3)]
    return [x.requires_grad_(requires_grad) for x in xs]


def sdpa_backend(impl):
    """The SDPBackend enum member of an impl name, or None if this torch lacks it."""
    return getattr(torch.nn.attention.SDPBackend, SDPA_BACKENDS[impl], None)


def sdpa_call(q, k, v, backend, causal):
    """SDPA on the model's [B, T, heads, D] layout (as model.full_attention calls it), GQA."""
    with torch.nn.attention.sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=causal,
                                              enable_gqa=True)


# ----------------------------------------------------------------------------- NSA entry points
# Every call into nsa_kernels beyond nsa_attention / nsa_attention_ref goes through the
# functions in this section, so an API change is fixed in one place.

def kernel_refusal(xs):
    """Why nsa_attention would run the PyTorch reference instead of the Triton kernels on these
    inputs (it falls back silently after one warning), or None if it runs the kernels."""
    q, k = xs[0], xs[1]
    if not getattr(nk, "_use_triton", lambda q: q.is_cuda)(q):
        return "nsa_kernels does not use Triton for these inputs"
    reason = getattr(nk, "_kernel_unsupported", lambda q, k: None)(q, k)
    return None if reason is None else f"nsa_attention would run the reference: {reason}"


def has_branch_entry_points():
    return all(hasattr(nk, name) for name in ("compressed_attention", "nsa_select",
                                              "selected_attention", "window_attention"))


def nsa_branch_fns(xs, hp, do):
    """{branch: {pass: callable}} running one NSA branch alone through nsa_kernels' per-branch
    entry points, on the inputs xs of nsa_inputs (requires_grad) and upstream gradient do. The
    selection runs on the lse of a compressed forward and feeds the selected branch its blocks."""
    q, k, v, k_cmp, v_cmp = xs[:5]
    cmp_kw = dict(block_len=hp["block_len"], block_stride=hp["block_stride"])
    sel_kw = dict(cmp_kw, select_block=hp["select_block"], n_select=hp["n_select"])
    with torch.no_grad():
        _, lse = nk.compressed_attention(q, k_cmp, v_cmp, **cmp_kw)
        idx = nk.nsa_select(q, k_cmp, lse, **sel_kw)

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    def with_grad(f, inputs):
        def run():
            return torch.autograd.grad(f(), inputs, do)
        return run

    cmp = lambda: nk.compressed_attention(q, k_cmp, v_cmp, **cmp_kw)[0]
    slc = lambda: nk.selected_attention(q, k, v, idx, select_block=hp["select_block"])
    win = lambda: nk.window_attention(q, k, v, window=hp["window"])
    return {
        "compressed": {"fwd": no_grad(cmp), "fwd+bwd": with_grad(cmp, (q, k_cmp, v_cmp))},
        "selection": {"fwd": no_grad(lambda: nk.nsa_select(q, k_cmp, lse, **sel_kw))},
        "selected": {"fwd": no_grad(slc), "fwd+bwd": with_grad(slc, (q, k, v))},
        "window": {"fwd": no_grad(win), "fwd+bwd": with_grad(win, (q, k, v))},
    }


def nsa_decode_fns(hp):
    """{impl: f(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win)} for one decoding step (q: the last
    position). nsa_ref is what model.py's decode path calls; nsa_decode is a kernel, if
    nsa_kernels has one with the reference's signature."""
    fns = {"nsa_ref": lambda *xs: nk.nsa_attention_ref(*xs, **hp)}
    if hasattr(nk, "nsa_decode"):
        fns["nsa_decode"] = lambda *xs: nk.nsa_decode(*xs, **hp)
    return fns


def kernel_group(name):
    """The NSA branch a GPU kernel belongs to, from its name (Triton kernels are named after
    their @triton.jit function; torch's own kernels fall in 'other')."""
    n = name.lower()
    if "::" in n or "(" in n or " " in n:   # a C++ kernel of torch, cub or cuDNN
        return "other (torch ops)"
    for group, keys in (("gates/combine", ("combine", "gate")),
                        ("selection", ("select", "topk", "top_n")),
                        ("selected", ("slc", "selected")),
                        ("compressed", ("cmp", "compress")),
                        ("window", ("win",)),
                        ("compressed+window (shared kernel)", ("dense",))):
        if any(key in n for key in keys):
            return group
    return "other (torch ops)"


def profile_kernels(fn):
    """GPU time per kernel name (us) of one call of fn, from torch.profiler's trace."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    kernels = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels[e["name"]] = kernels.get(e["name"], 0.0) + float(e.get("dur", 0.0))
    if not kernels and cuda:  # another trace format: the profiler's device-side events
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name] = kernels.get(e.name, 0.0) + float(e.device_time_total)
    return kernels


# ----------------------------------------------------------------------------- correctness
def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30)), float((x - ref).abs().max())


def check_correctness(rec, shape, hp, dev="cuda", dtype=torch.bfloat16, cases=None):
    """nsa_attention (Triton, bf16) against nsa_attention_ref (fp32 on the same inputs upcast),
    forward and every input's gradient, on two small shapes with fresh random inputs: batch 2,
    T=2960 (long enough that top-n discards blocks, not a multiple of l or l'), 16 query heads
    sharing 1 KV head; and the benchmark's heads at T=2480. T stays a multiple of 16 like the
    benchmark's sizes, so Triton's integer specialisations (and compilations) mostly carry over.
    Returns True if all pass."""
    cases = cases or [(2, 2960, 16, 1, 64), (1, 2480, shape["HQ"], shape["H"], shape["D"])]
    ok = True
    for B, T, HQ, H, D in cases:
        where = f"check B={B} T={T} HQ={HQ} H={H} D={D}"
        try:
            ok = check_case(rec, B, T, HQ, H, D, hp, dev, dtype) and ok
        except torch.cuda.OutOfMemoryError as e:
            raise CheckFailed(f"{where}: out of memory: {str(e)[:300]}") from e
        except ROW_ERRORS as e:
            if is_fatal(e):
                raise FatalCudaError(f"{where}: {type(e).__name__}: {e}") from e
            raise CheckFailed(f"{where}: {type(e).__name__}: {str(e)[:1000]}") from e
        free_memory()
    return ok


def check_case(rec, B, T, HQ, H, D, hp, dev, dtype):
    """One shape of check_correctness; records a 'check' row and returns whether it passed."""
    torch.manual_seed(1000 + T)
    xs = nsa_inputs(B, T, HQ, H, D, hp, dtype=dtype, dev=dev)
    refusal = kernel_refusal(xs)
    if refusal is not None:
        raise CheckFailed(f"check B={B} T={T} HQ={HQ} H={H} D={D}: {refusal}")
    ref_xs = [x.detach().float().requires_grad_() for x in xs]
    out = nk.nsa_attention(*xs, **hp)
    ref = nk.nsa_attention_ref(*ref_xs, **hp)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, do, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_xs, do.float())
    out_rel, out_max = rel_err(out, ref)
    finite = bool(torch.isfinite(out).all())
    grad_rel = {}
    for name, g, rg in zip(NSA_INPUT_NAMES, grads, ref_grads):
        if g is None or not bool(torch.isfinite(g).all()):
            grad_rel[name] = float("inf")
        else:
            grad_rel[name] = rel_err(g, rg)[0]
    worst = max(grad_rel, key=grad_rel.get)
    passed = finite and out_rel < CHECK_TOL_OUT and grad_rel[worst] < CHECK_TOL_GRAD
    rec.add(dict(kind="check", case=f"B={B} T={T} HQ={HQ} H={H} D={D} {hp}", ok=passed,
                 out_rel=out_rel, out_max=out_max, grad_rel=grad_rel,
                 grad_rel_worst=grad_rel[worst], grad_worst=worst,
                 tol_out=CHECK_TOL_OUT, tol_grad=CHECK_TOL_GRAD))
    return passed


# ----------------------------------------------------------------------------- kernel mode
def run_kernel(args, rec):
    deadline = Deadline(args.budget or MODE_BUDGET_S["kernel"])
    label, shape, hp = attention_shape(args)
    B, HQ, H, D = shape["B"], shape["HQ"], shape["H"], shape["D"]
    desc = (f"B={B} HQ={HQ} H={H} D={D} bf16 causal, l={hp['block_len']} d={hp['block_stride']} "
            f"l'={hp['select_block']} n={hp['n_select']} w={hp['window']}")
    log(f"== kernel: {desc}")
    if not args.no_check:
        t0 = time.monotonic()
        if not check_correctness(rec, shape, hp):
            raise CheckFailed("nsa_attention disagrees with nsa_attention_ref (see the "
                              "[check] lines); no kernel timings taken")
        log(f"check passed in {time.monotonic() - t0:.0f} s (includes Triton compilation)")
    predictor = Predictor()
    branches = has_branch_entry_points()
    if not branches:
        log("note: nsa_kernels has no per-branch entry points; only the profile splits NSA")
    for T in lengths_for(args, KERNEL_T):
        base = dict(kind="kernel", shape=label, shape_desc=desc, T=T, B=B, HQ=HQ, H=H, D=D)
        holder = {}

        def make_nsa():
            holder["xs"] = xs = nsa_inputs(B, T, HQ, H, D, hp)
            holder["do"] = torch.randn_like(xs[0])
            return xs

        # NSA: whole call, then each branch alone, then a profile of the whole call
        for pass_ in ("fwd", "fwd+bwd"):
            def make(pass_=pass_):
                xs = holder.get("xs") or make_nsa()
                refusal = kernel_refusal(xs)
                if refusal is not None:
                    raise NotImplementedError(refusal)
                if pass_ == "fwd":
                    def fwd():
                        with torch.no_grad():
                            return nk.nsa_attention(*xs, **hp)
                    return fwd
                do = holder["do"]
                return lambda: torch.autograd.grad(nk.nsa_attention(*xs, **hp), xs, do)
            run_row(rec, dict(base, impl="nsa", **{"pass": pass_}), make, args, deadline,
                    predictor, ("nsa", pass_), nsa_flops(B, T, HQ, D, hp, pass_))
        # the branches and the profile only where the whole call ran the kernels
        kernels_ran = "xs" in holder and kernel_refusal(holder["xs"]) is None
        if branches and kernels_ran:
            fns = {}
            for branch in BRANCHES:
                for pass_ in ("fwd", "fwd+bwd"):
                    def make_branch(branch=branch, pass_=pass_):
                        if not fns:
                            fns.update(nsa_branch_fns(holder["xs"], hp, holder["do"]))
                        return fns[branch][pass_]
                    if branch == "selection" and pass_ == "fwd+bwd":
                        continue
                    run_row(rec, dict(base, kind="branch", branch=branch, **{"pass": pass_}),
                            make_branch, args, deadline, predictor, (branch, pass_),
                            nsa_branch_flops(B, T, HQ, D, hp, branch, pass_))
            fns.clear()
        if kernels_ran:
            # a profiled call costs about two timed ones (one unprofiled warm-up)
            last = predictor.predict(("nsa", "fwd+bwd"), T)
            for pass_ in ("fwd", "fwd+bwd"):
                run_profile(rec, dict(base, kind="kernel_profile", **{"pass": pass_}),
                            holder["xs"], holder["do"], hp, pass_, deadline, last)
        holder.clear()
        free_memory()

        # SDPA, each backend this torch has
        sdpa_holder = {}

        def make_sdpa():
            q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            sdpa_holder["x"] = (q, k, v, torch.randn(B, HQ, T, D, device="cuda",
                                                     dtype=torch.bfloat16))
            return sdpa_holder["x"]

        for impl in SDPA_BACKENDS:
            backend = sdpa_backend(impl)
            for pass_ in ("fwd", "fwd+bwd"):
                row_base = dict(base, impl=impl, **{"pass": pass_})
                if backend is None:
                    rec.add(dict(row_base, status="unsupported",
                                 error=f"this torch has no SDPBackend.{SDPA_BACKENDS[impl]}"))
                    continue

                def make(pass_=pass_, backend=backend):
                    q, k, v, do = sdpa_holder.get("x") or make_sdpa()
                    if pass_ == "fwd":
                        def fwd():
                            with torch.no_grad():
                                return sdpa_call(q, k, v, backend, causal=True)
                        return fwd
                    return lambda: torch.autograd.grad(sdpa_call(q, k, v, backend, True),
                                                       (q, k, v), do)
                run_row(rec, row_base, make, args, deadline, predictor, (impl, pass_),
                        sdpa_flops(B, T, HQ, D, pass_))
        sdpa_holder.clear()
        free_memory()


def run_profile(rec, base, xs, do, hp, pass_, deadline, call_ms=None):
    """One nsa_attention call under torch.profiler: GPU time per kernel name and per branch."""
    row = dict(base)
    if deadline.left_ms() <= 2 * (call_ms or 0):
        return rec.add(dict(row, status="skipped", error="time budget (--budget)"))
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return nk.nsa_attention(*xs, **hp)
    else:
        def fn():
            return torch.autograd.grad(nk.nsa_attention(*xs, **hp), xs, do)
    try:
        kernels = profile_kernels(fn)
        groups = {}
        for name, us in kernels.items():
            groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + us
        row.update(status="ok", kernels=kernels, groups=groups)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).split("\n")[0][:300])
    except ROW_ERRORS as e:
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:1500])
    free_memory()
    return rec.add(row)


# ----------------------------------------------------------------------------- decode mode
def run_decode(args, rec):
    deadline = Deadline(args.budget or MODE_BUDGET_S["decode"])
    label, shape, hp = attention_shape(args)
    HQ, H, D = shape["HQ"], shape["H"], shape["D"]
    desc = f"HQ={HQ} H={H} D={D} bf16, KV cache [B, T, H, D]"
    log(f"== decode: {desc}; NSA impls {list(nsa_decode_fns(hp))}")
    predictor = Predictor()
    for B in args.batch:
        for T in lengths_for(args, DECODE_T):
            # kv_bytes: the least full attention reads per step (each cached k and v once)
            base = dict(kind="decode", shape=label, shape_desc=desc, T=T, B=B, HQ=HQ, H=H, D=D,
                        tokens_read_nsa=decode_tokens_read(T, **hp), tokens_read_full=T,
                        kv_bytes=2 * B * T * H * D * 2)
            holder = {}

            def make_inputs():
                if "xs" not in holder:
                    holder["xs"] = nsa_inputs(B, T, HQ, H, D, hp, requires_grad=False, Tq=1)
                return holder["xs"]

            for impl, f in nsa_decode_fns(hp).items():
                def make(f=f):
                    xs = make_inputs()
                    def step():
                        with torch.no_grad():
                            return f(*xs)
                    return step
                run_row(rec, dict(base, impl=impl), make, args, deadline, predictor, (impl, B))
            for impl in SDPA_BACKENDS:
                backend = sdpa_backend(impl)
                if backend is None:
                    rec.add(dict(base, impl=impl, status="unsupported",
                                 error=f"this torch has no SDPBackend.{SDPA_BACKENDS[impl]}"))
                    continue

                def make(backend=backend):
                    q, k, v = make_inputs()[:3]
                    def step():
                        with torch.no_grad():
                            return sdpa_call(q, k, v, backend, causal=False)
                    return step
                run_row(rec, dict(base, impl=impl), make, args, deadline, predictor, (impl, B))
            holder.clear()
            free_memory()


# ----------------------------------------------------------------------------- train mode
def run_train(args, rec):
    from model import GPT, GPTConfig
    deadline = Deadline(args.budget or MODE_BUDGET_S["train"])
    fields, source = load_model_fields(args.config)
    peak = peak_flops(torch.cuda.get_device_name(0))
    desc = (f"{fields['n_layer']} layers, n_embd {fields['n_embd']}, {fields['n_head']} query / "
            f"{fields['n_kv_head']} KV heads, from {source}")
    log(f"== train: {desc}; MFU against {peak and f'{peak / 1e12:.0f} TFLOP/s' or 'unknown peak'}")
    Ts = lengths_for(args, TRAIN_T)
    B = 1
    attentions = ("nsa", "full")

    def make_step(T, attention):
        cfg = GPTConfig(block_size=T, attention=attention, **fields)
        with torch.device("cuda"):
            model = GPT(cfg)
        opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4,
                                         betas=(0.9, 0.95), device_type="cuda")
        x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

        def step():
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, step

    # contexts outer, attentions inner: a slow variant cannot starve the other of the budget
    predictor = Predictor()
    fit = {a: [] for a in attentions}
    stopped = set()   # variants that ran out of memory: larger contexts will too
    for T in Ts:
        for attention in attentions:
            if attention in stopped:
                continue
            row = train_row(rec, dict(kind="train", attention=attention, T=T, B=B,
                                      model_desc=desc), make_step, args, deadline, predictor,
                            peak, timed=True)
            if row["status"] == "ok":
                fit[attention].append(T)
            elif row["status"] == "OOM":
                stopped.add(attention)
    if args.quick:
        return
    # largest context: keep doubling from the largest that ran, one step each
    for attention in attentions:
        T = 2 * max(fit[attention]) if len(fit[attention]) == len(Ts) else None
        while T is not None and T <= TRAIN_MAX_T:
            row = train_row(rec, dict(kind="train_fit", attention=attention, T=T, B=B,
                                      model_desc=desc), make_step, args, deadline, predictor,
                            peak, timed=False)
            T = 2 * T if row["status"] == "ok" else None


def time_train_steps(make_step, T, attention, B, steps, peak):
    """Build the model at context T and run one step (compiles kernels, allocates optimizer
    state), then, if steps > 0, one more warm-up step and `steps` steps timed with CUDA events.
    The model lives only in this call, so an OOM frees it on the way out."""
    torch.cuda.reset_peak_memory_stats()
    model, step = make_step(T, attention)
    out = dict(params=model.get_num_params())
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    out["first_step_s"] = time.perf_counter() - t0
    if steps > 0:
        step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / steps
        out.update(ms=ms, tokens_per_s=B * T / (ms / 1000), steps=steps,
                   mfu=model.estimate_mfu(B, ms / 1000, peak) if peak else None)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def train_row(rec, base, make_step, args, deadline, predictor, peak, timed):
    """One row of train mode: time_train_steps, or with timed=False only whether one step fits;
    'OOM', 'error' or 'skipped' (time budget) instead of numbers."""
    row = dict(base)
    T = base["T"]
    predicted = predictor.predict(base["attention"], T)
    n_steps = (2 + args.steps) if timed else 1
    if deadline.left_ms() <= 0 or (predicted is not None
                                   and n_steps * predicted > deadline.left_ms()):
        row.update(status="skipped", error="time budget (--budget)")
        return rec.add(row)
    fatal = None
    try:
        row.update(time_train_steps(make_step, T, base["attention"], base["B"],
                                    args.steps if timed else 0, peak))
        row["status"] = "ok"
        predictor.add(base["attention"], T, row["ms"] if timed else 1000 * row["first_step_s"])
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="OOM", error=str(e).split("\n")[0][:300])
    except ROW_ERRORS as e:
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:1500])
        if is_fatal(e):
            fatal = str(e)
    free_memory()
    rec.add(row)
    if fatal:
        raise FatalCudaError(fatal)
    return row


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py needs an NVIDIA GPU with CUDA and Triton (torch.cuda.is_available() is "
              "False); the CPU tests of the kernels are `TRITON_INTERPRET=1 python -m pytest`.",
              file=sys.stderr)
        return 2
    rec = Recorder(args.json, environment())
    log(f"{rec.env.get('gpu')} | torch {torch.__version__} | triton {triton.__version__} | "
        f"{rec.env['command']}")
    modes = ["kernel", "decode", "train"] if args.mode == "all" else [args.mode]
    runners = {"kernel": run_kernel, "decode": run_decode, "train": run_train}
    status, failures = 0, []
    try:
        for mode in modes:
            t0 = time.monotonic()
            try:
                runners[mode](args, rec)
            except CheckFailed as e:
                # kernel mode stops here; `all` still runs decode and train (one GPU call)
                failures.append(f"correctness check FAILED, {mode} mode aborted: {e}")
                log(failures[-1])
                status = 1
                continue
            log(f"== {mode} done in {time.monotonic() - t0:.0f} s")
    except FatalCudaError as e:
        failures.append(f"stopped: the CUDA context failed ({str(e)[:300]}); rows so far kept")
        log(failures[-1])
        status = 1
    finally:
        rec.save()
        if args.plot and any(r["kind"] == "kernel" for r in rec.rows):
            plot_kernel(rec.rows, args.plot)
        log("\n" + all_tables(rec.rows))
        for line in failures:
            log("\n" + line)
        if args.json:
            log(f"\nrows written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
