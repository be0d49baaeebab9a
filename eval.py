"""
Long-context evaluations of checkpoints written by train.py (issue 12): loss by position on
long documents, and passkey retrieval with NSA's selection recall; several runs side by side.

    python eval.py loss --out_dir=out-python-8k-nsa,out-python-8k-full --plot=loss.png \\
        --json=loss.json
    python eval.py passkey --out_dir=out-python-8k-nsa,out-python-8k-full --plot=passkey.png \\
        --json=passkey.json
    python eval.py loss --out_dir=out --device=cpu --windows=8        # the tiny CPU model
    python eval.py passkey --out_dir=out --device=cpu --samples=2 --lengths=64,128,256

loss: the next-token loss at each position p = 0 .. T-1 of --windows windows of T + 1 tokens
    (T: --T, default the smallest block_size of the runs) from the validation split, exactly
    as training computes it (the model's forward with targets; per-token cross-entropy of
    the fp32 logits; targets of -1 ignored), averaged over windows, then over log-spaced
    buckets of the context c = p + 1 tokens: 1, 2-3, 4-7, ..., the last one up to T.
    Windows lie inside one document (prepare_data.py ends each with EOT) whenever the split
    has documents of T + 1 tokens or more, else they may cross documents as training's
    windows do, and the output says which. Every run sees the same windows (--seed).
passkey: documents of L tokens, the answer included, built by common.passkey_sample from the
    validation split's filler: the needle at depth 0, 25, 50, 75, 100% of the filler (--depths),
    then the question `What is the pass key? The pass key is`; exact match means greedy decoding
    reproduces the answer's tokens ` NNNNN` (what follows is not checked). It is read off one
    forward pass: greedy decoding is right iff the argmax at each answer position, given the
    right answer tokens before it, is the answer's next token. A second table gives the share
    whose first answer token is right (GPT-2 splits the key into 2-3 tokens: a model that has
    begun to copy gets the first one right before it gets them all). Sample i of a length has
    the same key and filler at every depth; every run sees the same documents. Lengths (--lengths):
    1k, 2k, ... up to block_size, and 2x block_size, past the training context (RoPE has no
    position table, so the model runs there unchanged: extrapolation).
    NSA selection recall: the share of (layer, KV head) pairs whose selected blocks for the query
    at the question's last token (the one that predicts the answer) include a block holding a
    key token (of either copy of the key in the needle), recomputed by Attention.selection from
    each layer's input (caught by a forward pre-hook) with the PyTorch reference, which may
    differ from the kernel's choice at near-ties. Block 0 and the two local blocks always count
    as selected, so needles in them are recalled by construction; the window branch (w tokens)
    sees a needle close to the question whatever the selection. Where recall fails, the
    needle's rank says by how much: the place of the best key block in the order the selection
    takes (forced blocks first, then by score; selected iff rank <= n), the best over layers and
    KV heads, median over a cell's documents (per layer in the JSON).
    Attention on the key (both attentions): the share of a head's attention at that query on the
    key's tokens, the best over layers and heads, mean over a cell's documents (per layer in the
    JSON). For NSA it counts the selected and window branches, each times its gate, over the
    sum of the three gates (eval.py's question_attention): a needle that is selected but not
    attended to shows up there. Attention on the key and recall are also given where the last
    answer token is predicted: a model that starts the copy must still find the key there.
    NSA's selected branch alone: at the question, the head whose selected-branch softmax puts
    the most on the key (ungated), that share, and the head's gate on the branch over the sum
    of the three gates (mean over a cell's documents): does the branch find the key in its
    blocks, and is it gated off?
Output: markdown tables on stdout; --json writes every number with the run provenance;
--plot a figure (needs matplotlib).
"""
import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

import common
import nsa_kernels as nk
from common import EOT, UserError, fmt_tokens, markdown_table, pyplot

DEFAULT_DEPTHS = "0,25,50,75,100"


# ----------------------------------------------------------------------------- runs and data
def read_runs(out_dirs):
    """[(info, checkpoint)] of each out_dir/ckpt.pt: read once, to CPU memory, without the
    optimizer state."""
    runs = []
    for out_dir in out_dirs:
        ckpt = common.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        ckpt.pop("optimizer", None)
        config = ckpt.get("config") or {}
        info = {"out_dir": out_dir, "attention": ckpt["model_args"].get("attention"),
                "block_size": ckpt["model_args"].get("block_size"),
                "iter_num": ckpt.get("iter_num"), "best_val_loss": ckpt.get("best_val_loss"),
                "dataset": config.get("dataset"), "data_dir": config.get("data_dir", "data"),
                "model_args": ckpt["model_args"]}
        runs.append((info, ckpt))
    return runs


