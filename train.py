"""
Train nanoNSA's GPT (NSA or full attention) on a dataset made by prepare_data.py.

    python prepare_data.py && python train.py               # tiny NSA model, CPU, ~6 min -> out/
    python train.py --attention=full --out_dir=out-full     # its full-attention baseline
    python train.py --init_from=resume --max_iters=600      # continue the run in out/
    python train.py config/train_shakespeare_cpu.py         # -> out-shakespeare-nsa/
    python train.py config/train_shakespeare_cpu.py --attention=full   # -> out-shakespeare-full/
    python prepare_data.py python && python train.py config/train_python_8k_nsa.py    # one GPU
    python prepare_data.py python --with_site_packages
    torchrun --standalone --nproc_per_node=2 train.py config/train_python_32k_nsa.py  # DDP, 2 GPUs

Settings are the globals below; config files (plain Python assignments) and then --key=value
arguments override them, in order, each checked against its default's type. A setting's name
in braces in out_dir is replaced by its value: out_dir = "out-shakespeare-{attention}".

A run lives in out_dir: ckpt.pt holds everything --init_from=resume needs to continue exactly
(weights, optimizer, RNG states, the run's settings), written every
eval_interval steps and at the end to a temporary file that is then renamed; log.jsonl gets one
JSON record per logged step and evaluation. Nothing is lost by accident:
- a scratch run refuses an out_dir that holds a checkpoint, unless --overwrite=True;
- out_dir is first written after the settings, the data and the model have been checked and
  the first evaluation (or, on resume, the first step) has run;
- log.jsonl is only appended to: each run or resume starts with an {"event": "start"} record,
  and a step logged again after a resume replaces its earlier record;
- on resume, every setting of the run (schedule, batch, data, seed...) comes from the
  checkpoint unless it is given again, and the run says which ones changed;
- Ctrl-C stops at once and names the step of the last checkpoint.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import (UserError, apply_config, get_encoding, load_checkpoint, mix_passkey,
                    peak_bf16_flops, resolve_device, run_cli, save_checkpoint)
from common import autocast as mixed_precision  # train() names its context `autocast`
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------- settings
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
overwrite = False          # let a scratch run replace the run already in out_dir
progress = True            # tqdm progress bar
# data
gradient_accumulation_steps = 1  # total over all DDP processes
batch_size = 8             # sequences per micro-step per process
block_size = 256
# passkey retrieval documents mixed into training (eval.py passkey measures retrieval; README)
passkey_fraction = 0.0     # chance that a training row is rebuilt from passkey documents
passkey_min_length = 64    # their lengths are log-uniform in [min, max] tokens
passkey_max_length = 0     # 0: block_size
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
own_window_kv = False      # the window branch projects its own keys/values (model.py, issue 12)
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
lr_decay_iters = 0         # 0: max_iters (the checkpoint stores the resolved number)
min_lr = 2e-4
# system
device = "auto"            # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
dtype = "auto"             # "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16",
                           # "float16"
compile = False            # torch.compile the model
backend = "auto"           # DDP backend: "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
seed = 1337
# -----------------------------------------------------------------------------
SETTINGS = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)]
# Settings of one invocation rather than of the run: a resume never takes them from the checkpoint.
LOCAL_KEYS = {"out_dir", "data_dir", "init_from", "overwrite", "eval_only", "progress", "device",
              "compile", "backend"}


# ----------------------------------------------------------------------------- checks
def load_settings(argv, say):
    """The run's settings and, on resume, its checkpoint. Checks every setting that can be
    checked without the data or the model; reads out_dir but writes nothing."""
    cfg, given = apply_config(argv, dict(SETTINGS))
    if cfg["init_from"] not in ("scratch", "resume"):
        raise UserError(f"init_from must be 'scratch' or 'resume', got {cfg['init_from']!r}")
    try:
        cfg["out_dir"] = cfg["out_dir"].format(**cfg)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"out_dir {cfg['out_dir']!r}: braces must hold a setting's name, as in "
                        f"out-{{attention}} ({type(e).__name__}: {e})") from None
    check_out_dir(cfg["out_dir"])
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = None
    if cfg["init_from"] == "resume":
        ckpt = load_checkpoint(ckpt_path)
        for key in ("optimizer", "iter_num", "best_val_loss"):
            if key not in ckpt:
                raise UserError(f"checkpoint {ckpt_path} has no {key}: it cannot be resumed "
                                f"(sample.py can still read it)")
        resume_settings(cfg, given, ckpt, say)
    elif os.path.exists(ckpt_path) and not cfg["overwrite"]:
        raise UserError(f"{cfg['out_dir']} already holds a run ({ckpt_path}): continue it with "
                        f"--init_from=resume, or train into a fresh --out_dir "
                        f"(--overwrite=True replaces it)")
    check_settings(cfg)
    cfg["lr_decay_iters"] = cfg["lr_decay_iters"] or cfg["max_iters"]
    if ckpt is not None and not cfg["eval_only"]:
        done = ckpt["iter_num"]
        if done >= cfg["max_iters"]:
            raise UserError(f"the run in {cfg['out_dir']} is at step {done} and max_iters is "
                            f"{cfg['max_iters']}: nothing to train. To go on, pass "
                            f"--max_iters=N larger than {done}")
        decayed = cfg["decay_lr"] and cfg["lr_decay_iters"] < cfg["max_iters"]
        if decayed and "max_iters" in given:
            say(f"resume: the learning rate stays at min_lr={cfg['min_lr']:g} from step "
                f"lr_decay_iters={cfg['lr_decay_iters']} to max_iters={cfg['max_iters']} "
                f"(--lr_decay_iters=N stretches the decay)")
    return cfg, ckpt


def check_out_dir(out_dir):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is a file, not a folder")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UserError(f"out_dir {out_dir}: {parent} is not writable")


def resume_settings(cfg, given, ckpt, say):
    """A resumed run keeps its own settings: the model's shape always, every other setting of
    the run unless it was given again (config file or --key=value). Says what changed."""
    saved = {**ckpt.get("config", {}), **ckpt["model_args"]}
    if saved.get("lr_decay_iters") == 0:  # a checkpoint written before the schedule was stored
        saved["lr_decay_iters"] = saved.get("max_iters", 0)
    changed = []
    for key in SETTINGS:
        if key in LOCAL_KEYS or key not in saved:
            continue
        if key not in given:
            cfg[key] = saved[key]
        elif cfg[key] != saved[key]:
            if key in ckpt["model_args"] and key != "dropout":
                raise UserError(f"{key}={cfg[key]!r} was given, but the checkpoint's model has "
                                f"{key}={saved[key]!r}: the model's shape cannot change on "
                                f"resume (drop the setting, or start a run in a fresh --out_dir)")
            changed.append(f"{key}={cfg[key]!r} (the run had {saved[key]!r})")
    say("resume: the run's settings come from its checkpoint"
        + (f", except {', '.join(changed)}" if changed else ""))


def check_settings(cfg):
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval",
                "eval_iters"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr",
                "weight_decay", "grad_clip"):
        if cfg[key] < 0:
            raise UserError(f"{key} must be >= 0, got {cfg[key]}")
    if not 0.0 <= cfg["passkey_fraction"] <= 1.0:
        raise UserError(f"passkey_fraction must be in [0, 1], got {cfg['passkey_fraction']}")
    longest = cfg["passkey_max_length"] or cfg["block_size"]
    if cfg["passkey_fraction"] and not (1 <= cfg["passkey_min_length"] <= longest
                                        <= cfg["block_size"]):
        raise UserError(f"passkey lengths need 1 <= passkey_min_length "
                        f"({cfg['passkey_min_length']}) <= passkey_max_length ({longest}) <= "
                        f"block_size ({cfg['block_size']})")
    if cfg["backend"] not in ("auto", "nccl", "gloo"):
        raise UserError(f"backend must be auto, nccl or gloo, got {cfg['backend']!r}")


def model_config(cfg, warn):
    """GPTConfig from the settings. NSA settings under which it is not sparse are a warning
    (GPTConfig.dense_warnings), or an error when no compression block can form at all."""
    try:
        conf = GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from None
    if conf.attention != "nsa":
        return conf
    if conf.block_size < conf.block_len:
        raise UserError(f"block_size {conf.block_size} is shorter than block_len "
                        f"{conf.block_len}: no compression block ever completes, so NSA has no "
                        f"compressed keys to select blocks with; use block_size >= block_len, "
                        f"or --attention=full")
    for msg in conf.dense_warnings():
        warn(f"NSA is not sparse: {msg}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        warn("TRITON_INTERPRET=1 is set (it is meant for the tests): NSA's Triton kernels run "
             "in the interpreter, about 300x slower than training without it. Unset it: "
             "env -u TRITON_INTERPRET python train.py ...")
    return conf


def prepare_command(name):
    if name in ("shakespeare", "python"):
        return f"python prepare_data.py {name}"
    if name == "python_site":
        return "python prepare_data.py python --with_site_packages"
    return f"python prepare_data.py --input PATH --name {name}"


def check_data(cfg):
    """Paths of data_dir/dataset/{train,val}.bin, checked: present, longer than block_size, and
    every token id below vocab_size (one pass over the file; 50M tokens take a second)."""
    paths = {}
    for split in ("train", "val"):
        path = os.path.join(cfg["data_dir"], cfg["dataset"], f"{split}.bin")
        if not os.path.isfile(path):
            extra = f" --data_dir {cfg['data_dir']}" if cfg["data_dir"] != "data" else ""
            raise UserError(f"{path} not found: prepare the dataset first with "
                            f"`{prepare_command(cfg['dataset'])}{extra}`")
        n = os.path.getsize(path) // 2
        if n < cfg["block_size"] + 1:
            raise UserError(f"{path} holds {n} tokens, fewer than block_size + 1 = "
                            f"{cfg['block_size'] + 1}: use a smaller block_size or more data")
        top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
        if top >= cfg["vocab_size"]:
            raise UserError(f"{path} holds token id {top}, but vocab_size is "
                            f"{cfg['vocab_size']}: use vocab_size > {top} (the default 50304 is "
                            f"GPT-2's 50257 padded)")
        paths[split] = path
    return paths


# ----------------------------------------------------------------------------- pieces of a run
def batch_generator(seed, step, index):
    """The random generator of micro-batch `index` of step `step`, counted over all processes.
    The training data is a function of (seed, step, index) alone: N processes that split a
    step's gradient_accumulation_steps draw exactly the windows one process would draw (the
    same loss curve on 1 or 8 GPUs, issue 13), and a resumed run draws what the uninterrupted
    run would have."""
    state = np.random.SeedSequence([seed, step, index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def get_batch(path, batch_size, block_size, generator, device, mix=None):
    """batch_size random windows of block_size + 1 tokens from a .bin, passed through
    mix(x, y, generator) on the CPU if given (the passkey mix); the memmap is reopened each call
    because a long-lived np.memmap keeps growing its resident memory."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = xy[:, :-1], xy[:, 1:]
    if mix is not None:
        x, y = mix(x, y, generator)
    if device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous(), y.contiguous()


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / (cfg["warmup_iters"] + 1)
    if it >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (it - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    coeff = 0.5 * (1 + math.cos(math.pi * ratio))
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


def rng_state():
    """Every RNG this process draws from (dropout; the data has its own, batch_generator), as
    tensors and lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() \
            and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def all_rng_states(world_size):
    """rng_state of every process (gathered to all of them under DDP)."""
    if world_size == 1:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def from_rank0(x, ddp, dev):
    """The float x as process 0 has it, in every process (under DDP; x itself otherwise)."""
    if not ddp:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=dev)
    dist.broadcast(t, 0)
    return t.item()


def passkey_mix(cfg, paths):
    """mix(x, y, generator) for get_batch: passkey documents with filler from the training
    split, drawn from the batch's own generator (so a resumed run repeats them exactly); None
    without the mix."""
    if cfg["passkey_fraction"] == 0:
        return None
    encode = get_encoding().encode_ordinary
    filler = np.memmap(paths["train"], dtype=np.uint16, mode="r")
    return lambda x, y, gen: mix_passkey(x, y, cfg["passkey_fraction"], gen, filler, encode,
                                         cfg["passkey_min_length"],
                                         cfg["passkey_max_length"] or None)


def build(conf, cfg, ckpt, dev, dtype, rank, world_size, say):
    """Model (the same initial weights in every process), optimizer and grad scaler, restored on
    resume, and each process's own RNG states (its dropout masks)."""
    torch.manual_seed(cfg["seed"])
    model = GPT(conf)
    torch.manual_seed(cfg["seed"] + rank)
    np.random.seed(cfg["seed"] + rank)
    random.seed(cfg["seed"] + rank)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(dev)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), dev.type)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == "float16")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        states = ckpt.get("rng_states") or []
        if len(states) == world_size:
            set_rng_state(states[rank])
        elif conf.dropout > 0:
            say(f"resume: the checkpoint has RNG states of {len(states)} processes, this run "
                f"has {world_size}: dropout is reseeded, so the run will not repeat exactly")
    return model, optimizer, scaler


