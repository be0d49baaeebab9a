"""
CPU tests of the passkey task (common.py) and eval.py: the generator's exact token layout, the
scorer on models known to retrieve (or not), loss by position against the training loss, the
training mix's determinism, NSA selection recall where it is forced, and the CLI.

    TRITON_INTERPRET=1 python -m pytest -q test_eval.py

Tiny models: two layers, 16 channels, head dim 8, which the NSA kernels do not take, so NSA runs
its PyTorch reference even under TRITON_INTERPRET=1 (test_nsa.py covers the kernels; the
interpreter would take minutes here). The CLI runs as a subprocess, as a user runs it.
"""
import json
import os
import re
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import eval as ev
from common import EOT, get_encoding
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
VOCAB = 50304
TINY = dict(block_size=128, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
            block_len=8, block_stride=4, select_block=16, n_select=3, window=16)


class WordCodec:
    """A test tokenizer: words, runs of up to 3 digits (so a key is two tokens, as often in
    GPT-2), punctuation, newline runs, each one token with its leading space; ids from 1000
    on, in order of first sight."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        pieces = re.findall(r" ?[A-Za-z]+| ?\d{1,3}| ?[^\w\s]|\n+| ", text)
        assert "".join(pieces) == text
        return [self.vocab.setdefault(p, 1000 + len(self.vocab)) for p in pieces]


def corpus(n_docs=12, seed=0, lo=20, hi=300):
    """uint16 tokens (ids < 900) of documents of random lengths, each ended by EOT."""
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 900, rng.integers(lo, hi)), EOT) for _ in range(n_docs)]
    return np.concatenate(docs).astype(np.uint16)


def tiny_gpt(attention, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, "attention": attention, **overrides})).eval()


# ----------------------------------------------------------------------------- the generator
@pytest.mark.parametrize("length", [40, 101, 256])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_passkey_sample_layout(length, depth):
    codec = WordCodec()
    needle, question, answer = common.passkey_parts(codec.encode, 27182)
    filler = np.arange(length, dtype=np.int64) + 1                       # distinct, in order
    ids, needle_start, key_positions, answer_start = common.passkey_sample(
        codec.encode, filler, length, depth, 27182)
    n_filler = length - len(needle) - len(question) - len(answer)
    assert len(ids) == length
    assert needle_start == round(depth * n_filler)
    assert ids[needle_start:needle_start + len(needle)] == needle
    assert ids[:needle_start] == filler[:needle_start].tolist()
    rest = ids[needle_start + len(needle):answer_start - len(question)]
    assert rest == filler[needle_start:n_filler].tolist()
    assert ids[answer_start - len(question):answer_start] == question
    assert ids[answer_start:] == answer and len(answer) == 2              # " 271", "82"
    # two copies of the key in the needle, after "is" and before "is the pass key"
    assert [ids[p] for p in key_positions] == answer * 2
    assert key_positions[0] == needle_start + 5 and key_positions[2] == needle_start + 11


def test_passkey_sample_gpt2_tokens():
    """With GPT-2's tokenizer the pieces, encoded apart, are the template's own tokens."""
    enc = get_encoding()
    for key in (10000, 12345, 54321, 99999):
        length = sum(len(part) for part in common.passkey_parts(enc.encode_ordinary, key))
        ids, _, key_pos, answer_start = common.passkey_sample(
            enc.encode_ordinary, np.zeros(0, dtype=np.int64), length, 0.0, key)
        text = (common.NEEDLE + common.QUESTION + common.ANSWER).format(key=key)
        assert ids == enc.encode_ordinary(text)
        assert enc.decode(ids[answer_start:]) == f" {key}"
        assert enc.decode([ids[p] for p in key_pos]) == f" {key}" * 2


@pytest.mark.parametrize("args, match", [
    (dict(length=20), "shorter than the needle"),
    (dict(depth=1.5), "depth must be in"),
    (dict(key=1234), "five digits"),
    (dict(filler=np.zeros(5, dtype=np.int64)), "filler tokens"),
], ids=["too-short", "depth", "key", "filler"])
def test_passkey_sample_errors(args, match):
    kwargs = dict(encode=WordCodec().encode, filler=np.zeros(200, dtype=np.int64), length=100,
                  depth=0.5, key=12345)
    with pytest.raises(ValueError, match=match):
        common.passkey_sample(**{**kwargs, **args})


def test_passkey_filler_replaces_document_boundaries():
    codec = WordCodec()
    data = np.array([5, 6, EOT, 7, EOT, 8], dtype=np.uint16)
    tokens = common.passkey_filler(data, 1, 5, codec.encode)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == [6, codec.encode("\n\n")[0], 7, codec.encode("\n\n")[0], 8]
    with pytest.raises(ValueError, match="outside"):
        common.passkey_filler(data, 3, 5, codec.encode)


# ----------------------------------------------------------------------------- the scorer
class StubModel(nn.Module):
    """The interface eval.py scores (config, transformer.ln_f, transformer.h, lm_head), with
    one-hot logits: `predict(seq, t)` is the token predicted after seq[:t + 1]."""

    def __init__(self, predict, block_size=1024):
        super().__init__()
        self.config = SimpleNamespace(attention="full", block_size=block_size, n_layer=0,
                                      n_head=1, n_kv_head=1)
        self.transformer = nn.ModuleDict(dict(ln_f=nn.Identity(), h=nn.ModuleList()))
        self.lm_head = nn.Identity()
        self.predict = predict

    def forward(self, idx):
        B, T = idx.shape
        x = torch.zeros(B, T, 4096)
        for b, seq in enumerate(idx.tolist()):
            for t in range(T):
                x[b, t, self.predict(seq, t) % 4096] = 1.0
        x = self.transformer.ln_f(x)
        return self.lm_head(x[:, [-1]]), None


def induction(seq, t, n=3):
    """The token that followed the latest earlier occurrence of seq[t-n+1 .. t] (what a model
    that has learned retrieval does), else 0."""
    if t < n - 1:
        return 0
    tail = seq[t - n + 1:t + 1]
    for s in range(t - 1, n - 2, -1):
        if seq[s - n + 1:s + 1] == tail:
            return seq[s + 1]
    return 0


def passkey_docs(codec, lengths=(64, 200), depths=(0, 50, 100), samples=3, seed=0):
    filler = corpus(seed=seed) % 900                      # no EOT; ids below the codec's
    return ev.make_passkey_docs(codec.encode, filler, list(lengths), list(depths), samples,
                                torch.Generator().manual_seed(seed))


def score(model, rows, batch_size, *keys):
    """score_passkey's values named by keys, on the CPU."""
    sc = ev.score_passkey(model, rows, batch_size, "cpu", nullcontext())
    return [sc[k] for k in keys]