def build_model(info, ckpt, device, context):
    """The run's GPT in eval mode on device, built for max(block_size, context) tokens:
    block_size bounds the input length and sizes no parameter (RoPE has no position table),
    so the trained weights load unchanged into the longer model."""
    return common.build_model(ckpt, os.path.join(info["out_dir"], "ckpt.pt"), device,
                              block_size=max(info["block_size"], context))


def label(info):
    return (f"{info['out_dir']} ({info['attention']}, step {info['iter_num']}, "
            f"block_size {info['block_size']})")


def pick_dataset(args, infos):
    """(data_dir, dataset): the command line's, else the one every run trained on."""
    found = {(i["data_dir"], i["dataset"]) for i in infos}
    data_dir = args.data_dir or (found.pop()[0] if len(found) == 1 else "data")
    if args.dataset:
        return data_dir, args.dataset
    names = sorted({str(i["dataset"]) for i in infos})
    if len(names) != 1 or names[0] == "None":
        raise UserError(f"the runs trained on datasets {', '.join(names)}: pass --dataset")
    return data_dir, names[0]


def read_split(data_dir, dataset, split):
    path = os.path.join(data_dir, dataset, f"{split}.bin")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: prepare the dataset with prepare_data.py, or pass "
                        f"--data_dir / --dataset")
    return np.memmap(path, dtype=np.uint16, mode="r")


def parse_sizes(text, name):
    """'1k,2k,8192' -> [1024, 2048, 8192]."""
    try:
        return common.parse_tokens(text)
    except ValueError:
        raise UserError(f"--{name} must be a comma list of positive token counts such as "
                        f"1k,2k,8192, got {text!r}") from None


# ----------------------------------------------------------------------------- loss by position
def draw_windows(data, T, n, generator):
    """Starts of n windows of T + 1 tokens of data (uniform with replacement), all inside one
    document each when data holds documents (ended by EOT) of T + 1 tokens or more.
    Returns (starts: list of n ints, inside_documents: bool, long_documents: int)."""
    if len(data) < T + 1:
        raise UserError(f"the validation split holds {len(data)} tokens, fewer than T + 1 = "
                        f"{T + 1}: pass a smaller --T")
    ends = np.flatnonzero(np.asarray(data) == EOT)                  # a document ends at its EOT
    if len(ends) == 0 or ends[-1] != len(data) - 1:
        ends = np.append(ends, len(data) - 1)
    begins = np.concatenate([[0], ends[:-1] + 1])
    counts = np.maximum(ends - begins + 1 - T, 0)                   # window starts per document
    total = int(counts.sum())
    if total == 0:
        picks = torch.randint(len(data) - T, (n,), generator=generator).tolist()
        return picks, False, 0
    picks = torch.randint(total, (n,), generator=generator).numpy()
    cum = np.cumsum(counts)
    doc = np.searchsorted(cum, picks, side="right")
    starts = begins[doc] + picks - (cum[doc] - counts[doc])
    return [int(s) for s in starts], True, int((counts > 0).sum())


@torch.no_grad()
def position_loss(model, x, y, autocast):
    """The training loss of every token of a batch: (loss [B, T] float64, 0 where ignored;
    valid [B, T] bool), the per-token terms that model(x, y) averages: cross-entropy of its
    logits in fp32, targets of -1 ignored."""
    with autocast:
        logits, _ = model(x, y)
    B, T = y.shape
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1),
                         ignore_index=-1, reduction="none").view(B, T)
    valid = y != -1
    return (ce * valid).double().cpu(), valid.cpu()


def loss_by_position(model, data, starts, T, batch_size, device, autocast):
    """position_loss over the windows of T + 1 tokens at `starts`: ([N, T], [N, T])."""
    losses, valid = [], []
    for i in range(0, len(starts), batch_size):
        xy = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts[i:i + batch_size]])
                              .astype(np.int64)).to(device)
        loss, ok = position_loss(model, xy[:, :-1], xy[:, 1:], autocast)
        losses.append(loss)
        valid.append(ok)
    return torch.cat(losses), torch.cat(valid)