@torch.no_grad()
def estimate_loss(model, paths, cfg, dev, autocast):
    """Mean loss over eval_iters batches per split. The batches come from a generator reseeded
    every time: the same windows at each eval (comparable numbers)."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg["seed"] + 1_000_003)
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            x, y = get_batch(paths[split], cfg["batch_size"], cfg["block_size"], gen, dev)
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train_step(model, optimizer, scaler, lr, next_batch, accum, cfg, autocast, ddp):
    """One optimizer step at learning rate lr over accum micro-batches, next_batch(micro) for
    micro in 0..accum-1; returns the mean loss (the same in every process) and the gradient's
    norm before clipping (a tensor). A loss that is not finite returns before the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    dev = next(model.parameters()).device
    loss_sum = torch.zeros((), device=dev)
    for micro in range(accum):
        if ddp:  # all-reduce gradients only at the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        x, y = next_batch(micro)
        with autocast:
            _, loss = model(x, y)
        loss_sum += loss.detach().float()
        scaler.scale(loss / accum).backward()
    step_loss = loss_sum / accum
    if ddp:
        dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)  # gloo has no AVG
        step_loss /= dist.get_world_size()
    lossf = step_loss.item()  # one sync per step: every process sees it and stops together
    if not math.isfinite(lossf):
        return lossf, None
    scaler.unscale_(optimizer)
    # grad_clip = 0 measures the norm (for the log) without clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                               cfg["grad_clip"] or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":  # the step's time is the GPU's
        torch.cuda.synchronize(dev)
    return lossf, grad_norm


