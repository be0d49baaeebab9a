"""
Train nanoNSA's GPT (NSA or full attention) on a dataset made by prepare_data.py.

    python prepare_data.py && python train.py config/train_shakespeare_cpu.py   # CPU, ~6 min
    python train.py config/train_shakespeare_cpu.py --attention=full --out_dir=out-shakespeare-full
    python train.py config/train_shakespeare_cpu.py --init_from=resume --max_iters=600  # continue
    python prepare_data.py python && python train.py config/train_python_8k_nsa.py  # one GPU
    python prepare_data.py python --with_site_packages
    torchrun --standalone --nproc_per_node=8 train.py config/train_python_32k_nsa.py  # DDP

Without a config file, the defaults are the tiny CPU run's, written to out/ (sample.py's
default), so `python prepare_data.py && python train.py && python sample.py` works as is.

Settings are the globals below; a config file (plain Python assignments) then `--key=value`
arguments override them, in that order. Values are checked against the default's type.
Checkpoints (out_dir/ckpt.pt) hold everything needed for --init_from=resume to continue
exactly where the run stopped: weights, optimizer, RNG states and the data sampler's state.
Every eval_interval steps (and at the end) the val loss is measured and the checkpoint written;
the numbers of each logged step also go to out_dir/log.jsonl.
"""
import ast
import builtins
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

# ----------------------------------------------------------------------------- defaults
# The defaults train the tiny Shakespeare model of config/train_shakespeare_cpu.py (minutes on a
# CPU), so that `python prepare_data.py && python train.py && python sample.py` works as is.
# I/O
out_dir = "out"
data_dir = "data"
dataset = "shakespeare"
eval_interval = 100        # steps between val-loss measurements (and checkpoints)
log_interval = 10          # steps between log lines
eval_iters = 10            # batches per loss estimate
eval_only = False
always_save_checkpoint = True  # else save only when val loss improves
init_from = "scratch"      # "scratch" or "resume" (from out_dir/ckpt.pt)
progress = True            # tqdm progress bar
# data
gradient_accumulation_steps = 1  # total over all DDP processes
batch_size = 8             # sequences per micro-step per process
block_size = 256
# model (GPTConfig)
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
dropout = 0.0
bias = False
attention = "nsa"          # "nsa" or "full"
block_len = 16             # l: compression block
block_stride = 8           # d: compression stride
select_block = 32          # l': selection block
n_select = 4               # n: selected blocks
window = 64                # w: sliding window
rope_base = 10000.0
vocab_size = 50304         # GPT-2's 50257 padded to a multiple of 64
# optimizer
learning_rate = 2e-3
max_iters = 300
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0            # 0 disables
# learning-rate schedule: linear warmup, then cosine decay to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 30
lr_decay_iters = 0         # 0: max_iters
min_lr = 2e-4
# system
device = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
dtype = "auto"             # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16",
                           # "float16"
compile = False            # torch.compile the model
backend = "auto"           # DDP backend: "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
seed = 1337
# -----------------------------------------------------------------------------

MODEL_KEYS = ["block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout",
              "bias", "attention", "block_len", "block_stride", "select_block", "n_select",
              "window", "rope_base"]
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per GPU, by a substring of the device name.
# Checked in order: "H100 PCIe" before "H100".
PEAK_BF16_FLOPS = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12),
                   ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362e12), ("L4", 121e12)]


class ConfigError(Exception):
    """A bad setting or missing input; printed as one clear line, without a traceback."""


def parse_value(key, text, default):
    """`--key=text` -> a value of default's type (text is a Python literal, or a bare string)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word such as --attention=full
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # --out_dir=2024 is a folder name, not a number
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--{key} must be True or False, got {text!r}")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not type(default):
        raise ConfigError(f"--{key} must be {type(default).__name__} "
                          f"(like its default {default!r}), got {text!r}")
    return value


def apply_config(args, settings):
    """Apply config files and --key=value args (in order) to settings, a dict of defaults."""
    for arg in args:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found")
            values = {}
            with open(arg) as f:
                source = f.read()
            try:  # builtins.compile: the setting `compile` shadows the builtin in this module
                exec(builtins.compile(source, arg, "exec"), {}, values)
            except Exception as e:  # anything a config file's code raises, reported as such
                raise ConfigError(f"config file {arg} failed: {type(e).__name__}: {e}") from e
            for key, value in values.items():
                if key.startswith("_"):
                    continue
                if key not in settings:
                    raise ConfigError(f"unknown setting {key!r} in {arg}")
                settings[key] = parse_value(key, repr(value), settings[key])
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"arguments are --key=value, got {arg!r}")
            if key not in settings:
                raise ConfigError(f"unknown setting --{key} (see the defaults at the top of "
                                  f"train.py)")
            settings[key] = parse_value(key, text, settings[key])
    return settings


def peak_flops(device_name):
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    decay_iters = cfg["lr_decay_iters"] or cfg["max_iters"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= decay_iters:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, decay_iters - cfg["warmup_iters"])
    coeff = 0.5 * (1 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


def rng_state(sampler):
    """Every RNG this process draws from, as tensors and lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "sampler": sampler.get_state(),
    }


