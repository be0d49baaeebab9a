"""
Pieces the scripts share (train.py, sample.py, bench.py, prepare_data.py, eval.py): one-line
errors for user mistakes, config files and --key=value overrides, device and dtype resolution,
atomic writes and checkpoints, GPU peak rates, run provenance, and the passkey task.
No script imports another script; they all import this.
"""
import ast
import builtins
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
        if not os.path.isfile(arg):
            raise UserError(f"config file {arg} not found")
        values = {}
        with open(arg) as f:
            source = f.read()
        try:  # builtins.compile: a setting named `compile` shadows the builtin in scripts
            exec(builtins.compile(source, arg, "exec"), {}, values)
        except Exception as e:  # whatever a config file's own code raises, reported as such
            raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}") from e
        for key, value in values.items():
            if key.startswith("_"):
                continue
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


def load_model(path, device):
    """(GPT in eval mode on device, checkpoint dict without the weights) from a ckpt.pt."""
    from model import GPT, GPTConfig
    ckpt = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt.pop("model"))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit this model.py: {e}") from e
    return model.eval().to(device), ckpt


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
           "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
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
# The retrieval test (pinned in README.md): filler text, the needle at a chosen depth, more
# filler, then the question; the model must continue with the key (greedy, exact match).
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


def passkey_sample(encode, filler, length, depth, key):
    """One passkey sequence of exactly `length` tokens whose last tokens are the question.

    encode: text -> token ids; filler: 1-D array of token ids, at least `length` long (the
    sequence's filler is its first tokens: pass a random slice for variety); depth in [0, 1]:
    the fraction of the filler placed before the needle; key: a 5-digit int.
    Returns (ids: list of `length` ints, answer: list of ids, needle_pos: index of the needle's
    first token)."""
    needle = encode(NEEDLE.format(key=key))
    question = encode(QUESTION)
    answer = encode(ANSWER.format(key=key))
    n_filler = length - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"length {length} is shorter than the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if len(filler) < n_filler:
        raise ValueError(f"need {n_filler} filler tokens, got {len(filler)}")
    before = round(depth * n_filler)
    fill = [int(t) for t in filler[:n_filler]]
    ids = fill[:before] + needle + fill[before:] + question
    return ids, answer, before
