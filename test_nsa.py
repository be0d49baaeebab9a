"""
Tests for nanoNSA. Run (CPU, Triton kernels under the interpreter):

    TRITON_INTERPRET=1 python -m pytest -q test_nsa.py

Random inputs come from fixed seeds. The kernel tests seed with NSA_TEST_SEED (default 0,
named in their failure messages): `NSA_TEST_SEED=7 TRITON_INTERPRET=1 python -m pytest -q
test_nsa.py -k kernels` runs them on other inputs.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import nsa_kernels as nk
from model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------
# Reference semantics and model (foundation)

PAPER = nk.PAPER_HP
SMALL = dict(block_len=16, block_stride=8, select_block=32, n_select=4, window=64)


def random_inputs(B, T, HQ, H, D, cfg, dtype=torch.float64, device="cpu", requires_grad=False):
    """Fresh random NSA inputs: q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win."""
    Tc = nk.num_compressed_blocks(T, cfg["block_len"], cfg["block_stride"])
    shapes = [(B, T, HQ, D), (B, T, H, D), (B, T, H, D), (B, Tc, H, D), (B, Tc, H, D),
              (B, T, HQ), (B, T, HQ), (B, T, HQ)]
    xs = [torch.randn(s, dtype=dtype, device=device) for s in shapes[:5]]
    xs += [torch.rand(s, dtype=dtype, device=device) for s in shapes[5:]]
    return [x.requires_grad_(requires_grad) for x in xs]


def naive_nsa(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len, block_stride,
              select_block, n_select, window):
    """NSA written again as a per-query loop, straight from the pinned semantics."""
    B, T, HQ, D = q.shape
    H, Tc = k.shape[2], k_cmp.shape[1]
    G, l, d, ls = HQ // H, block_len, block_stride, select_block
    scale = D ** -0.5
    n_blocks = -(-T // ls)
    out = torch.zeros_like(q)

    def attend(qh, keys, values):
        return torch.softmax(keys @ qh * scale, dim=0) @ values

    for b in range(B):
        for h in range(H):
            heads = range(h * G, (h + 1) * G)
            for t in range(T):
                visible = [i for i in range(Tc) if i * d + l <= t + 1]
                score = [0.0] * n_blocks
                o_cmp = {}
                for hq in heads:
                    if not visible:
                        o_cmp[hq] = torch.zeros(D, dtype=q.dtype)
                        continue
                    p = torch.softmax(k_cmp[b, visible, h] @ q[b, t, hq] * scale, dim=0)
                    o_cmp[hq] = p @ v_cmp[b, visible, h]
                    for pi, i in zip(p.tolist(), visible):
                        for j in range(n_blocks):
                            overlap = min(i * d + l, (j + 1) * ls) - max(i * d, j * ls)
                            score[j] += pi * max(overlap, 0) / d
                eligible = [j for j in range(n_blocks) if j * ls <= t]
                forced = [j for j in eligible if j in (0, t // ls, t // ls - 1)]
                others = sorted((j for j in eligible if j not in forced), key=lambda j: -score[j])
                chosen = forced + others[:max(n_select - len(forced), 0)]
                slc = [s for j in chosen for s in range(j * ls, min((j + 1) * ls, t + 1))]
                win = list(range(max(0, t - window + 1), t + 1))
                for hq in heads:
                    o_slc = attend(q[b, t, hq], k[b, slc, h], v[b, slc, h])
                    o_win = attend(q[b, t, hq], k[b, win, h], v[b, win, h])
                    out[b, t, hq] = (g_cmp[b, t, hq] * o_cmp[hq] + g_slc[b, t, hq] * o_slc
                                     + g_win[b, t, hq] * o_win)
    return out


def causal_gqa(q, k, v):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


REF_CASES = [  # (T, HQ, H, D, cfg)
    (1, 2, 1, 8, SMALL), (15, 4, 2, 8, SMALL), (16, 2, 2, 8, SMALL), (97, 4, 1, 16, SMALL),
    (131, 6, 3, 8, SMALL), (31, 2, 1, 8, PAPER), (293, 4, 2, 8, PAPER),
    (101, 2, 1, 8, dict(block_len=8, block_stride=4, select_block=8, n_select=3, window=5)),
    (89, 3, 3, 8, dict(block_len=32, block_stride=8, select_block=16, n_select=5, window=7)),
]


@pytest.mark.parametrize("T,HQ,H,D,cfg", REF_CASES,
                         ids=[f"T{c[0]}-HQ{c[1]}-H{c[2]}-D{c[3]}-l{c[4]['block_len']}"
                              f"d{c[4]['block_stride']}s{c[4]['select_block']}"
                              f"n{c[4]['n_select']}w{c[4]['window']}" for c in REF_CASES])
def test_reference_matches_naive_loop(T, HQ, H, D, cfg):
    torch.manual_seed(1000 + T)
    xs = random_inputs(2, T, HQ, H, D, cfg)
    expected = naive_nsa(*xs, **cfg)
    got = nk.nsa_attention_ref(*xs, **cfg)
    err = (got - expected).abs().max().item()
    assert err < 1e-10, f"max abs error {err:.3e}"


def test_overlap_weights_match_paper_example():
    w = nk.overlap_weights(Tc=12, n_blocks=3, block_len=32, block_stride=16, select_block=64)
    # selection block 1 = tokens [64, 128): compressed blocks 3..7 with weights 1, 2, 2, 2, 1
    assert w[:, 1].tolist() == [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0, 0]
    assert torch.equal(w.sum(dim=1)[:-1], torch.full((11,), 2.0))  # each block weighs l / d


@pytest.mark.parametrize("branch", ["selected", "window"])
def test_single_branch_limit_is_full_attention(branch):
    torch.manual_seed(7)
    T, HQ, H, D = 150, 4, 2, 16
    cfg = dict(SMALL, n_select=8, window=T) if branch == "selected" else dict(SMALL, window=T)
    q, k, v, kc, vc, _, _, _ = random_inputs(1, T, HQ, H, D, cfg)
    one, zero = torch.ones(1, T, HQ, dtype=q.dtype), torch.zeros(1, T, HQ, dtype=q.dtype)
    gates = (zero, one, zero) if branch == "selected" else (zero, zero, one)
    got = nk.nsa_attention_ref(q, k, v, kc, vc, *gates, **cfg)
    err = (got - causal_gqa(q, k, v)).abs().max().item()
    assert err < 1e-12, f"max abs error {err:.3e}"


def test_selection_discards_blocks_and_shares_across_group():
    torch.manual_seed(3)
    T, HQ, H, D = 300, 4, 2, 8
    q, k, v, kc, vc, *_ = random_inputs(1, T, HQ, H, D, SMALL)
    p = nk.compressed_probs_ref(q, kc, SMALL["block_len"], SMALL["block_stride"], D ** -0.5)
    selected, score = nk.select_blocks_ref(p.view(1, H, HQ // H, T, -1), T, SMALL["block_len"],
                                           SMALL["block_stride"], SMALL["select_block"],
                                           SMALL["n_select"])
    n_eligible = torch.arange(T) // SMALL["select_block"] + 1
    assert torch.equal(selected.sum(-1)[0, 0], n_eligible.clamp(max=SMALL["n_select"]))
    t = torch.arange(T)
    for j in (t * 0, t // 32, (t // 32 - 1).clamp(min=0)):  # forced blocks always chosen
        assert selected[0, :, t, j].all()


def test_reference_rejects_bad_inputs():
    q, k, v, kc, vc, gc, gs, gw = random_inputs(1, 40, 4, 2, 8, SMALL)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        nk.nsa_attention_ref(q, k[:, :, :1].expand(1, 40, 3, 8), v[:, :, :1].expand(1, 40, 3, 8),
                             kc, vc, gc, gs, gw, **SMALL)
    with pytest.raises(ValueError, match="k_cmp has"):
        nk.nsa_attention_ref(q, k, v, kc[:, 1:], vc[:, 1:], gc, gs, gw, **SMALL)
    with pytest.raises(ValueError, match="g_slc"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs[:, 1:], gw, **SMALL)
    with pytest.raises(ValueError, match="block_stride .* must divide block_len"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs, gw, **dict(SMALL, block_stride=5))
    with pytest.raises(ValueError, match="n_select must be >= 3"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs, gw, **dict(SMALL, n_select=2))


def test_nsa_attention_runs_the_reference_for_decoding():
    """Queries shorter than keys (a KV-cache step) go to the reference, on every device."""
    torch.manual_seed(5)
    q, k, v, kc, vc, *g = random_inputs(1, 70, 4, 2, 16, SMALL, dtype=torch.float32)
    last = [x[:, -3:] for x in [q, *g]]
    got = nk.nsa_attention(last[0], k, v, kc, vc, *last[1:], **SMALL)
    assert torch.equal(got, nk.nsa_attention_ref(last[0], k, v, kc, vc, *last[1:], **SMALL))


# --- model

def tiny_config(attention="nsa", **kw):
    cfg = dict(block_size=160, vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
               attention=attention, block_len=16, block_stride=8, select_block=16, n_select=3,
               window=24)
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("attention,kw", [("nsa", {}), ("full", {}),
                                          ("nsa", dict(own_window_kv=True))],
                         ids=["nsa", "full", "nsa-own-window-kv"])
def test_model_is_causal(attention, kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(attention, **kw)).eval()
    idx = torch.randint(0, 67, (1, 120))
    logits, _ = model(idx, idx)
    t = 70
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 67, (1, 120 - t - 1))
    logits2, _ = model(changed, changed)
    assert torch.equal(logits[:, :t + 1], logits2[:, :t + 1])
    assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:])


@pytest.fixture
def reference_attention(monkeypatch):
    """For model tests that are not about the kernels: NSA runs its PyTorch reference even
    under TRITON_INTERPRET=1 (the kernels equal it: the test_kernels_* tests; the cached
    decoding tests run them inside the model), ~20x faster on a CPU."""
    monkeypatch.setattr(nk, "_INTERPRET", False)


def test_generate_runs_past_the_context(reference_attention):
    torch.manual_seed(2)
    model = GPT(tiny_config(block_size=40)).eval()
    out = model.generate(torch.randint(0, 67, (2, 5)), max_new_tokens=60, top_k=10)
    assert out.shape == (2, 65) and int(out.max()) < 67


@pytest.mark.parametrize("own_window_kv", [False, True], ids=["shared-kv", "own-window-kv"])
def test_gradients_reach_every_parameter(own_window_kv):
    torch.manual_seed(3)
    model = GPT(tiny_config(own_window_kv=own_window_kv))
    idx = torch.randint(0, 67, (2, 80))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    names = {n for n, _ in model.named_parameters()}
    assert any("phi_k" in n for n in names) and any("c_gate" in n for n in names)
    assert any("c_kv_win" in n for n in names) == own_window_kv


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_tiny_model_trains(attention, reference_attention):
    torch.manual_seed(4)
    model = GPT(tiny_config(attention))
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 67, (2, 64))
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("kw,message", [
    (dict(block_stride=5), r"block_stride \(5\) must divide block_len"),
    (dict(block_len=16, block_stride=8, select_block=20), r"must divide select_block"),
    (dict(n_select=2), r"n_select must be >= 3"),
    (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be a multiple of n_kv_head"),
    (dict(n_embd=36, n_head=4), r"head_dim .* must be even for RoPE"),
    (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be a multiple of n_head"),
    (dict(attention="sparse"), r"attention must be 'nsa' or 'full'"),
    (dict(window=0), r"window must be a positive integer"),
], ids=["stride-vs-l", "stride-vs-select", "n-select", "gqa", "rope-odd", "embd-heads",
        "attention", "window"])
def test_bad_config_raises(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kw)


def test_flops_count_nsa_sparsity():
    nsa, full = GPT(tiny_config(block_size=4096)), GPT(tiny_config("full", block_size=4096))
    # at 4096 tokens NSA attends to ~256 compressed*1.5 + 48 selected + 24 window keys per query
    assert nsa.attention_keys_per_token(4096) < full.attention_keys_per_token(4096) / 3
    assert math.isclose(full.attention_keys_per_token(4096), 4097 / 2)

# ---------------------------------------------------------------------------------------------
# Triton kernels
# Kernel tests: every branch's Triton forward and every gradient against the plain-PyTorch
# reference. On CPU (TRITON_INTERPRET=1, set before nsa_kernels is imported) they run the
# kernels under Triton's interpreter in fp32 with a tight tolerance; on CUDA without the
# interpreter in bf16 against the fp32 reference. Inputs come from the seed NSA_TEST_SEED
# (default 0; it is in every failure message); outputs are NaN-poisoned before the kernels
# write.

KERNEL_SEED = int(os.environ.get("NSA_TEST_SEED", "0"))
KERNEL_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DEVICE = "cpu" if KERNEL_INTERPRET else ("cuda" if torch.cuda.is_available() else None)
KERNEL_DTYPE = torch.float32 if KERNEL_INTERPRET else torch.bfloat16
# relative-norm tolerance: fp32 in the interpreter is exact up to summation order; bf16
# operands (8-bit mantissa) with fp32 accumulation land between 1e-3 and 1e-2
KERNEL_RTOL = 1e-5 if KERNEL_INTERPRET else 2e-2
# absolute floor for references that are exactly zero by cancellation (e.g. dq of a query that
# sees a single key): the error is then relative to the O(1) terms that cancel
KERNEL_ATOL = 1e-4 if KERNEL_INTERPRET else 2e-2
needs_kernels = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before importing nsa_kernels")


@pytest.fixture
def kernel_seed(monkeypatch):
    monkeypatch.setattr(nk, "POISON_OUTPUTS", True)
    torch.manual_seed(KERNEL_SEED)
    return f"NSA_TEST_SEED={KERNEL_SEED}"


def kernel_inputs(B, T, HQ, H, D, cfg):
    """q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win on the kernel device, requiring grad. The
    gates of the last position's first head are exactly 0, 1 and 0 (the backward folds
    log2(g) into each branch's lse)."""
    xs = random_inputs(B, T, HQ, H, D, cfg, dtype=KERNEL_DTYPE, device=KERNEL_DEVICE)
    for g, value in zip(xs[5:], (0.0, 1.0, 0.0)):
        g[:, -1, 0] = value
    return [x.requires_grad_() for x in xs]