def test_scorer_finds_the_key_a_copying_model_retrieves():
    codec = WordCodec()
    docs = passkey_docs(codec)
    is_token = codec.encode(" is")[0]

    def first_token_only(seq, t):  # right on the answer's first token, wrong after it
        return induction(seq, t) if seq[t] == is_token else 0

    for length, rows in docs.items():
        assert all(len(r[2]) == length for r in rows)
        correct, first = score(StubModel(induction), rows, 4, "correct", "first")
        assert correct.all() and len(correct) == len(rows)
        assert first.tolist() == [r[2][r[4]] for r in rows]
        correct, first = score(StubModel(first_token_only), rows, 5, "correct", "first")
        assert not correct.any()                          # two answer tokens: both must match
        assert first.tolist() == [r[2][r[4]] for r in rows]
        assert ev.first_token_right(first, rows).all()
        correct, first = score(StubModel(lambda seq, t: 0), rows, 2, "correct", "first")
        assert not correct.any() and not ev.first_token_right(first, rows).any()


def test_same_key_and_filler_across_depths():
    rows = passkey_docs(WordCodec(), lengths=(100,), depths=(0, 25, 100), samples=2)[100]
    for s in range(2):
        same = [r for r in rows if r[1] == s]
        assert len(same) == 3
        answers = {tuple(r[2][r[4]:]) for r in same}
        assert len(answers) == 1                          # one key per sample
        assert same[0][2][:20] != same[2][2][:20]        # depth 0 opens with the needle


