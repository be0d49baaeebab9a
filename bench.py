"""
Benchmarks on one NVIDIA GPU: NSA's Triton kernels against PyTorch's SDPA (flash and cuDNN),
decoding (one layer's step; a whole model's tokens/s) and GPT training, NSA vs full attention.

    python bench.py kernel --json kernel.json --plot kernel.png  # ~4 min on an H200
    python bench.py kernel --G 1 --T 64k      # small GQA groups: HQ = 4*G query heads, H = 4
    python bench.py kernel --shape=model      # the heads of config/train_python_8k_nsa.py
    python bench.py kernel --peers            # also the public fla NSA kernels, if installed
    python bench.py decode --json decode.json                    # ~3 min (estimate)
    python bench.py train --json train.json                      # ~3 min
    python bench.py all --json bench.json                        # the three, ~10 min
    python bench.py kernel --quick                               # T <= 16k, ~1 min

kernel: causal attention, bf16, fwd and fwd+bwd at T = 4k..128k, B=1, HQ=64, H=4, D=128, the
    paper's hyperparameters (nk.PAPER_HP): NSA vs SDPA flash and cuDNN; each NSA branch alone
    beside its floor (cuDNN over the same mean number of keys per query, contiguous); at the
    largest T, the GPU kernels of one nsa_attention call by branch (torch.profiler).
decode: one layer's decoding step, nk.nsa_decode vs SDPA over the whole cache, both replayed
    from CUDA graphs, caches 8k..128k, B = 1 and 16, with the paper's memory model; then a whole
    model (the 8k config's shape, block_size = context) prefilling random tokens and decoding
    through its KVCache, NSA vs full attention.
train: fwd + bwd + AdamW of the GPT (the 32k config's shape, bf16 autocast, batch 1) at
    8k..64k, NSA vs full: tokens/s, MFU, peak memory, the largest context where a step fits.
Correctness is tested by `python -m pytest -q test_nsa.py -k kernels` on the GPU, not here.
Timing: a warm-up call first (compilation, autotuning, cuDNN plans), then the median of
triton.testing.do_bench, or of CUDA-event-timed calls above 20 ms; random inputs.
"""
import argparse
import dataclasses
import gc
import json
import os
import shlex
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import common
import nsa_kernels as nk
from common import fmt_tokens
from model import GPT, DecodeGraph, GPTConfig, KVCache, nsa_key_counts

KERNEL_T = [4096, 8192, 16384, 32768, 65536, 131072]
DECODE_T = [8192, 16384, 32768, 65536, 131072]
TRAIN_T = [8192, 16384, 32768, 65536]
QUICK_MAX_T, FIT_MAX_T = 16384, 131072   # --quick's longest context; train's fit search's
DECODE_B = [1, 16]
MODEL_CONFIG = "config/train_python_8k_nsa.py"    # --shape=model, and decode's whole model
TRAIN_CONFIG = "config/train_python_32k_nsa.py"
PASSES = ("fwd", "fwd+bwd")
SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
BRANCHES = ("compressed", "selection", "selected", "window")
LABEL = {"nsa": "NSA", "flash": "flash", "cudnn": "cuDNN", "fla": "fla"}
# GPU kernels by name, first match wins (Triton kernels are named after their @triton.jit
# function; the C++ kernels of torch, cub and cuDNN, with "::" or "(" in the name, are "other")
KERNEL_GROUPS = {"combine": "gates/combine", "gate": "gates/combine", "select": "selection",
                 "topk": "selection", "slc": "selected", "cmp": "compressed",
                 "compress": "compressed", "win": "window", "dense": "compressed+window"}
# Failures that end one measurement, not the run (a CUDA error ends it: the context is gone)
ROW_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError,
              CompilationError, OutOfResources)


def attention_flops(B, HQ, D, pairs, pass_):
    """Matmul FLOPs over `pairs` (query, key) pairs per head: q.k and p.v forward (4*D); a
    flash-style backward recomputes q.k and forms dp, dv, dq, dk (10*D more)."""
    return B * HQ * D * pairs * (4 if pass_ == "fwd" else 14)