def assert_close(name, got, want, seed, rtol=None):
    """Relative-norm check (plus an absolute floor for zero references); reports both."""
    rtol = KERNEL_RTOL if rtol is None else rtol
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not torch.isnan(got).any(), f"{name}: NaN (seed {seed})"
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    rel = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert rel <= rtol or err <= KERNEL_ATOL, \
        f"{name}: max abs err {err:.3e}, rel norm err {rel:.3e} > {rtol} (seed {seed})"


FULL_CASES = [  # B, T, HQ, H, D, cfg
    pytest.param(1, 1, 1, 1, 32, SMALL, id="T1-G1-D32-small"),
    pytest.param(2, 17, 4, 2, 64, PAPER, id="T17-G2-D64-paper-B2-no-cmp-block"),
    pytest.param(1, 100, 16, 1, 32, SMALL, id="T100-G16-D32-small"),
    pytest.param(1, 100, 6, 2, 32, SMALL, id="T100-G3-D32-small"),
    pytest.param(1, 333, 2, 1, 64, SMALL, id="T333-G2-D64-small"),
    pytest.param(1, 333, 16, 1, 32, PAPER, id="T333-G16-D32-paper"),
    pytest.param(1, 1100, 1, 1, 32, SMALL, id="T1100-G1-D32-small"),
]
GRAD_NAMES = ["q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win", "k_win", "v_win"]