@pytest.mark.parametrize("attention", ["full", "nsa"])
def test_exact_match_is_greedy_decoding(attention):
    """The one-pass score equals greedy decoding, token by token, on a real (random) model."""
    model = tiny_gpt(attention, seed=1)
    torch.manual_seed(2)
    prompts = torch.randint(0, 900, (3, 45))
    greedy = prompts
    for _ in range(3):
        logits, _ = model(greedy)
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    rows = [(0, b, greedy[b].tolist(), [], 45) for b in range(3)]
    correct, first = score(model, rows, 2, "correct", "first")
    assert correct.all() and first.tolist() == greedy[:, 45].tolist()
    wrong_last = greedy.clone()
    wrong_last[:, -1] = (wrong_last[:, -1] + 1) % 900
    rows = [(0, b, wrong_last[b].tolist(), [], 45) for b in range(3)]
    correct, = score(model, rows, 3, "correct")
    assert not correct.any()


# ----------------------------------------------------------------------------- NSA recall
@pytest.mark.parametrize("n_select, depth, expected", [
    (3, 0, 1.0),      # needle in block 0: always selected
    (3, 100, 1.0),    # needle right before the question: in the two local blocks
    (3, 50, 0.0),     # n = 3 leaves no free choice: a middle block is never selected
    (8, 50, 1.0),     # n = 8 selects all 8 blocks of 128 tokens
], ids=["block0", "local", "middle-n3", "middle-all"])
def test_selection_recall_forced(n_select, depth, expected):
    codec = WordCodec()
    model = tiny_gpt("nsa", n_select=n_select)
    rows = passkey_docs(codec, lengths=(128,), depths=(depth,), samples=2)[128]
    ls = TINY["select_block"]
    for r in rows:  # the layout the expectation assumes
        key_blocks = {p // ls for p in r[3]}
        t = r[4] - 1
        forced = {0, t // ls, t // ls - 1}
        if n_select == 3:
            assert (key_blocks <= forced) == (expected == 1.0)
            assert (not key_blocks & forced) == (expected == 0.0)
    hits, ranks = score(model, rows, 2, "hits", "ranks")
    assert hits.shape == ranks.shape == (2, TINY["n_layer"], TINY["n_kv_head"])
    assert hits.float().mean().item() == expected
    if depth in (0, 100):  # a forced block: among the first three of the selection's order
        assert (ranks <= 3).all()


@pytest.mark.parametrize("attention,kw", [("full", {}), ("nsa", {}),
                                          ("nsa", dict(own_window_kv=True))],
                         ids=["full", "nsa", "nsa-own-window-kv"])
def test_key_attention(attention, kw):
    """Attention on the key: a head's softmax share on the key's tokens. With every token counted
    as a key token it is the whole softmax (full: 1; NSA: (g_slc + g_win) / (g_cmp + g_slc +
    g_win), each branch's softmax summing to 1); NSA gives exactly 0 where the key lies outside
    the selected blocks and the window (n = 3 selects only forced blocks, the needle at 50% is
    60+ tokens back, w = 16)."""
    codec = WordCodec()
    model = tiny_gpt(attention, seed=5, **kw)
    rows = passkey_docs(codec, lengths=(128,), depths=(50,), samples=3, seed=6)[128]
    on_key, on_key_last, slc_on_key, slc_gate = score(model, rows, 2, "on_key", "on_key_last",
                                                      "slc_on_key", "slc_gate")
    assert on_key.shape == on_key_last.shape == (3, TINY["n_layer"], TINY["n_head"])
    idx = torch.tensor([r[2] for r in rows])
    question_end = torch.tensor([r[4] - 1 for r in rows])
    with ev.activations(model, True) as acts:
        model(idx)
    at = ev.question_attention(model, acts["attn"], rows, question_end)
    assert torch.equal(on_key, at["on_key"])
    # where the last answer token is predicted: the document's last position but one
    assert all(len(r[2]) == 128 for r in rows) and (question_end < 126).all()
    last = ev.question_attention(model, acts["attn"], rows, torch.full_like(question_end, 126))
    assert torch.equal(on_key_last, last["on_key"])
    everything = [(*r[:3], list(range(r[4])), r[4]) for r in rows]
    whole_at = ev.question_attention(model, acts["attn"], everything, question_end)
    whole = whole_at["on_key"]
    if attention == "full":
        assert torch.allclose(whole, torch.ones_like(whole), atol=1e-5)
        assert (on_key > 0).all() and (on_key < 1).all()
        assert slc_on_key is None and slc_gate is None and whole_at["slc_gate"] is None
        return
    assert torch.equal(slc_on_key, at["slc_on_key"]) and torch.equal(slc_gate, at["slc_gate"])
    # every token a key token: the selected branch's softmax sums to 1 over its blocks
    torch.testing.assert_close(whole_at["slc_on_key"], torch.ones_like(whole))
    torch.testing.assert_close(whole_at["slc_gate"], slc_gate)
    for layer in range(TINY["n_layer"]):
        x = acts["attn"][layer]
        for i, r in enumerate(rows):
            t = r[4] - 1
            *_, gates, _ = model.transformer.h[layer].attn.project(x[i:i + 1, :t + 1],
                                                                  torch.arange(t + 1))
            g_cmp, g_slc, g_win = (g[0, t].float() for g in gates)
            torch.testing.assert_close(whole[i, layer], (g_slc + g_win) / (g_cmp + g_slc + g_win))
            torch.testing.assert_close(slc_gate[i, layer], g_slc / (g_cmp + g_slc + g_win))
            # the layout the zero below assumes: key tokens before the window, not in block 0
            # or the two local blocks (the only ones n = 3 selects)
            assert max(r[3]) <= t - TINY["window"]
            ls = TINY["select_block"]
            assert not {p // ls for p in r[3]} & {0, t // ls, t // ls - 1}
    assert (on_key == 0).all() and (slc_on_key == 0).all()
    assert ((slc_gate > 0) & (slc_gate < 1)).all()


def test_selection_hits_read_the_key_block():
    """Against Attention.selection directly: a hit is the selection at the key's block, and the
    needle's rank is within n exactly when it is a hit (random scores: no ties)."""
    codec = WordCodec()
    model = tiny_gpt("nsa", n_select=5, seed=3)
    rows = passkey_docs(codec, lengths=(128,), depths=(30, 60), samples=2, seed=4)[128]
    hits, ranks = score(model, rows, 4, "hits", "ranks")
    assert torch.equal(hits, ranks <= 5)
    assert hits.any() and not hits.all()  # both cases occur
    idx = torch.tensor([r[2] for r in rows])
    with ev.activations(model, True) as acts:
        model(idx)
    for i, r in enumerate(rows):
        t = r[4] - 1
        blocks = sorted({p // TINY["select_block"] for p in r[3]})
        for layer in range(TINY["n_layer"]):
            sel, _ = model.transformer.h[layer].attn.selection(acts["attn"][layer][i:i + 1], t)
            assert hits[i, layer].tolist() == sel[0][:, blocks].any(-1).tolist()


# ----------------------------------------------------------------------------- loss by position
def test_context_buckets():
    for T in (1, 2, 7, 8, 100, 8192):
        buckets = ev.context_buckets(T)
        covered = [c for lo, hi in buckets for c in range(lo, hi + 1)]
        assert covered == list(range(1, T + 1))
        assert all(lo & (lo - 1) == 0 for lo, _ in buckets)                # powers of two
    assert ev.context_buckets(8) == [(1, 1), (2, 3), (4, 8)]


def test_draw_windows_inside_documents():
    data = corpus(n_docs=30, seed=1)
    T = 100
    starts, inside, n_docs = ev.draw_windows(data, T, 200, torch.Generator().manual_seed(0))
    ends = np.flatnonzero(data == EOT)
    long_docs = sum(1 for a, b in zip(np.r_[0, ends[:-1] + 1], ends) if b - a + 1 >= T + 1)
    assert inside and n_docs == long_docs > 0
    for s in starts:
        assert EOT not in data[s:s + T].tolist()                    # x holds no boundary
    assert len(set(starts)) > 150                                  # spread over many places
    short = corpus(n_docs=30, seed=1, lo=5, hi=50)
    starts, inside, n_docs = ev.draw_windows(short, T, 10, torch.Generator().manual_seed(0))
    assert not inside and n_docs == 0 and max(starts) <= len(short) - T - 1


@pytest.mark.parametrize("attention", ["full", "nsa"])
def test_loss_by_position_is_the_training_loss(attention):
    """The per-position losses average back to model(x, y)'s loss on the same windows,
    ignored (-1) targets included; the buckets split the positions."""
    model = tiny_gpt(attention)
    data = corpus(n_docs=20, seed=2)
    T = 64
    starts, _, _ = ev.draw_windows(data, T, 6, torch.Generator().manual_seed(1))
    loss, valid = ev.loss_by_position(model, data, starts, T, 4, "cpu", nullcontext())
    xy = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts]).astype(np.int64))
    x, y = xy[:, :-1], xy[:, 1:].clone()
    with torch.no_grad():
        _, expected = model(x, y)
    assert loss.shape == (6, T) and valid.all()
    assert abs(loss.mean().item() - expected.item()) < 1e-5 * expected.item()
    buckets = ev.context_buckets(T)
    means, se = ev.mean_and_se(ev.window_bucket_means(loss, valid, buckets))
    sizes = [hi - lo + 1 for lo, hi in buckets]
    assert abs(sum(m * n for m, n in zip(means, sizes)) / T - expected.item()) < 1e-5
    assert means[0] == loss[:, 0].mean().item() and len(se) == len(buckets)
    assert abs(se[0] - loss[:, 0].std().item() / 6 ** 0.5) < 1e-12
    y[0, :10] = -1                                                  # masked as training masks
    y[3, 30] = -1
    with torch.no_grad():
        _, expected = model(x, y)
    loss, valid = ev.position_loss(model, x, y, nullcontext())
    assert valid.sum().item() == 6 * T - 11 and (loss[~valid] == 0).all()
    assert abs(loss.sum().item() / valid.sum().item() - expected.item()) < 1e-5 * expected.item()


# ----------------------------------------------------------------------------- training mix
def mix(seed, fraction, B=64, T=160, **kwargs):
    codec = WordCodec()
    g = torch.Generator().manual_seed(seed)
    data = corpus(n_docs=10, seed=5, lo=200, hi=400)
    xy = torch.from_numpy(np.stack([data[i:i + T + 1] for i in range(0, B * 7, 7)])
                          .astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    mx, my = common.mix_passkey(x, y, fraction, g, data, codec.encode, **kwargs)
    return codec, x, y, mx, my, g


def test_mix_is_deterministic_under_a_seed():
    _, x, y, mx1, my1, g1 = mix(0, 0.5)
    _, _, _, mx2, my2, g2 = mix(0, 0.5)
    assert torch.equal(mx1, mx2) and torch.equal(my1, my2)
    assert torch.equal(g1.get_state(), g2.get_state())
    _, _, _, mx3, _, _ = mix(1, 0.5)
    assert not torch.equal(mx1, mx3)
    # resume: the saved generator state gives the same next batch
    codec = WordCodec()
    data = corpus(n_docs=10, seed=5, lo=200, hi=400)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    first = common.mix_passkey(x, y, 0.5, g, data, codec.encode)
    g.set_state(state)
    again = common.mix_passkey(x, y, 0.5, g, data, codec.encode)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def passkey_ends(seq, question):
    """Positions of the EOTs that end a passkey document (the question, a two-token answer,
    EOT); the row's own text may hold other EOTs."""
    return [i for i, t in enumerate(seq) if t == EOT and seq[i - 2 - len(question):i - 2]
            == question]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_mix_fraction_and_layout(fraction):
    codec, x, y, mx, my, _ = mix(3, fraction, B=200)
    assert torch.equal(mx[:, 1:], my[:, :-1])                      # still shifted by one
    replaced = (mx != x).any(1) | (my != y).any(1)
    n = replaced.sum().item()
    if fraction in (0.0, 1.0):
        assert n == fraction * 200
    else:  # binomial(200, 0.3): mean 60, sd 6.5
        assert 60 - 26 <= n <= 60 + 26
    question = codec.encode(common.QUESTION)
    for row in replaced.nonzero().flatten().tolist():
        seq = torch.cat([mx[row], my[row, -1:]]).tolist()
        # passkey documents packed from position 0, each ended by EOT, each ending with the
        # question and the answer; no EOT inside one (filler boundaries became blank lines)
        ends = passkey_ends(seq, question)
        assert ends and ends[0] >= 64 and ends[0] == seq.index(EOT)
        text = torch.cat([x[row], y[row, -1:]]).tolist()          # the row's own text after
        assert seq[ends[-1] + 1:] == text[:len(seq) - ends[-1] - 1]  # the last document
        doc = seq[:ends[0]]
        tail = doc[-len(question) - 2:-2]
        assert tail == question
        key = doc[-2:]
        needle_key = [i for i in range(len(doc) - 1) if doc[i:i + 2] == key]
        assert len(needle_key) == 3                                # two in the needle, the answer
        assert EOT not in doc


def test_mix_lengths_and_errors():
    codec, x, y, mx, my, _ = mix(4, 1.0, B=40, T=160, min_length=40, max_length=60)
    question = codec.encode(common.QUESTION)
    for row in range(40):
        seq = torch.cat([mx[row], my[row, -1:]]).tolist()
        ends = passkey_ends(seq, question)
        lengths = np.diff([-1] + ends) - 1
        assert len(ends) >= 2 and all(40 <= n <= 60 for n in lengths)
        assert 160 - (ends[-1] + 1) < 40                            # no room for another
    data = corpus()
    with pytest.raises(ValueError, match="fraction"):
        common.mix_passkey(x, y, 1.5, torch.Generator(), data, codec.encode)
    with pytest.raises(ValueError, match="min_length"):
        common.mix_passkey(x, y, 0.5, torch.Generator(), data, codec.encode, max_length=500)


# ----------------------------------------------------------------------------- the CLI
def run_eval(*args, cwd, ok=True):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "2")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert (p.returncode == 0) == ok, f"eval.py {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny checkpoints (NSA and full) and a dataset data/tiny of long documents."""
    w = tmp_path_factory.mktemp("eval")
    (w / "data" / "tiny").mkdir(parents=True)
    corpus(n_docs=8, seed=6, lo=400, hi=700).tofile(w / "data" / "tiny" / "val.bin")
    corpus(n_docs=8, seed=7, lo=400, hi=700).tofile(w / "data" / "tiny" / "train.bin")
    for attention in ("nsa", "full"):
        model = tiny_gpt(attention, block_size=96)
        (w / f"out-{attention}").mkdir()
        torch.save({"model": model.state_dict(), "model_args": asdict(model.config),
                    "iter_num": 0, "best_val_loss": 7.0,
                    "config": {"dataset": "tiny", "data_dir": "data"}},
                   w / f"out-{attention}" / "ckpt.pt")
    return w


def test_cli_loss(runs):
    p = run_eval("loss", "--out_dir=out-nsa,out-full", "--device=cpu", "--windows=3",
                 "--json=loss.json", cwd=runs)
    assert "each inside one document" in p.stdout
    assert "| context tokens | [1] nsa | [2] full | [2] - [1] |" in p.stdout
    with open(runs / "loss.json") as f:
        record = json.load(f)
    assert record["T"] == 96 and record["windows_inside_documents"]
    assert [r["attention"] for r in record["runs"]] == ["nsa", "full"]
    all_line = next(line for line in p.stdout.splitlines() if line.startswith("| all |"))
    for r in record["runs"]:
        assert len(r["loss_by_position"]) == 96 and 9 < r["loss"] < 12   # ~ln(50304) untrained
        assert len(r["loss_by_bucket"]) == len(r["loss_by_bucket_se"]) == 7   # 1 ... 64-96
        assert f"{r['loss']:.4f}" in all_line
        assert f"{r['loss_by_bucket'][0]:.4f} ± {r['loss_by_bucket_se'][0]:.4f}" in p.stdout


def test_cli_plot_or_clear_error(runs):
    # matplotlib installed but failing to import (e.g. without pillow) counts as missing
    has_mpl = subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"],
                             capture_output=True).returncode == 0
    p = run_eval("loss", "--out_dir=out-full", "--device=cpu", "--windows=2", "--T=40",
                 "--plot=loss.png", cwd=runs, ok=has_mpl)
    if has_mpl:
        assert (runs / "loss.png").stat().st_size > 0
    else:
        assert p.stderr.startswith("eval.py: error: --plot needs matplotlib")
        assert len(p.stderr.strip().splitlines()) == 1 and "loss by position" not in p.stdout


def test_cli_passkey(runs):
    p = run_eval("passkey", "--out_dir=out-nsa,out-full", "--device=cpu", "--samples=2",
                 "--lengths=64,96,192", "--depths=0,50,100", "--json=passkey.json", cwd=runs)
    assert "| depth \\ length | 64 | 96 | 192* |" in p.stdout
    assert "NSA selection recall" in p.stdout
    with open(runs / "passkey.json") as f:
        record = json.load(f)
    nsa, full = record["runs"]
    assert len(nsa["accuracy"]) == 3 and len(nsa["accuracy"][0]) == 3
    assert "first answer token right" in p.stdout
    for run in (nsa, full):    # exact match implies a right first token
        assert all(f >= a for fs, accs in zip(run["first_token"], run["accuracy"])
                   for f, a in zip(fs, accs))
    assert nsa["recall"][0][0] == 1.0                   # depth 0: block 0, always selected
    assert nsa["needle_rank"][0][0] == 1.0              # ... and first in the selection's order
    assert len(nsa["needle_rank_by_layer"][0]) == nsa["model_args"]["n_layer"]
    assert "NSA needle rank (median; selected iff <= n = " in p.stdout
    assert full["recall"] is None and full["needle_rank"] is None
    # exact matches split by whether the needle's block is selected: every sample counted once
    assert "exact match by whether the needle's block is selected" in p.stdout
    for cell, accs, recalls in zip(nsa["accuracy_by_selection"], nsa["accuracy"],
                                   nsa["recall"]):
        assert cell["selected"][1] + cell["not_selected"][1] == 2 * 3      # samples x depths
        assert cell["selected"][0] + cell["not_selected"][0] == round(2 * sum(accs))
        # a depth with recall 1 has both samples selected, one with recall 0 neither
        assert 2 * sum(r == 1 for r in recalls) <= cell["selected"][1] <= 2 * sum(r > 0
                                                                               for r in recalls)
    assert full["accuracy_by_selection"] is None


@pytest.mark.parametrize("args, message", [
    (["passkey", "--out_dir=out-full", "--depths=0,150"], "--depths must be percentages"),
    (["passkey", "--out_dir=out-full", "--lengths=1k,x"], "--lengths must be a comma list"),
    (["loss", "--out_dir=out-full", "--dataset=nope"], "data/nope/val.bin not found"),
    (["loss", "--out_dir=out-full", "--T=100000", "--device=cpu"], "fewer than T + 1"),
    (["loss", "--out_dir=out-full", "--device=tpu"], "device 'tpu' is not"),
], ids=["depths", "lengths", "dataset", "T", "device"])
def test_errors_name_the_problem(runs, monkeypatch, args, message):
    monkeypatch.chdir(runs)
    with pytest.raises(common.UserError, match=re.escape(message)):
        ev.main(args)


def test_cli_error_is_one_line(runs):
    p = run_eval("loss", "--out_dir=missing", "--device=cpu", cwd=runs, ok=False)
    assert p.returncode == 1
    assert p.stderr == "eval.py: error: no checkpoint at missing/ckpt.pt\n"