def nsa_flops(B, T, HQ, D, hp, pass_, branch=None):
    """FLOPs of nsa_attention, or of one branch, on model.nsa_key_counts' keys; the selection
    recomputes q.k_cmp (2*D per compressed key, forward only)."""
    c = nsa_key_counts(T, **hp)
    scoring = 2 * B * HQ * D * c["compressed"]
    if branch is not None:
        return scoring if branch == "selection" else attention_flops(B, HQ, D, c[branch], pass_)
    return attention_flops(B, HQ, D, c["compressed"] + c["selected"] + c["window"], pass_) + scoring


def decode_tokens_read(T, hp):
    """Tokens whose key and value one decoding step reads per KV head, the paper's memory model:
    (T - l)/d compressed + n*l' selected + w window, at most T (full attention: T)."""
    return min(T, (T - hp["block_len"]) / hp["block_stride"] + hp["n_select"] * hp["select_block"]
               + hp["window"])


# ----------------------------------------------------------------------------- settings
def parse_lengths(text):
    """'4k,8192,128k' -> [4096, 8192, 131072]."""
    try:
        return common.parse_tokens(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths are positive, like 4k,8192,128k; got "
                                         f"{text!r}") from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through common.run_cli, not usage and exit(2)
        raise common.UserError(message)


def parse_args(argv):
    p = Parser(prog="bench.py", description="nanoNSA benchmarks (one NVIDIA GPU)", epilog=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["kernel", "decode", "train", "all"])
    p.add_argument("--T", type=parse_lengths, help="contexts, e.g. 4k,64k (default per mode)")
    p.add_argument("--quick", action="store_true", help="a smoke test: T <= 16k, fewer steps")
    p.add_argument("--shape", choices=["paper", "model"], default="paper",
                   help=f"kernel/decode heads: the paper's (64/4, D=128) or {MODEL_CONFIG}'s")
    p.add_argument("--G", type=int, help="kernel/decode: query heads per KV head (HQ=4*G, H=4)")
    p.add_argument("--peers", action="store_true", help="kernel: also fla's NSA, if installed")
    p.add_argument("--json", help="write the environment and every measurement here")
    p.add_argument("--plot", help="kernel: log-log plot of time vs T (PNG, needs matplotlib)")
    args = p.parse_args(argv)
    if args.G is not None and (args.G < 1 or args.shape == "model"):
        raise common.UserError(f"--G must be >= 1, with --shape=paper; got {args.G}")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(
                os.path.abspath(path)))):
            raise common.UserError(f"{flag} {path}: not a file name in an existing folder")
    if args.plot:
        common.pyplot()
    return args


def lengths(args, default):
    return args.T or [T for T in default if T <= QUICK_MAX_T or not args.quick]


def model_fields(path):
    """GPTConfig's fields as a config file sets them (its other settings are train.py's)."""
    values = common.read_config(os.path.join(common.ROOT, path))
    return {f.name: values.get(f.name, f.default) for f in dataclasses.fields(GPTConfig)}


def attention_shape(args):
    """(HQ, H, D, NSA hyperparameters) of kernel and decode modes."""
    if args.shape == "model":
        f = model_fields(MODEL_CONFIG)
        return f["n_head"], f["n_kv_head"], f["n_embd"] // f["n_head"], \
            {k: f[k] for k in nk.PAPER_HP}
    return 4 * (args.G or 16), 4, 128, dict(nk.PAPER_HP)


# ----------------------------------------------------------------------------- results
class Results:
    """The tables' rows: each a dict of settings plus one entry per measurement. The JSON file
    is rewritten (atomically) after every measurement, so a killed run keeps what it measured."""

    def __init__(self, path, argv):
        self.path, self.rows = path, []
        self.env = dict(common.environment(), command=shlex.join(["python", "bench.py", *argv]))
        self.save()

    def row(self, kind, **settings):
        self.rows.append(dict(kind=kind, **settings))
        return self.rows[-1]

    def measure(self, row, name, work, **info):
        """row[name] = info, work()'s dict and status 'ok'; or 'OOM', 'unsupported' or 'error'
        and why."""
        entry = dict(info)
        try:
            entry.update(work(), status="ok")
        except torch.cuda.OutOfMemoryError as e:
            entry.update(status="OOM", error=str(e).split("\n")[0][:300])
        except ROW_ERRORS as e:
            msg = f"{type(e).__name__}: {e}".split("\n")[0][:500]
            if "CUDA error" in msg:
                raise
            entry.update(status="unsupported" if "No available kernel" in msg else "error",
                         error=msg)
        row[name] = entry
        if torch.cuda.is_initialized():  # free what the measurement left, cycles included
            gc.collect()
            torch.cuda.empty_cache()
        self.save()
        where = " ".join(f"{k}={row[k]}" for k in ("kind", "B", "T", "pass") if k in row)
        print(f"{where} {name}: {cell(entry)} {entry.get('error', '')}", flush=True)
        return entry

    def save(self):
        if self.path:
            common.atomic_write(self.path, lambda f: json.dump(
                {"env": self.env, "rows": self.rows}, f, indent=1), mode="w")