def check_against_reference(xs, cfg, seed, win=()):
    """nsa_attention against nsa_attention_ref (fp32) on the inputs xs (and the window's own
    keys and values win, if given), with one shared upstream gradient: the output and the
    gradient of every input. Returns the kernels' output."""
    B, T, HQ, D = xs[0].shape
    win = list(win)
    do = torch.randn(B, T, HQ, D, device=KERNEL_DEVICE).to(KERNEL_DTYPE)
    got = nk.nsa_attention(*xs, **cfg, **dict(zip(("k_win", "v_win"), win)))
    got_grads = torch.autograd.grad(got, xs + win, do)
    ref_xs = [x.detach().float().requires_grad_() for x in xs + win]
    want = nk.nsa_attention_ref(*ref_xs[:8], **cfg, **dict(zip(("k_win", "v_win"), ref_xs[8:])))
    want_grads = torch.autograd.grad(want, ref_xs, do.float())
    assert_close("o", got, want, seed)
    for name, g, w in zip(GRAD_NAMES, got_grads, want_grads):
        assert_close(f"d{name}", g, w, seed)
    return got


@needs_kernels
@pytest.mark.parametrize("B,T,HQ,H,D,cfg", FULL_CASES)
def test_kernels_nsa_matches_reference(B, T, HQ, H, D, cfg, kernel_seed):
    got = check_against_reference(kernel_inputs(B, T, HQ, H, D, cfg), cfg, kernel_seed)
    assert got.dtype == KERNEL_DTYPE


