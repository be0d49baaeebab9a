"""
Tests for nanoNSA. Run (CPU, Triton kernels under the interpreter):

    TRITON_INTERPRET=1 python -m pytest -q test_nsa.py
"""
import os

import pytest
import torch

import nsa_kernels as nk

# ---------------------------------------------------------------------------------------------
# Reference semantics and model (foundation)

import math

import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache

PAPER = dict(block_len=32, block_stride=16, select_block=64, n_select=16, window=512)
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
    with pytest.raises(ValueError, match="k_cmp and v_cmp"):
        nk.nsa_attention_ref(q, k, v, kc[:, 1:], vc[:, 1:], gc, gs, gw, **SMALL)
    with pytest.raises(ValueError, match="g_slc"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs[:, 1:], gw, **SMALL)
    with pytest.raises(ValueError, match="block_stride .* must divide block_len"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs, gw, **dict(SMALL, block_stride=5))
    with pytest.raises(ValueError, match="n_select must be >= 3"):
        nk.nsa_attention_ref(q, k, v, kc, vc, gc, gs, gw, **dict(SMALL, n_select=2))


# --- model

def tiny_config(attention="nsa", **kw):
    cfg = dict(block_size=160, vocab_size=67, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
               attention=attention, block_len=16, block_stride=8, select_block=16, n_select=3,
               window=24)
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_model_is_causal(attention):
    torch.manual_seed(0)
    model = GPT(tiny_config(attention)).eval()
    idx = torch.randint(0, 67, (1, 120))
    logits, _ = model(idx, idx)
    t = 70
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 67, (1, 120 - t - 1))
    logits2, _ = model(changed, changed)
    assert torch.equal(logits[:, :t + 1], logits2[:, :t + 1])
    assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:])


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_kv_cache_decoding_matches_full_forward(attention):
    torch.manual_seed(1)
    model = GPT(tiny_config(attention)).eval()
    idx = torch.randint(0, 67, (2, 150))  # crosses compression, selection and window boundaries
    logits, _ = model(idx, idx)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    steps = [model(idx[:, :21], cache=cache)[0]]
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(21, 150)]
    decoded = torch.cat(steps, dim=1)
    err = (decoded - logits[:, 20:]).abs().max().item()
    assert err < 1e-4, f"max abs error {err:.3e}"


def test_generate_runs_past_the_context():
    torch.manual_seed(2)
    model = GPT(tiny_config(block_size=40)).eval()
    out = model.generate(torch.randint(0, 67, (2, 5)), max_new_tokens=60, top_k=10)
    assert out.shape == (2, 65) and int(out.max()) < 67


def test_gradients_reach_every_parameter():
    torch.manual_seed(3)
    model = GPT(tiny_config())
    idx = torch.randint(0, 67, (2, 80))
    _, loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    names = {n for n, _ in model.named_parameters()}
    assert any("phi_k" in n for n in names) and any("c_gate" in n for n in names)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_tiny_model_trains(attention):
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