def checkpoint(raw_model, optimizer, scaler, conf, cfg, iter_num, best_val_loss, rng_states):
    """What ckpt.pt holds: enough to resume exactly, and the run's settings (cfg, with the
    learning-rate schedule resolved; device and dtype as given, e.g. "auto")."""
    return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "model_args": dataclasses.asdict(conf), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "config": cfg, "rng_states": rng_states}


def append_log(path, records):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- setup
def main(argv):
    ddp = "RANK" in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    say = print if master else (lambda *args: None)

    def warn(msg):
        if master:
            print(f"train.py: warning: {msg}", file=sys.stderr)

    cfg, ckpt = load_settings(argv, say)
    dev, dtype = resolve_device(cfg["device"], cfg["dtype"])
    if ddp and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if cfg["gradient_accumulation_steps"] % world_size:
        raise UserError(f"gradient_accumulation_steps ({cfg['gradient_accumulation_steps']}) "
                        f"must be a multiple of the number of processes ({world_size})")
    conf = model_config(cfg, warn)
    paths = check_data(cfg)
    if ddp:
        backend = cfg["backend"] if cfg["backend"] != "auto" else \
            "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    model, optimizer, scaler = build(conf, cfg, ckpt, dev, dtype, rank, world_size, say)
    start = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt is not None else (0, float("inf"))
    del ckpt
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    resuming = cfg["init_from"] == "resume"
    say(f"{f'resuming at step {start[0]}' if resuming else 'training from scratch'}: "
        f"{model.get_num_params() / 1e6:.2f}M non-embedding parameters, "
        f"attention={conf.attention}, block_size={conf.block_size}, device={dev}, "
        f"dtype={dtype}, {world_size} process(es), {tokens:,} tokens/step -> {cfg['out_dir']}/")
    train(cfg, conf, model, optimizer, scaler, paths, dev, dtype, start, ddp, master, say)
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the loop
def train(cfg, conf, model, optimizer, scaler, paths, dev, dtype, start, ddp, master, say):
    """Evaluate and checkpoint every eval_interval steps and at the end, train in between."""
    iter_num, best_val_loss = start
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    accum = cfg["gradient_accumulation_steps"] // world_size  # micro-steps of this process
    raw_model = eval_model = model
    if cfg["compile"]:
        model = eval_model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = mixed_precision(dev, dtype)
    ckpt_path, log_path = (os.path.join(cfg["out_dir"], f) for f in ("ckpt.pt", "log.jsonl"))
    saved_at = iter_num if cfg["init_from"] == "resume" else None
    to_log = [{"event": "start", "iter": iter_num, "init_from": cfg["init_from"],
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
    bar = tqdm(total=cfg["max_iters"], initial=iter_num, unit="step", dynamic_ncols=True) \
        if master and cfg["progress"] else None
    say = bar.write if bar is not None else say
    val_loss = None
    mix = passkey_mix(cfg, paths)
    try:
        while True:
            # a resumed run was evaluated (and checkpointed) at its first step already
            resumed_here = iter_num == start[0] and cfg["init_from"] == "resume"
            if cfg["eval_only"] or (not resumed_here and (iter_num % cfg["eval_interval"] == 0
                                                          or iter_num >= cfg["max_iters"])):
                states = all_rng_states(world_size)
                losses = estimate_loss(eval_model, paths, cfg, dev, autocast) if master else None
                # every process stops on a bad val loss: a rank left alone would wait forever in
                # the next all-reduce under a launcher that does not stop the others
                val_loss = from_rank0(losses["val"] if master else 0.0, ddp, dev)
                if not math.isfinite(val_loss):
                    raise UserError(f"val loss is {val_loss} at step {iter_num}; stopping. "
                                    f"The last good checkpoint is kept at {ckpt_path}")
                if master:
                    say(f"step {iter_num}: train loss {losses['train']:.4f}, "
                        f"val loss {val_loss:.4f}")
                    append_log(log_path, to_log + [{"iter": iter_num, "val_loss": val_loss,
                                                    "eval_train_loss": losses["train"]}])
                    to_log = []
                    improved = val_loss < best_val_loss
                    best_val_loss = min(best_val_loss, val_loss)
                    if (cfg["always_save_checkpoint"] or improved) and not cfg["eval_only"]:
                        save_checkpoint(ckpt_path, checkpoint(raw_model, optimizer, scaler, conf,
                                                              cfg, iter_num, best_val_loss, states))
                        saved_at = iter_num
                if cfg["eval_only"]:
                    break
            if iter_num >= cfg["max_iters"]:
                break

            lr, t0 = get_lr(iter_num, cfg), time.time()
            lossf, grad_norm = train_step(model, optimizer, scaler, lr, lambda micro: get_batch(
                paths["train"], cfg["batch_size"], cfg["block_size"],
                batch_generator(cfg["seed"], iter_num, rank * accum + micro), dev, mix),
                accum, cfg, autocast, ddp)
            if not math.isfinite(lossf):
                raise UserError(f"loss is {lossf} at step {iter_num}; stopping before the "
                                f"update. The last good checkpoint is kept at {ckpt_path}")
            dt = time.time() - t0
            if master and (iter_num % cfg["log_interval"] == 0
                           or iter_num == cfg["max_iters"] - 1):
                record, msg = step_record(raw_model, cfg, accum, world_size, iter_num, lossf,
                                          grad_norm.item(), lr, dt, dev, dtype)
                say(msg + (f" | val {val_loss:.4f}" if val_loss is not None else ""))
                append_log(log_path, to_log + [record])
                to_log, val_loss = [], None  # a val loss is shown once, on the next line
            if bar is not None:
                bar.set_postfix(loss=f"{lossf:.3f}", refresh=False)
                bar.update(1)
            iter_num += 1
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if master:
            last = f"step {saved_at} ({ckpt_path})" if saved_at is not None else "none yet"
            print(f"train.py: stopped at step {iter_num}, last checkpoint at {last}; continue "
                  f"with --init_from=resume", file=sys.stderr)
        sys.exit(130)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory at step {iter_num} (batch_size={cfg['batch_size']}, "
                        f"block_size={cfg['block_size']}): lower batch_size and raise "
                        f"gradient_accumulation_steps to keep the tokens per step") from None
    finally:
        if bar is not None:
            bar.close()


def step_record(raw_model, cfg, accum, world_size, iter_num, lossf, grad_norm, lr, dt, dev,
                dtype):
    """The log record and the printed line of a training step."""
    tokens = cfg["batch_size"] * cfg["block_size"] * accum * world_size
    record = {"iter": iter_num, "train_loss": lossf, "grad_norm": grad_norm, "lr": lr,
              "ms_per_iter": 1000 * dt, "tokens_per_s": tokens / dt}
    msg = f"iter {iter_num}: loss {lossf:.4f} | {1000 * dt:.1f} ms/step | {tokens / dt:,.0f} tok/s"
    peak = peak_bf16_flops(torch.cuda.get_device_name(dev)) \
        if dev.type == "cuda" and dtype != "float32" else None
    if peak is not None:  # per GPU: this process's sequences in dt
        record["mfu"] = raw_model.estimate_mfu(cfg["batch_size"] * accum, dt, peak)
        msg += f" | mfu {100 * record['mfu']:.1f}%"
    if dev.type == "cuda":
        record["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        msg += f" | mem {record['peak_mem_gib']:.1f} GiB"
    return record, msg


if __name__ == "__main__":
    run_cli(main, "train.py")