@needs_kernels
@pytest.mark.parametrize("B,T,HQ,H,D,cfg", [
    pytest.param(1, 100, 6, 2, 32, SMALL, id="T100-G3-D32-small"),
    pytest.param(1, 333, 16, 1, 32, PAPER, id="T333-G16-D32-paper"),
])
def test_kernels_own_window_kv(B, T, HQ, H, D, cfg, kernel_seed):
    """The window branch with its own keys and values (k_win, v_win): output and all ten
    gradients against the reference; k and v then get only the selected branch's gradient."""
    xs = kernel_inputs(B, T, HQ, H, D, cfg)
    win = [torch.randn_like(xs[1]).requires_grad_() for _ in range(2)]
    check_against_reference(xs, cfg, kernel_seed, win)


def test_reference_own_window_kv():
    """k_win, v_win = k, v is the shared default exactly; other window keys change only what the
    window sees (with w = 1 and g_win = 1 the output is the window's value row)."""
    xs = random_inputs(1, 40, 4, 2, 16, SMALL)
    shared = nk.nsa_attention_ref(*xs, **SMALL)
    assert torch.equal(nk.nsa_attention_ref(*xs, **SMALL, k_win=xs[1], v_win=xs[2]), shared)
    k_win, v_win = torch.randn_like(xs[1]), torch.randn_like(xs[2])
    ones, zeros = torch.ones_like(xs[5]), torch.zeros_like(xs[5])
    only_window = nk.nsa_attention_ref(*xs[:5], zeros, zeros, ones, **{**SMALL, "window": 1},
                                       k_win=k_win, v_win=v_win)
    torch.testing.assert_close(only_window, v_win.repeat_interleave(2, dim=2))
    with pytest.raises(ValueError, match="k_win and v_win go together"):
        nk.nsa_attention_ref(*xs, **SMALL, k_win=k_win)
    with pytest.raises(ValueError, match="k_win must have"):
        nk.nsa_attention_ref(*xs, **SMALL, k_win=k_win[:, :-1], v_win=v_win[:, :-1])