# ----------------------------------------------------------------------------- tables
def fmt(x):
    """Three significant figures, no exponent: 0.0123, 3.35, 12.9, 852, 3040."""
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def ms(entry):
    return entry.get("ms") if entry and entry["status"] == "ok" else None


def cell(entry, unit=1.0):
    """A measurement's time (ms times unit), 'fits' if only its memory was tried, or why not."""
    if not entry or entry["status"] != "ok":
        return entry["status"] if entry else "-"
    return fmt(entry["ms"] * unit) if "ms" in entry else "fits"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def pair(row, names, show, key="ms"):
    """'x / y': show(entry) of two measurements of row, '-' where one has no `key`."""
    return " / ".join(show(row[n]) if row.get(n) and row[n]["status"] == "ok" and key in row[n]
                      else "-" for n in names)


def best_sdpa(row):
    return min(filter(None, (ms(row.get(i)) for i in SDPA)), default=None)


def markdown(title, headers, lines):
    """The one table printer: a title, then a markdown table, one line per list of cells."""
    return f"{title}\n\n" + common.markdown_table(headers, lines)


def kernel_tables(rows):
    sel = [r for r in rows if r["kind"] == "kernel"]
    impls = [i for i in LABEL if any(i in r for r in sel)]
    speed, branches = [], []
    for r in sel:
        nsa, T = r.get("nsa"), fmt_tokens(r["T"])
        speed.append([T, r["pass"], *(cell(r.get(i)) for i in impls),
                      ratio(best_sdpa(r), ms(nsa)),
                      fmt(nsa["flops"] / nsa["ms"] / 1e9) if ms(nsa) else "-",
                      pair(r, ("nsa", "cudnn"), lambda e: f"{e['peak_gib']:.1f}", "peak_gib")])
        rest = ms(nsa) and ms(nsa) - sum(ms(r.get(b)) or 0 for b in BRANCHES)
        branches.append([T, r["pass"]] + [  # the selection's floor: half a forward (q.k only)
            f"{cell(r.get(b))} / {cell(r.get(b + ' floor'), 0.5 if b == 'selection' else 1)}"
            for b in BRANCHES] + [fmt(rest) if rest else "-", cell(nsa)])
    loads = [[fmt_tokens(r["T"]), cell(r.get("selected")), cell(e), fmt(e["gb"]),
              fmt(e["tb_per_s"]), f"{100 * e['neighbour_share']:.0f}%"]
             for r in sel if (e := r.get("selected loads") or {}).get("status") == "ok"]
    return "\n\n".join(t for t in [profile_table(sel), markdown(
        "Selected branch forward against the per-position order's loads alone (the order used "
        "from G = 16): a kernel that only reads the K and V rows of each query's selected blocks,"
        " one program per position and KV head, random inputs; share = a position's selected "
        "blocks that the previous position also chose",
        ["T", "selected fwd ms", "loads alone ms", "GB read", "TB/s", "share"], loads)
        if loads else "", markdown(
        "NSA branches alone / their floor: cuDNN over the same mean number of keys per query, "
        "contiguous (ms); the selection has no backward", ["T", "pass", *BRANCHES,
                                                          "rest (gates, gaps)", "nsa_attention"],
        branches), markdown(
        f"Attention alone, {sel[0]['desc']}: ms (median); speedup = faster SDPA backend / NSA",
        ["T", "pass", *(LABEL[i] for i in impls), "speedup", "NSA TFLOP/s",
         "peak GiB NSA / cuDNN"], speed)] if t)