def set_rng_state(state, sampler):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    sampler.set_state(state["sampler"])


def save_checkpoint(path, ckpt):
    """Write to a temporary file and rename it over path: a crash never leaves half a ckpt.pt."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location):
    """torch.load(weights_only=True) with errors that say what is wrong with the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError...)
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"checkpoint {path} is corrupt or not a nanoNSA checkpoint "
                          f"({type(e).__name__}: {first_line})") from e
    missing = [k for k in ("model", "model_args") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"checkpoint {path} is not a nanoNSA checkpoint "
                          f"(no {', '.join(missing)})")
    return ckpt


def prepare_command(name):
    if name in ("shakespeare", "python"):
        return f"python prepare_data.py {name}"
    if name == "python_site":
        return "python prepare_data.py python --with_site_packages"
    return f"python prepare_data.py --input PATH --name {name}"


def open_data(cfg):
    """Memory-map check of data/<dataset>/{train,val}.bin; returns their paths."""
    folder = os.path.join(cfg["data_dir"], cfg["dataset"])
    paths = {}
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path):
            extra = f" --data_dir {cfg['data_dir']}" if cfg["data_dir"] != "data" else ""
            raise ConfigError(f"{path} not found: prepare the dataset first with "
                              f"`{prepare_command(cfg['dataset'])}{extra}`")
        n = os.path.getsize(path) // 2
        if n < cfg["block_size"] + 1:
            raise ConfigError(f"{path} holds {n} tokens, fewer than block_size + 1 = "
                              f"{cfg['block_size'] + 1}: use a smaller block_size or more data")
        paths[split] = path
    return paths