@needs_kernels
def test_kernels_recompute_gives_the_same_gradients(kernel_seed, monkeypatch):
    """nk.RECOMPUTE (branch outputs recomputed in the backward instead of held) changes memory,
    not results: the gradients equal those of the default setting bit for bit (at G = 16, where
    no gradient is summed by atomic adds in a run-dependent order)."""
    xs = kernel_inputs(1, 150, 16, 1, 32, SMALL)
    do = torch.randn_like(xs[0])
    want = torch.autograd.grad(nk.nsa_attention(*xs, **SMALL), xs, do)
    for recompute in [(), ("compressed", "selected", "window")]:
        monkeypatch.setattr(nk, "RECOMPUTE", recompute)
        got = torch.autograd.grad(nk.nsa_attention(*xs, **SMALL), xs, do)
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert torch.equal(g, w), (recompute, name)
    # below G = 16 the selected branch is recomputed in key-block order, reusing the forward's
    # inverted selection (its dk/dv meet by atomic adds: close, not bit for bit, on a GPU)
    xs = kernel_inputs(1, 200, 4, 2, 32, SMALL)
    do = torch.randn_like(xs[0])
    monkeypatch.setattr(nk, "RECOMPUTE", ())
    want = torch.autograd.grad(nk.nsa_attention(*xs, **SMALL), xs, do)
    monkeypatch.setattr(nk, "RECOMPUTE", ("compressed", "selected", "window"))
    got = torch.autograd.grad(nk.nsa_attention(*xs, **SMALL), xs, do)
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert_close(f"d{name}", g, w, kernel_seed)