def kernel_group(name):
    n = name.lower()
    return next((group for key, group in KERNEL_GROUPS.items() if key in n
                 and "::" not in n and "(" not in n), "other (torch ops)")


def profile_table(rows):
    lines = []
    for r in (r for r in rows if (r.get("profile") or {}).get("status") == "ok"):
        kernels, groups = r["profile"]["kernels"], {}
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
            groups.setdefault(kernel_group(name), []).append((name, us))
        for group, ks in sorted(groups.items(), key=lambda g: -sum(us for _, us in g[1])):
            us = sum(us for _, us in ks)
            lines.append([fmt_tokens(r["T"]), r["pass"], group, fmt(us / 1000),
                          f"{100 * us / sum(kernels.values()):.0f}%",
                          ", ".join(name for name, _ in ks)[:80]])
    return markdown("GPU kernels of one nsa_attention call, by branch (torch.profiler)",
                    ["T", "pass", "branch", "ms", "share", "kernels"], lines) if lines else ""


def decode_tables(rows):
    steps, models = [], []
    for r in rows:
        if r["kind"] == "decode":
            steps.append([r["B"], fmt_tokens(r["T"])] + [cell(r.get(i), 1000) + (
                "*" if ms(r.get(i)) and r[i]["method"] != "graph" else "") for i in ("nsa", *SDPA)]
                + [ratio(best_sdpa(r), ms(r.get("nsa"))), f"{r['tokens_read']:.0f} / {r['T']}",
                   f"{r['T'] / r['tokens_read']:.1f}x",
                   pair(r, ("nsa", "cudnn"), lambda e: f"{e['bytes'] / e['ms'] / 1e9:.2f}")])
        elif r["kind"] == "generate":
            models.append([r["B"], fmt_tokens(r["T"]),
                           pair(r, ("nsa", "full"), lambda e: f"{e['tokens_per_s']:.0f}"),
                           ratio(ms(r.get("full")), ms(r.get("nsa"))),
                           pair(r, ("nsa", "full"), lambda e: fmt(e["prefill_s"])),
                           pair(r, ("nsa", "full"), lambda e: f"{e['cache_bytes_per_token']:.0f}")])
    desc = next(r["desc"] for r in rows if r["kind"] == "decode")
    return markdown(
        f"One decoding step, one layer, {desc}: us, CUDA-graph replays (* eager); "
        f"tokens read per KV head: (T-l)/d + n*l' + w against T",
        ["B", "T", "NSA us", "flash us", "cuDNN us", "SDPA / NSA", "tokens read NSA / full",
         "memory model", "TB/s NSA / cuDNN"], steps) + "\n\n" + markdown(
        f"Decoding with a whole model ({MODEL_CONFIG}'s shape, bf16, greedy) and its KVCache",
        ["B", "T", "tokens/s NSA / full", "NSA / full", "prefill s NSA / full",
         "cache bytes/token NSA / full"], models)


def train_table(rows):
    sel = [r for r in rows if r["kind"] == "train"]
    lines = [[fmt_tokens(r["T"]), cell(r.get("nsa")), cell(r.get("full")),
              pair(r, ("nsa", "full"), lambda e: f"{e['tokens_per_s']:.0f}"),
              ratio(ms(r.get("full")), ms(r.get("nsa"))),
              pair(r, ("nsa", "full"), lambda e: f"{100 * e['mfu']:.1f}%" if e["mfu"] else "-"),
              pair(r, ("nsa", "full"), lambda e: f"{e['held_gib']:.1f}", "held_gib"),
              pair(r, ("nsa", "full"), lambda e: f"{e['peak_gib']:.1f}", "peak_gib")]
             for r in sel]
    fits = {a: [r["T"] for r in sel if (r.get(a) or {}).get("status") == "ok"]
            for a in ("nsa", "full")}
    return markdown(f"Training step (fwd+bwd+AdamW, bf16 autocast, batch 1), {sel[0]['desc']}",
                    ["T", "NSA ms", "full ms", "tokens/s NSA / full", "NSA / full",
                     "MFU NSA / full", "held for bwd GiB NSA / full", "peak GiB NSA / full"],
                    lines) + (
        "\n\nLargest context where one step fits: "
        + ", ".join(f"{a} {fmt_tokens(max(t)) if t else 'none'}" for a, t in fits.items()))