def get_batch(path, batch_size, block_size, generator, device):
    """batch_size random windows of block_size + 1 tokens from a .bin; the memmap is reopened
    each call because a long-lived np.memmap keeps growing its resident memory."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous(), y.contiguous()


def main(argv):
    settings = {k: v for k, v in globals().items()
                if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    cfg = apply_config(argv, settings)

    # DDP: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{local_rank}"
            torch.cuda.set_device(cfg["device"])
    master = rank == 0
    dev = torch.device(cfg["device"])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg['device']!r} asked for, but CUDA is not available")
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() \
            else "float32"
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg['dtype']!r}")
    if cfg["init_from"] not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) "
                          f"must be a multiple of the number of processes ({world_size})")
    accum = cfg["gradient_accumulation_steps"] // world_size
    for key in ("eval_interval", "log_interval", "eval_iters", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    paths = open_data(cfg)

    # Everything above only reads; from here on the run may write into out_dir.
    from model import GPT, GPTConfig
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "cpu") if cfg["init_from"] == "resume" else None
    model_args = {k: cfg[k] for k in MODEL_KEYS}
    if ckpt is not None:
        # the architecture comes from the checkpoint; other settings from this command line
        for k in MODEL_KEYS:
            if k in ckpt["model_args"] and ckpt["model_args"][k] != cfg[k] and master:
                print(f"resume: {k} = {ckpt['model_args'][k]!r} from the checkpoint "
                      f"(this run's setting {cfg[k]!r} is ignored)")
        model_args.update({k: ckpt["model_args"][k] for k in MODEL_KEYS if k in ckpt["model_args"]})
        cfg.update({k: model_args[k] for k in MODEL_KEYS})
        paths = open_data(cfg)
    try:
        gptconf = GPTConfig(**model_args)
    except ValueError as e:
        raise ConfigError(f"bad model config: {e}") from e

    if ddp:
        from torch.distributed import init_process_group
        bk = cfg["backend"]
        if bk == "auto":
            bk = "nccl" if dev.type == "cuda" else "gloo"
        init_process_group(backend=bk)
    if dev.type == "cuda":  # TF32 for any fp32 matmuls left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg["seed"])  # same initial weights in every process
    model = GPT(gptconf)
    # each process draws its own batches and dropout masks
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    sampler = torch.Generator().manual_seed(cfg["seed"] + rank)

    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model.to(dev)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), dev.type)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg["dtype"] == "float16")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        states = ckpt.get("rng_states") or []
        if len(states) == world_size:
            set_rng_state(states[rank], sampler)
        elif master:
            print(f"resume: checkpoint has RNG states of {len(states)} processes, this run has "
                  f"{world_size}: batches are reseeded, so the run will not repeat exactly")
    del ckpt

    raw_model = model
    if cfg["compile"]:
        model = torch.compile(model)
    eval_model = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None)

    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[cfg["dtype"]]
    autocast = nullcontext() if ptdtype == torch.float32 else \
        torch.autocast(device_type=dev.type, dtype=ptdtype)
    peak = peak_flops(torch.cuda.get_device_name(dev)) \
        if dev.type == "cuda" and ptdtype != torch.float32 else None
    tokens_per_iter = cfg["batch_size"] * cfg["block_size"] * accum * world_size

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches per split. The batches come from a generator
        reseeded every time: the same windows at each eval (comparable numbers) and the
        training sampler is left untouched (exact resume)."""
        out = {}
        eval_model.eval()
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(cfg["seed"] + 1_000_003)
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                x, y = get_batch(paths[split], cfg["batch_size"], cfg["block_size"], gen, dev)
                with autocast:
                    _, loss = eval_model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        eval_model.train()
        return out

    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        # A resumed run's log continues from the checkpoint: keep the training steps before it
        # and the evaluations up to it (the checkpoint's own evaluation is not repeated).
        kept = []
        if cfg["init_from"] == "resume" and os.path.isfile(log_path):
            with open(log_path) as f:
                records = [json.loads(line) for line in f if line.strip()]
            kept = [json.dumps(r) + "\n" for r in records
                    if r["iter"] < iter_num or (r["iter"] == iter_num and "eval_train_loss" in r)]
        with open(log_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
        print(f"{'resuming at step ' + str(iter_num) if iter_num else 'training from scratch'}: "
              f"{raw_model.get_num_params() / 1e6:.2f}M non-embedding parameters, "
              f"attention={gptconf.attention}, block_size={gptconf.block_size}, device={dev}, "
              f"dtype={cfg['dtype']}, {world_size} process(es), {tokens_per_iter:,} tokens/step")

    bar = None
    if master and cfg["progress"]:
        from tqdm import tqdm
        bar = tqdm(total=cfg["max_iters"], initial=iter_num, unit="step", dynamic_ncols=True)

    def say(msg):
        (bar.write if bar is not None else print)(msg)

    def log(record):
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    start_iter = iter_num
    val_loss = None
    while True:
        # Evaluate and checkpoint: every eval_interval steps and at the end. A resumed run has
        # already done this at its first step.
        already_done = iter_num == start_iter and cfg["init_from"] == "resume"
        if cfg["eval_only"] or ((iter_num % cfg["eval_interval"] == 0
                                 or iter_num >= cfg["max_iters"]) and not already_done):
            states = [rng_state(sampler)]
            if ddp:
                import torch.distributed as dist
                states = [None] * world_size
                dist.all_gather_object(states, rng_state(sampler))
            if master:
                losses = estimate_loss()
                val_loss = losses["val"]
                if not math.isfinite(val_loss):
                    raise ConfigError(f"val loss is {val_loss} at step {iter_num}; stopping. "
                                      f"The last good checkpoint is kept at {ckpt_path}")
                say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {val_loss:.4f}")
                log({"iter": iter_num, "eval_train_loss": losses["train"], "val_loss": val_loss})
                improved = val_loss < best_val_loss
                best_val_loss = min(best_val_loss, val_loss)
                if (cfg["always_save_checkpoint"] or improved) and not cfg["eval_only"]:
                    save_checkpoint(ckpt_path, {
                        "model": raw_model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "model_args": asdict(gptconf),
                        "iter_num": iter_num,
                        "best_val_loss": best_val_loss,
                        "config": cfg,
                        "rng_states": states,
                    })
            if cfg["eval_only"]:
                break
        if iter_num >= cfg["max_iters"]:
            break

        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        loss_sum = torch.zeros((), device=dev)
        for micro in range(accum):
            if ddp:  # all-reduce gradients only at the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            x, y = get_batch(paths["train"], cfg["batch_size"], cfg["block_size"], sampler, dev)
            with autocast:
                _, loss = model(x, y)
            loss_sum += loss.detach().float()
            scaler.scale(loss / accum).backward()
        step_loss = loss_sum / accum
        if ddp:
            import torch.distributed as dist
            dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)  # gloo has no AVG
            step_loss /= world_size
        # .item() syncs once per step: every process sees the same loss and stops together
        lossf = step_loss.item()
        if not math.isfinite(lossf):
            raise ConfigError(f"loss is {lossf} at step {iter_num}; stopping before the update. "
                              f"The last good checkpoint is kept at {ckpt_path}")
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.time() - t0

        if master and (iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"] - 1):
            record = {"iter": iter_num, "train_loss": lossf, "lr": lr, "ms_per_iter": 1000 * dt,
                      "tokens_per_s": tokens_per_iter / dt}
            msg = (f"iter {iter_num}: loss {lossf:.4f}"
                   + (f", val {val_loss:.4f}" if val_loss is not None else "")
                   + f" | {1000 * dt:.1f} ms/step | {tokens_per_iter / dt:,.0f} tok/s")
            if peak is not None:
                mfu = raw_model.estimate_mfu(cfg["batch_size"] * accum, dt, peak)
                record["mfu"] = mfu
                msg += f" | mfu {100 * mfu:.1f}%"
            if dev.type == "cuda":
                record["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
                msg += f" | mem {record['peak_mem_gib']:.1f} GiB"
            say(msg)
            log(record)
            val_loss = None  # a val loss is logged once, on the first line after it was measured
        if bar is not None:
            bar.set_postfix(loss=f"{lossf:.3f}", refresh=False)
            bar.update(1)
        iter_num += 1

    if bar is not None:
        bar.close()
    if ddp:
        from torch.distributed import destroy_process_group
        destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