def reference_scores(q, k_cmp, cfg):
    """Reference block scores [B, H, T, NB] with forced blocks at +inf, ineligible at -inf."""
    B, T, HQ, D = q.shape
    H = k_cmp.shape[2]
    p = nk.compressed_probs_ref(q.float(), k_cmp.float(), cfg["block_len"], cfg["block_stride"],
                                D ** -0.5)
    _, score = nk.select_blocks_ref(p.view(B, H, HQ // H, T, -1), T, cfg["block_len"],
                                    cfg["block_stride"], cfg["select_block"], cfg["n_select"])
    t = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(score.shape[-1], device=q.device)[None, :]
    cur = t // cfg["select_block"]
    score = score.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))
    return score.masked_fill(j * cfg["select_block"] > t, float("-inf"))


@needs_kernels
@pytest.mark.parametrize("B,T,HQ,H,D,cfg", [
    pytest.param(1, 1, 1, 1, 16, PAPER, id="T1-G1-paper"),
    pytest.param(1, 20, 16, 1, 32, PAPER, id="T20-G16-paper-no-cmp-block"),
    pytest.param(1, 333, 16, 1, 32, SMALL, id="T333-G16-small"),
    pytest.param(1, 333, 6, 2, 32, SMALL, id="T333-G3-small"),
    pytest.param(2, 1100, 2, 2, 32, SMALL, id="T1100-G1-small-B2"),
    pytest.param(1, 1100, 4, 2, 64, PAPER, id="T1100-G2-paper"),
    pytest.param(1, 1100, 16, 1, 32, SMALL, id="T1100-G16-small"),
    pytest.param(1, 1100, 16, 1, 32, PAPER, id="T1100-G16-paper"),
    pytest.param(1, 700, 32, 1, 32, SMALL, id="T700-G32-small"),
])
def test_kernels_selection_matches_reference_scores(B, T, HQ, H, D, cfg, kernel_seed):
    """nsa_select against the reference scores, for G = 1 to 32 (so tiles of many to few
    positions); the small T=1100 cases reach unmasked chunks (a whole tile sees)."""
    q, _, _, k_cmp = kernel_inputs(B, T, HQ, H, D, cfg)[:4]
    with torch.no_grad():
        _, lse = nk.compressed_attention(q, k_cmp, k_cmp, block_len=cfg["block_len"],
                                         block_stride=cfg["block_stride"])
    sel_cfg = {key: cfg[key] for key in ("block_len", "block_stride", "select_block", "n_select")}
    idx = nk.nsa_select(q, k_cmp, lse, **sel_cfg)
    n, ls = cfg["n_select"], cfg["select_block"]
    assert idx.shape == (B, T, H, n) and idx.dtype == torch.int32
    t = torch.arange(T, device=q.device)[None, :, None, None]
    n_eligible = torch.clamp(t // ls + 1, max=n)                              # [1, T, 1, 1]
    slot = torch.arange(n, device=q.device)
    assert torch.where(slot < n_eligible, idx >= 0, idx == -1).all(), \
        f"wrong count of chosen blocks, or padding other than -1 (seed {kernel_seed})"
    assert (idx * ls <= t).all(), "an ineligible block was chosen"
    chosen = idx.long().clamp(min=0)
    nb = (T + ls - 1) // ls
    counts = torch.zeros(B, T, H, nb + 1, device=q.device).scatter_add_(
        -1, torch.where(idx >= 0, idx.long(), nb), torch.ones(idx.shape, device=q.device))
    assert counts[..., :nb].max() <= 1, "a block was chosen twice"
    # compare by scores: the sorted scores of the chosen blocks equal the reference's top-n
    score = reference_scores(q.detach(), k_cmp.detach(), cfg).permute(0, 2, 1, 3)  # [B, T, H, NB]
    got = torch.where(idx >= 0, score.gather(-1, chosen), float("-inf"))     # in slot order
    want = score.topk(min(n, score.shape[-1]), dim=-1).values
    if want.shape[-1] < n:
        pad = torch.full((*want.shape[:-1], n - want.shape[-1]), float("-inf"), device=q.device)
        want = torch.cat([want, pad], -1)
    finite = torch.isfinite(want)
    got_sorted = got.sort(-1, True).values
    assert (torch.isfinite(got_sorted) == finite).all(), \
        f"forced/eligible blocks differ (seed {kernel_seed})"
    scale = torch.where(finite, want, 0.).abs().max().item()
    tol = (1e-5 if KERNEL_INTERPRET else 1e-2) * max(scale, 1.0)
    err = torch.where(finite, got_sorted - want, 0.).abs().max().item()
    assert err <= tol, f"k-th chosen score differs by {err:.3e} (seed {kernel_seed})"
    # forced blocks (+inf) first, then by score: the kernel's fp32 order swaps near-ties only
    rise = torch.nan_to_num(got[..., 1:] - got[..., :-1], nan=0., neginf=0.)
    assert rise.max().item() <= tol, \
        f"not ordered by score: a later slot is {rise.max().item():.3e} higher (seed {kernel_seed})"


def masked_attention_ref(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over mask [B, H or 1, T, Tk]; rows with no key give 0."""
    G = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).float()
    kh, vh = (x.transpose(1, 2).float().repeat_interleave(G, 1) for x in (k, v))
    mask = mask.repeat_interleave(G, 1) if mask.shape[1] > 1 else mask
    s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1)).matmul(vh).transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("branch, T, HQ, H, window", [
    ("compressed", 150, 4, 2, 64), ("selected", 150, 4, 2, 64), ("window", 150, 4, 2, 64),
    # bands longer than the tiles (16 positions at G = 16 under the interpreter, 64 keys): tiles
    # that every row sees whole, between the band's edges on both sides of the window
    ("compressed", 1100, 16, 1, 64), ("window", 700, 16, 1, 300),
], ids=["compressed", "selected", "window", "compressed-T1100-G16", "window-w300-G16"])
def test_kernels_branch_functions(branch, T, HQ, H, window, kernel_seed):
    B, D, cfg = 2, 32, dict(SMALL, window=window)
    q, k, v, kc, vc = kernel_inputs(B, T, HQ, H, D, cfg)[:5]
    l, d, ls = cfg["block_len"], cfg["block_stride"], cfg["select_block"]
    t = torch.arange(T, device=q.device)[:, None]
    if branch == "compressed":
        got, lse = nk.compressed_attention(q, kc, vc, block_len=l, block_stride=d)
        keys, vals = kc, vc
        mask = (torch.arange(kc.shape[1], device=q.device)[None, :] * d + l <= t + 1)[None, None]
        logits = (q.transpose(1, 2).float() @ kc.transpose(1, 2).float().repeat_interleave(
            HQ // H, 1).transpose(-1, -2)) * D ** -0.5
        want_lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), -1) / math.log(2)
        want_lse = want_lse.masked_fill(~mask.any(-1), float("inf")).transpose(1, 2)
        assert_close("lse", torch.where(torch.isinf(lse), 0, lse),
                     torch.where(torch.isinf(want_lse), 0, want_lse), kernel_seed)
        assert (torch.isinf(lse) == torch.isinf(want_lse)).all()
    elif branch == "selected":
        with torch.no_grad():
            _, lse = nk.compressed_attention(q, kc, vc, block_len=l, block_stride=d)
        idx = nk.nsa_select(q, kc, lse, block_len=l, block_stride=d, select_block=ls,
                            n_select=cfg["n_select"])
        got = nk.selected_attention(q, k, v, idx, select_block=ls)
        keys, vals = k, v
        nb = (T + ls - 1) // ls
        sel = torch.zeros(B, T, H, nb + 1, dtype=torch.bool, device=q.device)
        sel.scatter_(-1, torch.where(idx >= 0, idx.long(), nb), True)
        tok = sel[..., :nb].repeat_interleave(ls, -1)[..., :T].permute(0, 2, 1, 3)
        mask = tok & (torch.arange(T, device=q.device)[None, :] <= t)
    else:
        got = nk.window_attention(q, k, v, window=cfg["window"])
        keys, vals = k, v
        s = torch.arange(T, device=q.device)[None, :]
        mask = ((s <= t) & (s > t - cfg["window"]))[None, None]
    want = masked_attention_ref(q, keys, vals, mask, D ** -0.5)
    assert_close("o", got, want, kernel_seed)
    do = torch.randn_like(q)
    for name, g, w in zip(["q", "k", "v"], torch.autograd.grad(got, (q, keys, vals), do),
                          torch.autograd.grad(want, (q, keys, vals), do.float())):
        assert_close(f"d{name}", g, w, kernel_seed)


@needs_kernels
def test_kernels_bad_inputs_raise():
    q, k, v, kc, vc, *g = kernel_inputs(1, 40, 2, 1, 32, SMALL)
    with pytest.raises(ValueError, match="head dim"):
        nk.window_attention(q[..., :24], k[..., :24], v[..., :24], window=8)
    with pytest.raises(ValueError, match="same length"):
        nk.window_attention(q[:, :20], k, v, window=8)
    with pytest.raises(ValueError, match="int32"):
        nk.selected_attention(q, k, v, torch.zeros(1, 40, 1, 4, dtype=torch.int64,
                                                   device=q.device), select_block=32)
    with pytest.raises(ValueError, match="k_cmp has"):
        nk.compressed_attention(q, kc[:, 1:], vc[:, 1:], block_len=16, block_stride=8)
    with pytest.raises(ValueError, match="lse must be fp32"):
        nk.nsa_select(q, kc, torch.zeros(1, 40, 2, device=q.device, dtype=torch.float64),
                      block_len=16, block_stride=8, select_block=32, n_select=4)
    with pytest.raises(ValueError, match="lse is on meta"):
        nk.nsa_select(q, kc, torch.zeros(1, 40, 2, device="meta"), block_len=16, block_stride=8,
                      select_block=32, n_select=4)
    with pytest.raises(ValueError, match="block_stride"):
        nk.nsa_attention(q, k, v, kc, vc, *g, **dict(SMALL, block_stride=5))


def test_tile_tables_resolve_at_every_group_size():
    """DENSE_TILES / SLC_TILES entries keyed by group size give the setting of the largest key
    <= G, and every entry resolves for every G (a table without key 1 would fail at G = 1)."""
    entry = {1: "a", 4: "b", 16: "c"}
    assert [nk._for_group(entry, G) for G in (1, 3, 4, 15, 16, 64)] == list("aabbcc")
    assert nk._for_group((64, 4, 2), 7) == (64, 4, 2)
    for G in range(1, 65):
        for branch in nk.DENSE_TILES.values():
            for setting in branch.values():
                assert len(nk._for_group(setting, G)) == 4
        for name, setting in nk.SLC_TILES.items():
            assert len(nk._for_group(setting, G)) == (2 if name in ("fwd", "dq") else 3)