def all_tables(rows):
    kinds = {r["kind"] for r in rows}
    tables = [(kernel_tables, "kernel"), (decode_tables, "decode"), (train_table, "train")]
    return "\n\n".join(make(rows) for make, kind in tables if kind in kinds)


def plot_kernel(rows, path):
    """Log-log time vs T of every implementation, forward and forward+backward."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, p in zip(axes, PASSES):
        for impl in LABEL:
            pts = [(r["T"], ms(r[impl])) for r in rows if r["kind"] == "kernel"
                   and r["pass"] == p and ms(r.get(impl))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=LABEL[impl])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(lambda x, _: fmt_tokens(int(x)))
        ax.set(xlabel="context T (tokens)", ylabel="ms", title=f"attention {p}")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- timing
def event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(fn):
    """Median ms of fn, and the peak memory of a first call that also pays for compilation,
    autotuning and cuDNN plans. do_bench for short calls; CUDA events around 3 to 10 long ones."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    out = {"peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    first = event_ms(fn)
    if first < 20:  # ms: do_bench's 100 ms window holds 5 calls or more
        return dict(out, ms=triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = [first] + [event_ms(fn) for _ in range(min(9, max(2, int(1000 / first))))]
    return dict(out, ms=statistics.median(times))


def graphed(step):
    """(replay, "graph"): step captured once in a CUDA graph after two warm-up calls (inputs
    are static tensors), or (step, "eager") where capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        print(f"CUDA graph capture failed, timing eagerly: {str(e).splitlines()[0][:200]}")
        torch.cuda.synchronize()
        return step, "eager"
    return graph.replay, "graph"


def timed(f, inputs, do, pass_):
    """The call to time: f() without autograd, or f() and the gradients of inputs given do."""
    if pass_ == "fwd":
        return torch.no_grad()(f)
    return lambda: torch.autograd.grad(f(), inputs, do)


def profile_kernels(fn):
    """GPU time (us) per kernel name of one call of fn, after a warm-up call, and in all (ms)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.time_range.elapsed_us()
    return {"kernels": kernels, "ms": sum(kernels.values()) / 1000}


# ----------------------------------------------------------------------------- inputs
def nsa_inputs(B, T, HQ, H, D, hp, Tq=None, grad=True):
    """Random bf16 arguments of nsa_attention (gates in [0, 1)): q [B, Tq, HQ, D] at the last Tq
    of T positions, k, v [B, T, H, D], k_cmp, v_cmp [B, Tc, H, D], g_cmp, g_slc, g_win
    [B, Tq, HQ]; and an upstream gradient like q."""
    Tq, Tc = Tq or T, nk.num_compressed_blocks(T, hp["block_len"], hp["block_stride"])
    shapes = [(B, Tq, HQ, D), (B, T, H, D), (B, T, H, D), (B, Tc, H, D), (B, Tc, H, D)]
    xs = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    xs += [torch.rand(B, Tq, HQ, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return [x.requires_grad_(grad) for x in xs], torch.randn_like(xs[0])


def sdpa(q, k, v, backend, causal=True):
    """SDPA pinned to one backend, on model.py's [B, T, heads, D] layout with GQA."""
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=causal,
                                              enable_gqa=True).transpose(1, 2)


def selection(xs, hp):
    """(compressed hyperparameters, selection hyperparameters, lse, idx) on nsa_inputs' xs."""
    q, _, _, k_cmp, v_cmp = xs[:5]
    cmp_hp = {name: hp[name] for name in ("block_len", "block_stride")}
    sel_hp = dict(cmp_hp, select_block=hp["select_block"], n_select=hp["n_select"])
    with torch.no_grad():
        lse = nk.compressed_attention(q, k_cmp, v_cmp, **cmp_hp)[1]
        return cmp_hp, sel_hp, lse, nk.nsa_select(q, k_cmp, lse, **sel_hp)


def branch_fn(xs, hp, branch):
    """(f, the inputs it differentiates): one NSA branch alone, through nsa_kernels' public
    per-branch functions, on nsa_inputs' xs."""
    q, k, v, k_cmp, v_cmp = xs[:5]
    cmp_hp, sel_hp, lse, idx = selection(xs, hp)
    fns = {"compressed": (lambda: nk.compressed_attention(q, k_cmp, v_cmp, **cmp_hp)[0],
                          (q, k_cmp, v_cmp)),
           "selection": (lambda: nk.nsa_select(q, k_cmp, lse, **sel_hp), ()),
           "selected": (lambda: nk.selected_attention(q, k, v, idx,
                                                      select_block=hp["select_block"]), (q, k, v)),
           "window": (lambda: nk.window_attention(q, k, v, window=hp["window"]), (q, k, v))}
    return fns[branch]


def fla_kernel():
    """fla's parallel_nsa (flash-linear-attention), an optional peer; None, with one line, when
    it is not installed."""
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError as e:
        print(f"--peers: fla is not importable ({e}); its rows are skipped")
        return None
    return parallel_nsa


@triton.jit
def _selected_loads_kernel(k, v, idx, out, T, H, NSEL, SBLK: tl.constexpr, D: tl.constexpr):
    """What the selected branch's forward reads for one (position, KV head), and nothing else:
    the K and V rows (s <= t) of its selected blocks, summed so that the loads stay."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_s, o_d = tl.arange(0, SBLK), tl.arange(0, D)
    p_idx = idx + ((i_b * T + i_t).to(tl.int64) * H + i_h) * NSEL
    b_sum = tl.zeros([SBLK, D], tl.float32)
    for i_n in range(tl.minimum(NSEL, i_t // SBLK + 1)):
        j = tl.load(p_idx + i_n)
        pos = j * SBLK + o_s
        m_k = (pos <= i_t) & (j >= 0)
        p_kv = ((i_b * T + pos).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
        b_sum += tl.load(k + p_kv, mask=m_k[:, None], other=0.).to(tl.float32)
        b_sum += tl.load(v + p_kv, mask=m_k[:, None], other=0.).to(tl.float32)
    tl.store(out + (i_b * T + i_t) * H + i_h, tl.sum(b_sum))


def selected_loads(B, T, HQ, H, D, hp):
    """The load floor of the per-position selected forward (_slc_fwd_kernel, used from G = 16)
    for random inputs: the time of _selected_loads_kernel (launched the same way: one program
    per position and KV head), the GB it reads, and
    the share of a position's selected blocks that the previous position also selected (a
    kernel that stacks neighbouring positions loads those once: tried and dropped, BENCHMARKS'
    seventh session)."""
    xs, _ = nsa_inputs(B, T, HQ, H, D, hp, grad=False)
    k, v, idx = xs[1], xs[2], selection(xs, hp)[3]
    out = torch.empty(B, T, H, device="cuda")
    run = lambda: _selected_loads_kernel[(T, B * H)](k, v, idx, out, T, H, hp["n_select"],
                                                     SBLK=hp["select_block"], D=D,
                                                     num_warps=2, num_stages=2)
    res = measure(run)
    gb = nsa_key_counts(T, **hp)["selected"] * B * H * D * 2 * k.element_size() / 1e9
    return dict(res, gb=gb, tb_per_s=gb / res["ms"], neighbour_share=neighbour_share(idx))


def neighbour_share(idx, stride=1, counted=None):
    """Of the blocks selected by position t (idx [B, T, H, n], -1: none; only those where
    counted, a bool of idx's shape), the share that position t - stride selected too."""
    now, prev = idx[:, stride:], idx[:, :-stride]
    counted = (now >= 0) if counted is None else counted[:, stride:]
    hit = (now[..., :, None] == prev[..., None, :]).any(-1)
    return ((hit & counted).sum() / counted.sum().clamp_min(1)).item()


# ----------------------------------------------------------------------------- modes
def run_kernel(args, res):
    HQ, H, D, hp = attention_shape(args)
    B, Ts, fla = 1, lengths(args, KERNEL_T), fla_kernel() if args.peers else None
    desc = (f"B={B} HQ={HQ} H={H} D={D} (G={HQ // H}) bf16 causal, "
            + " ".join(f"{k}={v}" for k, v in hp.items()))
    for T, p in ((T, p) for T in Ts for p in PASSES):
        row, c = res.row("kernel", T=T, desc=desc, **{"pass": p}), nsa_key_counts(T, **hp)

        def nsa(branch=None):  # the whole nsa_attention call, or one branch (selection: fwd)
            xs, do = nsa_inputs(B, T, HQ, H, D, hp)
            f, wrt = branch_fn(xs, hp, branch) if branch else (
                lambda: nk.nsa_attention(*xs, **hp), xs)
            return timed(f, wrt, do, "fwd" if branch == "selection" else p)

        def dense(impl, keys=None, p=p):  # causal SDPA, or non-causal over `keys` keys: a floor
            (q, k, v, *_), do = nsa_inputs(B, T, HQ, H, D, hp)
            if keys is not None:
                k, v = (x[:, :keys].detach().requires_grad_() for x in (k, v))
            return timed(lambda: sdpa(q, k, v, SDPA[impl], keys is None), (q, k, v), do, p)

        def peer():  # fla's NSA: l = d = l' = 64, mean pooling, no window (it needs flash-attn)
            (q, k, v, _, _, *g), do = nsa_inputs(B, T, HQ, H, D, hp)
            return timed(lambda: fla(q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=None, block_size=64,
                                     block_counts=hp["n_select"]), (q, k, v, *g[:2]), do, p)

        res.measure(row, "nsa", lambda: measure(nsa()), flops=nsa_flops(B, T, HQ, D, hp, p))
        for impl in SDPA:
            res.measure(row, impl, lambda: measure(dense(impl)),
                        flops=attention_flops(B, HQ, D, c["causal"], p))
        if fla is not None:
            res.measure(row, "fla", lambda: measure(peer()))
        for b in BRANCHES:
            res.measure(row, b, lambda: measure(nsa(b)), flops=nsa_flops(B, T, HQ, D, hp, p, b))
            keys = max(1, round(c["compressed" if b == "selection" else b] / T))
            res.measure(row, f"{b} floor", lambda: measure(
                dense("cudnn", keys, "fwd" if b == "selection" else p)), keys=keys)
        if p == "fwd":
            res.measure(row, "selected loads", lambda: selected_loads(B, T, HQ, H, D, hp))
        if T == max(Ts):
            res.measure(row, "profile", lambda: profile_kernels(nsa()))


def run_decode(args, res):
    HQ, H, D, hp = attention_shape(args)

    def step(B, T, impl):
        (q, k, v, k_cmp, v_cmp, *g), _ = nsa_inputs(B, T, HQ, H, D, hp, Tq=1, grad=False)
        lengths = torch.full((B,), T, dtype=torch.int32, device="cuda")  # tokens in the cache
        fn, method = graphed(  # the one query, at the end of the cache, sees every key
            (lambda: nk.nsa_decode(q, k, v, k_cmp, v_cmp, *g, lengths, **hp)) if impl == "nsa"
            else (lambda: sdpa(q, k, v, SDPA[impl], causal=False)))
        return dict(measure(fn), method=method)

    for B in DECODE_B:
        for T in lengths(args, DECODE_T):
            row = res.row("decode", B=B, T=T, desc=f"HQ={HQ} H={H} D={D} bf16",
                          tokens_read=decode_tokens_read(T, hp))
            for impl in ("nsa", *SDPA):  # bytes: every token read once, key and value, bf16
                res.measure(row, impl, lambda: step(B, T, impl), bytes=2 * B * H * D * 2 * (
                    row["tokens_read"] if impl == "nsa" else T))
    fields = model_fields(MODEL_CONFIG)
    for B in DECODE_B:
        for T in lengths(args, DECODE_T):
            row = res.row("generate", B=B, T=T)
            for attention in ("nsa", "full"):
                res.measure(row, attention, lambda: generate_speed(
                    fields, attention, B, T, 8 if args.quick else 32))


def gpt(fields, attention, T):
    """A fresh GPT on the GPU with fields' shape, `attention` and block_size T."""
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        return GPT(GPTConfig(**dict(fields, block_size=T, attention=attention, dropout=0.0)))


@torch.no_grad()
def generate_speed(fields, attention, B, T, steps):
    """Prefill T - steps - 2 random tokens into a fresh KVCache (after a warm-up prefill of one
    sequence), capture a decoding step in a CUDA graph (model.DecodeGraph, for NSA and full
    attention alike), take one warm-up step, then time `steps` greedy steps by CUDA events."""
    model = gpt(fields, attention, T).to(torch.bfloat16).eval()
    prompt = torch.randint(model.config.vocab_size, (B, T - steps - 2), device="cuda")
    model(prompt[:1], cache=KVCache(model.config.n_layer, T))
    cache = KVCache(model.config.n_layer, T)
    prefill, prefilled, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(4))
    prefill.record()
    token = model(prompt, cache=cache)[0].argmax(-1)                       # [B, 1]
    prefilled.record()
    step = DecodeGraph(model, cache)
    token = step(token)[0].argmax(-1)
    start.record()
    for _ in range(steps):
        token = step(token)[0].argmax(-1)
    end.record()
    end.synchronize()
    step_ms = start.elapsed_time(end) / steps
    return dict(ms=step_ms, tokens_per_s=B * 1000 / step_ms, steps=steps, method="graph",
                prefill_s=prefill.elapsed_time(prefilled) / 1000,
                cache_bytes_per_token=cache.nbytes_per_token(),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def train_speed(fields, attention, T, steps, peak_flops):
    """One training step (fwd + bwd + AdamW, bf16 autocast, batch 1, random tokens) at context T
    as warm-up, then the median of `steps` steps by CUDA events; steps=0: whether one fits.
    held_gib: what the forward holds for the backward (activations, logits), peak_gib: the
    peak of all the steps, weights and optimizer state included."""
    model = gpt(fields, attention, T)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95),
                                     device_type="cuda")
    x, y = (torch.randint(model.config.vocab_size, (1, T), device="cuda") for _ in range(2))

    def step(held=None):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(x, y)[1]
        if held is not None:
            held.append(torch.cuda.memory_allocated())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    held = [torch.cuda.memory_allocated()]  # weights and optimizer state
    step(held)
    out = {"held_gib": (held[1] - held[0]) / 2**30}
    if steps:
        step_ms = statistics.median(event_ms(step) for _ in range(steps))
        out.update(ms=step_ms, tokens_per_s=T * 1000 / step_ms, mfu=model.estimate_mfu(
            1, step_ms / 1000, peak_flops) if peak_flops else None)
    torch.cuda.synchronize()
    return dict(out, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def run_train(args, res):
    fields, peak_flops = model_fields(TRAIN_CONFIG), common.peak_bf16_flops(
        torch.cuda.get_device_name())
    desc = (f"{fields['n_layer']} layers, n_embd {fields['n_embd']}, {fields['n_head']} query / "
            f"{fields['n_kv_head']} KV heads ({TRAIN_CONFIG}); MFU of "
            + (f"{peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "an unknown peak"))
    Ts, rows = lengths(args, TRAIN_T), {}
    # past the timed contexts, doubling: one step each, whether it fits
    fit = [] if args.quick else [max(Ts) * 2**i for i in range(1, 8)
                                 if max(Ts) * 2**i <= FIT_MAX_T]
    for attention in ("nsa", "full"):
        for T in Ts + fit:
            rows[T] = rows.get(T) or res.row("train", T=T, desc=desc)
            steps = 0 if T in fit else 2 if args.quick else 3
            entry = res.measure(rows[T], attention, lambda: train_speed(
                fields, attention, T, steps, peak_flops))
            if entry["status"] != "ok":
                break  # a longer context will not fit either


def main(argv):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise common.UserError("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() "
                               "is False); on CPU, test the kernels with `TRITON_INTERPRET=1 "
                               "python -m pytest -q test_nsa.py`")
    res = Results(args.json, argv)
    print(f"{res.env.get('gpu')} | torch {res.env['torch']} | triton {res.env['triton']} | "
          f"commit {res.env['git_commit']}{' (dirty)' if res.env['git_dirty'] else ''}")
    try:
        for mode in ["kernel", "decode", "train"] if args.mode == "all" else [args.mode]:
            {"kernel": run_kernel, "decode": run_decode, "train": run_train}[mode](args, res)
    finally:
        if args.plot and any(r["kind"] == "kernel" for r in res.rows):
            plot_kernel(res.rows, args.plot)
        print("\n" + all_tables(res.rows) + (f"\n\nall rows in {args.json}" if args.json else ""))


if __name__ == "__main__":
    common.run_cli(main, "bench.py")