def context_buckets(T):
    """Log-spaced buckets of context tokens c = p + 1: [1, 1], [2, 3], [4, 7], ..., the last
    one [2^k, T] with 2^k the largest power of two below T (or [1, 1] for T = 1)."""
    edges, lo = [], 1
    while lo < T or not edges:
        edges.append(lo)
        lo *= 2
    return [(a, min(b - 1, T)) for a, b in zip(edges, edges[1:] + [T + 1])]


def window_bucket_means(loss, valid, buckets):
    """[N, n_buckets]: each window's mean loss over the positions c - 1 of each bucket."""
    return torch.stack([loss[:, lo - 1:hi].sum(1) / valid[:, lo - 1:hi].sum(1)
                        for lo, hi in buckets], dim=1)


def mean_and_se(per_window):
    """Mean over windows (dim 0) and its standard error (0 for a single window)."""
    n = per_window.shape[0]
    se = per_window.std(dim=0) / n ** 0.5 if n > 1 else torch.zeros_like(per_window[0])
    return per_window.mean(dim=0).tolist(), se.tolist()


def plot_loss(results, buckets, T, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    centres = [(lo * hi) ** 0.5 for lo, hi in buckets]
    for r in results:
        ax.errorbar(centres, r["loss_by_bucket"], yerr=r["loss_by_bucket_se"], marker="o",
                    capsize=3, label=f"{r['attention']}: {r['out_dir']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens (position + 1), log-spaced buckets")
    ax.set_ylabel("mean validation loss (± standard error)")
    ax.set_title(f"Loss by position, windows of {T} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def cmd_loss(args):
    runs, infos = open_runs(args)
    T = args.T if args.T is not None else min(i["block_size"] for i in infos)
    if T < 1 or args.windows < 1 or args.batch_size < 1:
        raise UserError("--T, --windows and --batch_size must be >= 1")
    data_dir, dataset = pick_dataset(args, infos)
    data = read_split(data_dir, dataset, "val")
    dev, dtype, autocast = device_and_autocast(args)
    starts, inside, n_docs = draw_windows(data, T, args.windows,
                                          torch.Generator().manual_seed(args.seed))
    where = (f"each inside one document ({n_docs} documents of >= {T + 1} tokens)" if inside
             else f"crossing documents where they meet (no document has {T + 1} tokens): "
                  f"positions after an EOT see an unrelated text")
    print(f"loss by position: {args.windows} windows of T = {T} tokens of "
          f"{os.path.join(data_dir, dataset, 'val.bin')}, {where}; {dev}, {dtype}")
    buckets = context_buckets(T)
    results, per_window = [], []
    for info, ckpt in runs:
        t0 = time.time()
        model = build_model(info, ckpt, dev, T)
        loss, valid = loss_by_position(model, data, starts, T, args.batch_size, dev, autocast)
        del model
        per_window.append(window_bucket_means(loss, valid, buckets))
        mean, se = mean_and_se(per_window[-1])
        by_position = loss.sum(0) / valid.sum(0)
        results.append({**info, "loss": float(loss.sum() / valid.sum()),
                        "loss_by_bucket": mean, "loss_by_bucket_se": se,
                        "loss_by_position": [round(float(v), 5) for v in by_position],
                        "beyond_block_size": T > info["block_size"], "seconds": time.time() - t0})
        print(f"[{len(results)}] {label(info)}: {time.time() - t0:.1f}s"
              + (f" (T = {T} is past its block_size: extrapolation)"
                 if T > info["block_size"] else ""), file=sys.stderr)
    headers = ["context tokens"] + [f"[{i + 1}] {r['attention']}" for i, r in enumerate(results)]
    diff = None
    if len(results) == 2:  # same windows: the standard error of the paired differences
        headers.append("[2] - [1]")
        diff = mean_and_se(per_window[1] - per_window[0])
    lines = []
    for b, (lo, hi) in enumerate(buckets):
        lines.append([str(lo) if lo == hi else f"{lo}-{hi}"]
                     + [f"{r['loss_by_bucket'][b]:.4f} ± {r['loss_by_bucket_se'][b]:.4f}"
                        for r in results]
                     + ([f"{diff[0][b]:+.4f} ± {diff[1][b]:.4f}"] if diff else []))
    lines.append(["all"] + [f"{r['loss']:.4f}" for r in results]
                 + ([f"{results[1]['loss'] - results[0]['loss']:+.4f}"] if diff else []))
    print("\n".join(f"[{i + 1}] {label(r)}" for i, r in enumerate(results)))
    print(markdown_table(headers, lines))
    print(f"(mean over the {args.windows} windows ± its standard error)")
    if args.plot:
        plot_loss(results, buckets, T, args.plot)
    if args.json:
        write_json(args.json, {"mode": "loss", "T": T, "windows": args.windows,
                               "window_starts": starts, "windows_inside_documents": inside,
                               "long_documents": n_docs, "dataset": dataset,
                               "data_dir": data_dir, "buckets": buckets, "runs": results})


# ----------------------------------------------------------------------------- passkey
def default_lengths(block_size):
    """block_size, halved down to 1k (to a quarter of block_size if that is under 1k),
    ascending, then 2x block_size."""
    lengths, n = [], block_size
    while n >= min(1024, block_size // 4) and n >= 1:
        lengths.insert(0, n)
        n //= 2
    return lengths + [2 * block_size]


def make_passkey_docs(encode, data, lengths, depths, samples, generator):
    """{length: [(depth index, sample, ids, key_positions, answer_start), ...]}: for every
    length and sample one key and one filler start, shared by all depths."""
    docs = {}
    for length in lengths:
        if len(data) < length:
            raise UserError(f"the validation split holds {len(data)} tokens, fewer than the "
                            f"passkey length {length}")
        rows = []
        for s in range(samples):
            key = int(torch.randint(common.KEY_RANGE[0], common.KEY_RANGE[1] + 1, (1,),
                                    generator=generator))
            start = int(torch.randint(len(data) - length + 1, (1,), generator=generator))
            filler = common.passkey_filler(data, start, length, encode)
            for d, depth in enumerate(depths):
                try:
                    ids, _, key_pos, answer_start = common.passkey_sample(
                        encode, filler, length, depth / 100, key)
                except ValueError as e:
                    raise UserError(f"passkey length {length}: {e}") from e
                rows.append((d, s, ids, key_pos, answer_start))
        docs[length] = rows
    return docs


@contextmanager
def activations(model, attention_inputs):
    """Record, through hooks, the final norm's output (what lm_head reads) and, if asked, each
    layer's attention input (what Attention.selection takes)."""
    acts = {"attn": {}}
    handles = [model.transformer.ln_f.register_forward_hook(
        lambda module, inputs, out: acts.__setitem__("final", out))]
    if attention_inputs:
        for i, block in enumerate(model.transformer.h):
            handles.append(block.attn.register_forward_pre_hook(
                lambda module, inputs, i=i: acts["attn"].__setitem__(i, inputs[0])))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def score_passkey(model, docs, batch_size, device, autocast):
    """docs: rows of make_passkey_docs, all of one length. Returns a dict: correct (bool [N]),
    first (the greedy first answer token [N]), question_attention's values at the question
    (on_key, slc_on_key, slc_gate [N, n_layer, HQ]; hits, ranks [N, n_layer, H]; all but on_key
    are None for full attention), and on_key_last, hits_last where the last answer token is
    predicted (the document's last position but one): is the key still found once the copy
    has begun?"""
    out = {k: [] for k in ("correct", "first", "on_key", "hits", "ranks", "slc_on_key",
                           "slc_gate", "on_key_last", "hits_last")}
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        idx = torch.tensor([d[2] for d in chunk], device=device)                  # [b, L]
        b, L = idx.shape
        answer_start = torch.tensor([d[4] for d in chunk], device=device)         # [b]
        K = int(L - answer_start.min())
        j = torch.arange(K, device=device)
        valid = answer_start[:, None] + j < L                                     # [b, K]
        pos = torch.minimum(answer_start[:, None] - 1 + j, torch.tensor(L - 2, device=device))
        rows = torch.arange(b, device=device)[:, None]
        with activations(model, True) as acts, autocast:
            model(idx)
            pred = model.lm_head(acts["final"][rows, pos]).argmax(-1)            # [b, K]
            at = question_attention(model, acts["attn"], chunk, answer_start - 1)
            last = question_attention(model, acts["attn"], chunk,
                                      torch.full_like(answer_start, L - 2))
        for k, v in at.items():
            out[k].append(v)
        out["on_key_last"].append(last["on_key"])
        out["hits_last"].append(last["hits"])
        out["correct"].append(((pred == idx[rows, pos + 1]) | ~valid).all(-1).cpu())
        out["first"].append(pred[:, 0].cpu())
    return {k: torch.cat(v) if v and v[0] is not None else None for k, v in out.items()}


def first_token_right(first, docs):
    """bool [N]: is score_passkey's greedy first answer token the answer's first token?"""
    return first == torch.tensor([d[2][d[4]] for d in docs])


def question_attention(model, inputs, chunk, question_end):
    """What each layer does at question_end (the question's last token, the query that predicts
    the answer), from its input x (inputs: {layer: x}). Returns a dict of on_key, slc_on_key,
    slc_gate [b, n_layer, HQ], hits (bool) and ranks (int) [b, n_layer, H]; all but on_key are
    None for full attention.
    - on_key: the share of each query head's attention that falls on the row's key tokens (both
      copies). Full attention: its softmax. NSA: the selected and the window branch's softmax,
      each times its gate, over the sum of the three gates: (g_slc p_slc + g_win p_win) /
      (g_cmp + g_slc + g_win), the share of the head's gated output that comes from key tokens
      (the compressed branch sees block summaries, not tokens, and counts as off the key), on
      full attention's 0-1 scale. This is what a head can copy the key from: it tells a model
      that selects the needle and ignores it from one that attends to it and still answers
      wrong.
    - slc_on_key: the selected branch's own softmax share on the key tokens (ungated); slc_gate:
      g_slc / (g_cmp + g_slc + g_win). A branch that finds the key but is gated off has a high
      slc_on_key and a low slc_gate.
    - hits: does KV head h select a block holding one of the row's key tokens; ranks: the best
      such block's rank in the selection's order (forced blocks first, then by score; 1 = first).
      The selection is Attention.selection's (the PyTorch reference)."""
    cfg = model.config
    nsa = cfg.attention == "nsa"
    b, G = len(chunk), cfg.n_head // cfg.n_kv_head
    on_key, slc_on_key, slc_gate = (torch.zeros(b, cfg.n_layer, cfg.n_head) for _ in range(3))
    hits = torch.zeros(b, cfg.n_layer, cfg.n_kv_head, dtype=torch.bool)
    ranks = torch.zeros(b, cfg.n_layer, cfg.n_kv_head, dtype=torch.long)
    for t in question_end.unique().tolist():
        sel_rows = (question_end == t).nonzero().flatten()
        rows = sel_rows.cpu()
        key_tokens = torch.zeros(len(rows), 1, t + 1, dtype=torch.bool)
        for r, row in enumerate(rows.tolist()):
            key_tokens[r, 0, chunk[row][3]] = True
        if nsa:  # the selection blocks that hold a key token [r, NB]
            ls = cfg.select_block
            key_blocks = torch.zeros(len(rows), t // ls + 1).index_add_(
                1, torch.arange(t + 1) // ls, key_tokens[:, 0].float()) > 0
        for layer, x in inputs.items():
            attn = model.transformer.h[layer].attn
            j = torch.arange(t + 1, device=x.device)
            q, k, _, _, _, gates, kv_win = attn.project(x[sel_rows, :t + 1], j)

            def share(k, visible):                               # visible: [r or 1, HQ, t+1]
                s = torch.einsum("bhd,bjhd->bhj", q[:, t].float(),
                                 k.float().repeat_interleave(G, 2)) * cfg.head_dim ** -0.5
                p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1).cpu()
                return p.masked_fill(~key_tokens, 0.).sum(-1)                     # [r, HQ]

            if not nsa:
                on_key[rows, layer] = share(k, torch.ones(1, 1, t + 1, dtype=torch.bool,
                                                          device=x.device))
                continue
            selected, score = attn.selection(x[sel_rows], t)                      # [r, H, NB]
            in_selected = selected.repeat_interleave(G, 1)[..., j // ls]
            in_window = (j > t - cfg.window)[None, None, :]
            k_win = k if kv_win is None else kv_win[0]
            g_cmp, g_slc, g_win = (g[:, t].float().cpu() for g in gates)         # [r, HQ]
            gate_sum = g_cmp + g_slc + g_win
            p_slc = share(k, in_selected)
            on_key[rows, layer] = (g_slc * p_slc + g_win * share(k_win, in_window)) / gate_sum
            slc_on_key[rows, layer] = p_slc
            slc_gate[rows, layer] = g_slc / gate_sum
            order = nk.selection_order(score.float().cpu(), torch.tensor(t), ls)  # [r, H, NB]
            best = order.masked_fill(~key_blocks[:, None, :], float("-inf")).amax(-1)
            hits[rows, layer] = (selected.cpu() & key_blocks[:, None, :]).any(-1)
            ranks[rows, layer] = 1 + (order > best[..., None]).sum(-1)
    if not nsa:
        return dict(on_key=on_key, hits=None, ranks=None, slc_on_key=None, slc_gate=None)
    return dict(on_key=on_key, hits=hits, ranks=ranks, slc_on_key=slc_on_key, slc_gate=slc_gate)


def decode(enc, ids):
    """Text of token ids; ids past GPT-2's 50257 (the padded embedding rows) shown as <id>."""
    return "".join(enc.decode([i]) if i < enc.n_vocab else f"<{i}>" for i in ids)


def passkey_tables(result, lengths, depths, block_size):
    """Markdown tables of a run's accuracy (and NSA recall and needle rank), depth x length."""
    heads = [fmt_tokens(n) + ("*" if n > block_size else "") for n in lengths]
    out = []
    for key, title, scale in [
            ("accuracy", "exact match, %", 100), ("first_token",
                                                  "first answer token right (greedy), %", 100),
            ("key_attention", "attention on the key's tokens at the question, % (best layer and "
                              "head; NSA: selected + window branches, each times its "
                              "gate, over the sum of the gates)", 100),
            ("key_attention_last", "attention on the key's tokens where the last answer token "
                                   "is predicted, % (best layer and head)", 100),
            ("selected_key_attention", "NSA's selected branch alone at the question: attention "
                                       "on the key's tokens, ungated, % (best layer and head)",
             100),
            ("selected_gate", "that head's gate on the selected branch, % of the three gates' sum",
             100),
            ("recall", "NSA selection recall, %", 100),
            ("recall_last", "NSA selection recall where the last answer token is predicted, %",
             100),
            ("needle_rank", f"NSA needle rank (median; selected iff <= n = "
                            f"{result['model_args'].get('n_select')}), best layer and KV head",
             1)]:
        if result.get(key) is None:
            continue
        grid = result[key]                                                # [length][depth]
        lines = [[f"{depth:g}%"] + [f"{scale * grid[li][d]:.0f}" for li in range(len(lengths))]
                 for d, depth in enumerate(depths)]
        if scale == 100:
            lines.append(["mean"] + [f"{100 * sum(col) / len(col):.0f}" for col in grid])
        out.append(f"{title}:\n" + markdown_table(["depth \\ length"] + heads, lines))
    if result.get("accuracy_by_selection") is not None:
        def share(right, n):
            return f"{100 * right / n:.0f}% of {n}" if n else "none"
        lines = [[what] + [share(*cell[key]) for cell in result["accuracy_by_selection"]]
                 for what, key in (("selected by some layer and KV head", "selected"),
                                   ("selected by none", "not_selected"))]
        out.append("exact match by whether the needle's block is selected at the question:\n"
                   + markdown_table(["needle's block \\ length"] + heads, lines))
    return "\n".join(out)


def plot_passkey(results, lengths, depths, path):
    """Heat-maps like the paper's needle figure: depth (rows) x length (columns), one per run
    and, for NSA runs, one of selection recall."""
    plt = pyplot()
    panels = [(r, "accuracy") for r in results] + [(r, "recall") for r in results
                                                   if r.get("recall") is not None]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                             figsize=(1.5 + (0.7 * len(lengths) + 0.8) * len(panels),
                                      1.6 + 0.45 * len(depths)))
    for i, (ax, (r, key)) in enumerate(zip(axes[0], panels)):
        grid = 100 * np.array(r[key]).T                                   # [depth, length]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (d, li), v in np.ndenumerate(grid):
            ax.text(li, d, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)),
                      [fmt_tokens(n) + ("*" if n > r["block_size"] else "") for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
        ax.tick_params(labelleft=i == 0)
        ax.set_xlabel("tokens (*: past block_size)")
        if i == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(f"{r['attention']} {'exact match' if key == 'accuracy' else 'sel. recall'}"
                     f"\n{r['out_dir']}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="%", shrink=0.9)
    save_figure(fig, path)


def cmd_passkey(args):
    runs, infos = open_runs(args)
    block_size = min(i["block_size"] for i in infos)
    lengths = (sorted(set(parse_sizes(args.lengths, "lengths"))) if args.lengths
               else default_lengths(block_size))
    try:
        depths = [float(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise UserError(f"--depths must be a comma list of percentages, got {args.depths!r}") \
            from None
    if not depths or not all(0 <= d <= 100 for d in depths):
        raise UserError(f"--depths must be percentages in [0, 100], got {args.depths!r}")
    if args.samples < 1 or args.batch_size < 1:
        raise UserError("--samples and --batch_size must be >= 1")
    data_dir, dataset = pick_dataset(args, infos)
    data = read_split(data_dir, dataset, "val")
    dev, dtype, autocast = device_and_autocast(args)
    enc = common.get_encoding()
    docs = make_passkey_docs(enc.encode_ordinary, data, lengths, depths, args.samples,
                             torch.Generator().manual_seed(args.seed))
    print(f"passkey retrieval: {args.samples} samples per cell, filler from "
          f"{os.path.join(data_dir, dataset, 'val.bin')}; {dev}, {dtype}")
    results = []
    for info, ckpt in runs:
        t0 = time.time()
        model = build_model(info, ckpt, dev, max(lengths))
        nsa = info["attention"] == "nsa"
        acc, first_acc, key_att, key_att_layer, recall, recall_layer, rank, rank_layer, \
            examples, split, key_att_last, recall_last, slc_att, slc_gate = ([] for _ in range(14))
        for length in lengths:
            rows = docs[length]
            sc = score_passkey(model, rows, args.batch_size, dev, autocast)
            correct, first, on_key, hits, ranks = (sc[k] for k in ("correct", "first", "on_key",
                                                                   "hits", "ranks"))
            by_depth = [[i for i, r in enumerate(rows) if r[0] == d] for d in range(len(depths))]
            acc.append([float(correct[ix].float().mean()) for ix in by_depth])
            first_ok = first_token_right(first, rows)
            first_acc.append([float(first_ok[ix].float().mean()) for ix in by_depth])
            best_head = on_key.amax(2)                                            # [N, n_layer]
            key_att.append([float(best_head[ix].amax(1).mean()) for ix in by_depth])
            key_att_layer.append([round(v, 4) for v in best_head.mean(0).tolist()])
            best_last = sc["on_key_last"].flatten(1).amax(1)                      # [N]
            key_att_last.append([float(best_last[ix].mean()) for ix in by_depth])
            if nsa:
                recall_last.append([float(sc["hits_last"][ix].float().mean()) for ix in by_depth])
                # the selected branch alone: the head that puts the most on the key, and its gate
                slc_best, head = sc["slc_on_key"].flatten(1).max(1)                # [N]
                gate = sc["slc_gate"].flatten(1).gather(1, head[:, None])[:, 0]
                slc_att.append([float(slc_best[ix].mean()) for ix in by_depth])
                slc_gate.append([float(gate[ix].mean()) for ix in by_depth])
                recall.append([float(hits[ix].float().mean()) for ix in by_depth])
                recall_layer.append([round(v, 4) for v in hits.float().mean(dim=(0, 2)).tolist()])
                best = ranks.flatten(1).amin(1)                                   # [N]
                rank.append([float(best[ix].median()) for ix in by_depth])
                rank_layer.append(ranks.amin(2).median(0).values.tolist())
                # is retrieval limited by the selection? exact matches where some layer and KV
                # head selects the needle's block, and where none does
                found = hits.flatten(1).any(1)                                    # [N]
                split.append({"selected": [int(correct[found].sum()), int(found.sum())],
                              "not_selected": [int(correct[~found].sum()), int((~found).sum())]})
            wrong = [next((i for i in ix if not correct[i]), None) for ix in by_depth]
            examples.append([{"depth": depths[rows[i][0]], "expected": decode(enc, rows[i][2][
                rows[i][4]:]), "greedy_first_token": decode(enc, [int(first[i])])}
                for i in wrong if i is not None])
            print(f"{info['out_dir']} {fmt_tokens(length)}: "
                  f"{100 * float(correct.float().mean()):.0f}% ({time.time() - t0:.1f}s)",
                  file=sys.stderr)
        results.append({**info, "lengths": lengths, "depths": depths, "accuracy": acc,
                        "first_token": first_acc, "key_attention": key_att,
                        "key_attention_by_layer": key_att_layer,
                        "key_attention_last": key_att_last,
                        "recall": recall if nsa else None,
                        "recall_last": recall_last if nsa else None,
                        "selected_key_attention": slc_att if nsa else None,
                        "selected_gate": slc_gate if nsa else None,
                        "recall_by_layer": recall_layer if nsa else None,
                        "needle_rank": rank if nsa else None,
                        "needle_rank_by_layer": rank_layer if nsa else None,
                        "accuracy_by_selection": split if nsa else None,
                        "wrong_examples": examples, "seconds": time.time() - t0})
        del model
    for i, r in enumerate(results):
        print(f"\n[{i + 1}] {label(r)}")
        print(passkey_tables(r, lengths, depths, r["block_size"]))
        if any(n > r["block_size"] for n in lengths):
            print(f"* past block_size {r['block_size']}: extrapolation")
    if args.plot:
        plot_passkey(results, lengths, depths, args.plot)
    if args.json:
        write_json(args.json, {"mode": "passkey", "samples": args.samples, "dataset": dataset,
                               "data_dir": data_dir, "template": {
                                   "needle": common.NEEDLE, "question": common.QUESTION,
                                   "answer": common.ANSWER}, "runs": results})


# ----------------------------------------------------------------------------- shared
def open_runs(args):
    """The runs of --out_dir (comma-separated) and their infos; with --plot, checks first that
    matplotlib imports, so that a missing one stops before any evaluation."""
    out_dirs = [d.strip() for d in args.out_dir.split(",") if d.strip()]
    if not out_dirs:
        raise UserError("--out_dir must name at least one run folder")
    if args.plot:
        pyplot()
    runs = read_runs(out_dirs)
    return runs, [info for info, _ in runs]


def device_and_autocast(args):
    dev, dtype = common.resolve_device(args.device, args.dtype)
    return dev, dtype, common.autocast(dev, dtype)


def save_figure(fig, path):
    fig.savefig(path, dpi=150, bbox_inches="tight")
    print(f"wrote {path}", file=sys.stderr)


def write_json(path, record):
    record = {**record, "environment": common.environment(), "command": sys.argv}
    common.atomic_write(path, lambda f: f.write(json.dumps(record, indent=1) + "\n"), mode="w")
    print(f"wrote {path}", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--out_dir", required=True,
                        help="run folder(s) holding ckpt.pt, comma-separated")
    shared.add_argument("--dataset", help="default: the one the runs trained on")
    shared.add_argument("--data_dir", help="default: the runs' data_dir (else data)")
    shared.add_argument("--batch_size", type=int, default=4, help="sequences per forward")
    shared.add_argument("--seed", type=int, default=1337, help="windows, keys and filler")
    shared.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    shared.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), "
                                                        "float32, bfloat16, float16")
    shared.add_argument("--json", help="write every number to this file")
    shared.add_argument("--plot", help="write a figure to this .png (needs matplotlib)")
    loss = modes.add_parser("loss", parents=[shared], help="loss by position on long documents")
    loss.add_argument("--T", type=int, help="window length (default: the runs' block_size)")
    loss.add_argument("--windows", type=int, default=32, help="windows of T tokens")
    passkey = modes.add_parser("passkey", parents=[shared],
                               help="passkey retrieval accuracy (and NSA selection recall)")
    passkey.add_argument("--lengths", help="document lengths, e.g. 1k,2k,4k,8k,16k (default: "
                                           "1k ... block_size, and 2x block_size)")
    passkey.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths, %% of filler")
    passkey.add_argument("--samples", type=int, default=10, help="documents per cell")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    {"loss": cmd_loss, "passkey": cmd_passkey}[args.mode](args)


if __name__ == "__main__":
    common.run_cli(main, "eval.py")
