"""
Tests of NSA decoding (nsa_kernels.nsa_decode, model.py's KV cache). Run (CPU, kernels
under the Triton interpreter):

    TRITON_INTERPRET=1 python -m pytest -q test_decode.py

Without TRITON_INTERPRET=1 the kernel tests run on a GPU if there is one (fp32 dots as tf32,
looser tolerances) and are skipped otherwise; the CUDA-graph test needs a GPU.
"""
import os

import pytest
import torch

import nsa_kernels as nk
from model import GPT, DecodeGraph, GPTConfig, KVCache

PAPER = dict(nk.PAPER_HP)
SMALL = dict(block_len=16, block_stride=8, select_block=32, n_select=4, window=64)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None,
                                   reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
# fp32 under the interpreter is exact up to summation order; a GPU runs fp32 dots as tf32
TOL = dict(rel=1e-5, max=1e-4, score=1e-5) if INTERPRET else dict(rel=5e-3, max=2e-2, score=1e-2)


def decode_inputs(lengths, Tmax, HQ, H, D, cfg, dtype=torch.float32, device="cpu",
                  strided=False, Tc_extra=2):
    """Random caches of Tmax slots, filled up to lengths[b] and NaN beyond (a kernel that reads
    past a sequence's end poisons its output), q, gates and lengths on the device."""
    B = len(lengths)
    Tcmax = nk.num_compressed_blocks(Tmax, cfg["block_len"], cfg["block_stride"]) + Tc_extra
    if strided:   # k and v interleaved in one buffer: non-contiguous views with equal strides
        kv = torch.randn(B, Tmax, 2, H, D, dtype=dtype, device=device)
        k, v = kv[:, :, 0], kv[:, :, 1]
        kvc = torch.randn(B, Tcmax, 2, H, D, dtype=dtype, device=device)
        k_cmp, v_cmp = kvc[:, :, 0], kvc[:, :, 1]
    else:
        k, v = (torch.randn(B, Tmax, H, D, dtype=dtype, device=device) for _ in range(2))
        k_cmp, v_cmp = (torch.randn(B, Tcmax, H, D, dtype=dtype, device=device) for _ in range(2))
    for b, T in enumerate(lengths):
        Tc = nk.num_compressed_blocks(T, cfg["block_len"], cfg["block_stride"])
        for x in (k, v):
            x[b, T:] = float("nan")
        for x in (k_cmp, v_cmp):
            x[b, Tc:] = float("nan")
    q = torch.randn(B, 1, HQ, D, dtype=dtype, device=device)
    gates = [torch.rand(B, 1, HQ, dtype=dtype, device=device) for _ in range(3)]
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return [q, k, v, k_cmp, v_cmp, *gates, lens]


def errors(got, want):
    """(max abs error, relative norm error)."""
    diff = (got.double() - want.double())
    return diff.abs().max().item(), (diff.norm() / want.double().norm().clamp(min=1e-30)).item()


def reference_scores(q, k_cmp, T, cfg):
    """Block scores [H, NB] of a query at T - 1 (q [1, 1, HQ, D], k_cmp [1, Tc, H, D]): forced
    blocks +inf; every block j < ceil(T / l') is eligible."""
    HQ, D = q.shape[2], q.shape[3]
    H, Tc = k_cmp.shape[2], k_cmp.shape[1]
    p = nk.compressed_probs_ref(q.double(), k_cmp.double(), cfg["block_len"],
                                cfg["block_stride"], D ** -0.5, q_start=T - 1)
    _, score = nk.select_blocks_ref(p.view(1, H, HQ // H, 1, Tc), T, cfg["block_len"],
                                    cfg["block_stride"], cfg["select_block"], cfg["n_select"],
                                    q_start=T - 1)
    score = score[0, :, 0]                                                    # [H, NB]
    j = torch.arange(score.shape[-1])
    cur = (T - 1) // cfg["select_block"]
    return score.masked_fill((j == 0) | (j == cur) | (j == cur - 1), float("inf"))


# Cases: lengths 1, below block_len, not multiples of any block size, crossing several
# compression and selection blocks (more eligible blocks than n_select in the longest).
CASES = [
    pytest.param([1, 13, 150], 160, 2, 2, 16, SMALL, False, id="small-G1-B3"),
    pytest.param([40, 97, 200, 5], 203, 6, 2, 32, SMALL, False, id="small-G3-B4"),
    pytest.param([7, 255], 256, 16, 1, 32, SMALL, True, id="small-G16-strided"),
    pytest.param([31, 1100, 300], 1110, 16, 1, 16, PAPER, False, id="paper-G16"),
    pytest.param([1030, 1, 700], 1040, 6, 2, 16, PAPER, True, id="paper-G3-strided"),
]
# more than 64 selection blocks: the top-n's group bound is then not exact (kernel tests only:
# the full-sequence reference would be O(T^2))
LONG_CASES = [
    pytest.param([2100, 1500, 700], 2200, 4, 2, 16, SMALL, False, id="small-G2-long"),
    pytest.param([4200, 4100], 4300, 2, 1, 16, PAPER, False, id="paper-G2-long"),
]
# default tiling, and one where every launcher loop runs several times: several chunks per
# split, a split count that does not divide the chunks, 3 selected blocks per piece (not a
# divisor of n), window pieces that are not a multiple of the key tile, merge steps that do
# not divide the pieces, and a top-n candidate cap below n (the bisection fallback)
TUNINGS = [
    pytest.param({}, id="default"),
    pytest.param(dict(cmp_chunk=16, cmp_programs=5, cmp_splits=3, select_cap=2, slc_blocks=3,
                      win_tokens=40, tokens=16, merge_pieces=3, merge_dims=16), id="tiny-tiles"),
]


@pytest.mark.parametrize("lengths,Tmax,HQ,H,D,cfg,strided", CASES)
def test_decode_ref_matches_full_forward(lengths, Tmax, HQ, H, D, cfg, strided):
    """nsa_decode_ref equals the last row of nsa_attention_ref on each whole sequence."""
    torch.manual_seed(0)
    xs = decode_inputs(lengths, Tmax, HQ, H, D, cfg, dtype=torch.float64, strided=strided)
    got = nk.nsa_decode_ref(*xs, **cfg)
    assert got.shape == xs[0].shape and got.dtype == torch.float64
    q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, _ = xs
    for b, T in enumerate(lengths):
        Tc = nk.num_compressed_blocks(T, cfg["block_len"], cfg["block_stride"])
        q_full = torch.randn(1, T, HQ, D, dtype=torch.float64)
        q_full[:, -1] = q[b, 0]
        g_full = [torch.rand(1, T, HQ, dtype=torch.float64) for _ in range(3)]
        for g_f, g in zip(g_full, (g_cmp, g_slc, g_win)):
            g_f[:, -1] = g[b, 0]
        want = nk.nsa_attention_ref(q_full, k[b:b + 1, :T], v[b:b + 1, :T], k_cmp[b:b + 1, :Tc],
                                    v_cmp[b:b + 1, :Tc], *g_full, **cfg)[:, -1:]
        err_max, err_rel = errors(got[b:b + 1], want)
        assert err_rel < 1e-12, f"sequence {b} (T={T}): max {err_max:.2e}, rel {err_rel:.2e}"


@needs_kernels
@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("lengths,Tmax,HQ,H,D,cfg,strided", CASES + LONG_CASES)
def test_decode_kernel_matches_ref(lengths, Tmax, HQ, H, D, cfg, strided, tuning, monkeypatch):
    for key, value in tuning.items():
        monkeypatch.setitem(nk.DECODE_TUNING, key, value)
    torch.manual_seed(1)
    xs = decode_inputs(lengths, Tmax, HQ, H, D, cfg, device=KERNEL_DEVICE, strided=strided)
    got = nk.nsa_decode(*xs, **cfg)
    want = nk.nsa_decode_ref(*xs, **cfg)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "non-finite output (an unwritten or poisoned value)"
    err_max, err_rel = errors(got, want)
    assert err_max < TOL["max"] and err_rel < TOL["rel"], \
        f"max {err_max:.2e}, rel {err_rel:.2e}"


@needs_kernels
@pytest.mark.parametrize("tuning", TUNINGS)
def test_decode_kernel_own_window_kv(tuning, monkeypatch):
    """The window branch with its own caches (k_win_cache, v_win_cache, NaN past each length):
    the kernels against the reference, and the reference against nsa_attention_ref's last row."""
    for key, value in tuning.items():
        monkeypatch.setitem(nk.DECODE_TUNING, key, value)
    torch.manual_seed(2)
    lengths, Tmax, HQ, H, D = [150, 37, 90], 160, 4, 2, 16
    xs = decode_inputs(lengths, Tmax, HQ, H, D, SMALL, device=KERNEL_DEVICE)
    own = {}
    for name in ("k_win_cache", "v_win_cache"):
        own[name] = torch.randn_like(xs[1])
        for b, T in enumerate(lengths):
            own[name][b, T:] = float("nan")
    got = nk.nsa_decode(*xs, **SMALL, **own)
    want = nk.nsa_decode_ref(*xs, **SMALL, **own)
    assert torch.isfinite(got).all(), "non-finite output (an unwritten or poisoned value)"
    err_max, err_rel = errors(got, want)
    assert err_max < TOL["max"] and err_rel < TOL["rel"], f"max {err_max:.2e}, rel {err_rel:.2e}"
    assert errors(got, nk.nsa_decode(*xs, **SMALL))[1] > 1e-2   # the window's keys count
    q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, _ = xs
    T = lengths[1]
    Tc = nk.num_compressed_blocks(T, SMALL["block_len"], SMALL["block_stride"])
    full = nk.nsa_attention_ref(
        torch.cat([torch.randn(1, T - 1, HQ, D, device=q.device), q[1:2]], 1), k[1:2, :T],
        v[1:2, :T], k_cmp[1:2, :Tc], v_cmp[1:2, :Tc],
        *(torch.cat([torch.rand(1, T - 1, HQ, device=q.device), g[1:2]], 1)
          for g in (g_cmp, g_slc, g_win)),
        **SMALL, k_win=own["k_win_cache"][1:2, :T], v_win=own["v_win_cache"][1:2, :T])
    assert errors(want[1:2], full[:, -1:])[1] < 1e-5


@needs_kernels
@pytest.mark.parametrize("tuning", TUNINGS)
@pytest.mark.parametrize("lengths,Tmax,HQ,H,D,cfg,strided", CASES + LONG_CASES)
def test_decode_selection_matches_reference_scores(lengths, Tmax, HQ, H, D, cfg, strided, tuning,
                                                   monkeypatch):
    """The kernels' chosen blocks, compared by their reference scores with the reference's
    top-n (so that near-ties may go either way)."""
    for key, value in tuning.items():
        monkeypatch.setitem(nk.DECODE_TUNING, key, value)
    torch.manual_seed(2)
    q, k, _, k_cmp = decode_inputs(lengths, Tmax, HQ, H, D, cfg, device=KERNEL_DEVICE,
                                   strided=strided)[:4]
    lens = torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)
    sel_cfg = {key: cfg[key] for key in ("block_len", "block_stride", "select_block", "n_select")}
    idx = nk.nsa_decode_select(q, k, k_cmp, lens, **sel_cfg).cpu()
    n, ls = cfg["n_select"], cfg["select_block"]
    assert idx.shape == (len(lengths), H, n) and idx.dtype == torch.int32
    for b, T in enumerate(lengths):
        nb = (T + ls - 1) // ls                                   # eligible: j * l' <= T - 1
        chosen = idx[b]                                                        # [H, n]
        n_chosen = min(n, nb)
        assert (chosen[:, :n_chosen] >= 0).all() and (chosen[:, n_chosen:] == -1).all(), \
            f"sequence {b}: wrong count of chosen blocks / padding: {chosen.tolist()}"
        assert (chosen[:, :n_chosen] < nb).all(), f"sequence {b}: an ineligible block"
        assert (chosen[:, 1:n_chosen] > chosen[:, :n_chosen - 1]).all(), \
            f"sequence {b}: blocks not distinct and increasing: {chosen.tolist()}"
        Tc = nk.num_compressed_blocks(T, cfg["block_len"], cfg["block_stride"])
        score = reference_scores(q[b:b + 1].cpu(), k_cmp[b:b + 1, :Tc].cpu(), T, cfg)
        got = score.gather(-1, chosen[:, :n_chosen].long()).sort(-1, descending=True).values
        want = score.topk(n_chosen, dim=-1).values
        finite = torch.isfinite(want)
        assert (torch.isfinite(got) == finite).all(), f"sequence {b}: forced blocks differ"
        if finite.any():                  # else every chosen block is a forced one
            err = (got[finite] - want[finite]).abs().max().item()
            assert err <= TOL["score"] * max(want[finite].abs().max().item(), 1.0), \
                f"sequence {b}: chosen scores differ from the top-n by {err:.2e}"


@needs_kernels
def test_decode_selection_ties_prefer_larger_blocks():
    """Zero compressed keys make the interior blocks' scores exactly equal: like training's
    top-n, the kernels then keep the larger block indices. Exactly: every q.k_cmp is 0, and with
    128 and 32 compressed blocks each probability is a power of two, so the overlap-weighted
    sums are exact in any order. (One random key repeated was not enough: the interpreter's
    matmul rounded q.k_cmp differently across columns on one CPU, an AMD EPYC.)"""
    torch.manual_seed(5)
    cfg = dict(SMALL, n_select=6)
    lengths = [1035, 270]                               # 128 and 32 compressed blocks
    q, k, _, k_cmp = decode_inputs(lengths, 1040, 4, 2, 16, cfg, device=KERNEL_DEVICE)[:4]
    assert [nk.num_compressed_blocks(T, 16, 8) for T in lengths] == [128, 32]
    k_cmp.zero_()
    lens = torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)
    sel_cfg = {key: cfg[key] for key in ("block_len", "block_stride", "select_block", "n_select")}
    idx = nk.nsa_decode_select(q, k, k_cmp, lens, **sel_cfg).cpu()
    for b, T in enumerate(lengths):
        cur = (T - 1) // cfg["select_block"]
        want = [0] + list(range(cur - 4, cur + 1))   # forced 0, cur-1, cur; ties: the largest
        assert idx[b].tolist() == [want] * 2, f"sequence {b}: {idx[b].tolist()}"


@needs_kernels
def test_decode_kernel_out_of_range_length_gives_nan():
    torch.manual_seed(3)
    xs = decode_inputs([20, 50], 60, 4, 2, 16, SMALL, device=KERNEL_DEVICE)
    xs[-1] = torch.tensor([0, 61], dtype=torch.int32, device=KERNEL_DEVICE)
    assert torch.isnan(nk.nsa_decode(*xs, **SMALL)).all()
    with pytest.raises(ValueError, match="outside"):
        nk.nsa_decode_ref(*xs, **SMALL)


@pytest.mark.parametrize("change,match", [
    (lambda xs: xs.__setitem__(0, xs[0].expand(-1, 2, -1, -1)), r"q must be \[B, 1, HQ, D\]"),
    (lambda xs: xs.__setitem__(8, xs[8].float()), "lengths must be int32 or int64"),
    (lambda xs: xs.__setitem__(8, xs[8][:1]), r"lengths must be a tensor of shape \[B\]"),
    (lambda xs: xs.__setitem__(3, xs[3][:, :2]), "Tcmax >= "),
    (lambda xs: xs.__setitem__(2, xs[2].half()), "v_cache has dtype"),
    (lambda xs: xs.__setitem__(6, xs[6][:, :, :2]), r"g_slc must be \[B, 1, HQ\]"),
    (lambda xs: xs.__setitem__(1, xs[1][:, :, :1]), "v_cache must have k_cache's shape"),
], ids=["q-two-tokens", "lengths-float", "lengths-shape", "cmp-cache-short", "dtype-mismatch",
        "gate-shape", "kv-shape"])
def test_decode_input_errors(change, match):
    xs = decode_inputs([5, 9], 40, 4, 2, 16, SMALL)
    change(xs)
    with pytest.raises(ValueError, match=match):
        nk.nsa_decode(*xs, **SMALL)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
def test_decode_cuda_graph_replays_after_lengths_change():
    """A captured step replays correctly after lengths (and q) change in place."""
    torch.manual_seed(4)
    cfg = PAPER
    xs = decode_inputs([3000, 70, 1500], 4096, 32, 2, 128, cfg, dtype=torch.bfloat16,
                       device="cuda")
    for x in xs[1:5]:
        x.nan_to_num_(0.)       # slots past a length get written in this test
    q, lengths = xs[0], xs[-1]
    nk.nsa_decode(*xs, **cfg)                                   # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nk.nsa_decode(*xs, **cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nk.nsa_decode(*xs, **cfg)
    for new_lengths in ([3001, 71, 1501], [4096, 1, 2048], [17, 4000, 64]):
        lengths.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        eager = nk.nsa_decode(*xs, **cfg)
        want = nk.nsa_decode_ref(*xs, **cfg)
        assert torch.equal(out, eager), f"replay differs from an eager call at {new_lengths}"
        err_max, err_rel = errors(out, want)
        assert err_rel < 2e-2, f"lengths {new_lengths}: max {err_max:.2e}, rel {err_rel:.2e}"


# --------------------------------------------------------------------------- the model's cache
def tiny_model(attention, device="cpu", dtype=torch.float32, **kw):
    """A 2-layer model whose head dim (16) the kernels take, with blocks small enough that a
    hundred tokens cross many compression, selection and window boundaries."""
    torch.manual_seed(5)
    config = GPTConfig(block_size=128, vocab_size=67, n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64, attention=attention, block_len=16, block_stride=8,
                       select_block=16, n_select=3, window=24, **kw)
    return GPT(config).to(device, dtype).eval()


def decode_logits(model, idx, lengths, steps, static=False):
    """Prefill the right-padded prompts idx[:, :max(lengths)], then feed each sequence its own
    next tokens of idx for `steps` steps; the logits [B, steps + 1, V] of every step."""
    cache = KVCache(model.config.n_layer, model.config.block_size)
    rows = torch.arange(idx.shape[0])
    out = [model(idx[:, :max(lengths)], cache=cache, lengths=lengths)[0]]
    cache.static = static
    n = torch.tensor(lengths)
    for s in range(steps):
        out.append(model(idx[rows, n + s][:, None], cache=cache)[0])
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("attention,kw", [("nsa", {}), ("full", {}),
                                          ("nsa", dict(own_window_kv=True))],
                         ids=["nsa", "full", "nsa-own-window-kv"])
def test_cached_decoding_equals_the_full_forward(attention, kw, static):
    """Every step's logits equal the full forward's at that position: B = 2 with unequal
    prompt lengths, across compression, selection and window boundaries (the kernels under the
    interpreter; static: the CUDA-graph code path run eagerly)."""
    model = tiny_model(attention, **kw)
    idx = torch.randint(0, 67, (2, 80))
    lengths, steps = [13, 37], 20
    full, _ = model(idx, idx)
    got, _ = decode_logits(model, idx, lengths, steps, static)
    for b, n in enumerate(lengths):
        err_max, err_rel = errors(got[b], full[b, n - 1:n + steps])
        assert err_rel < 1e-5, f"sequence {b}: max {err_max:.2e}, rel {err_rel:.2e}"


def test_cache_compresses_each_block_once():
    """φ sees each completed compression block exactly once (the prefill's blocks, then one
    per block a decoding step completes), and NSA's cache costs full attention's plus 1/d."""
    model = tiny_model("nsa")
    seen = []
    model.transformer.h[0].attn.phi_k.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[:-2].numel()))
    idx = torch.randint(0, 67, (2, 100))
    _, cache = decode_logits(model, idx, [40, 40], 20)
    assert sum(seen) == 2 * nk.num_compressed_blocks(60, 16, 8)
    nsa_bytes = cache.nbytes_per_token()
    _, full_cache = decode_logits(tiny_model("full"), idx, [40, 40], 1)
    full_bytes = full_cache.nbytes_per_token()
    assert full_bytes < nsa_bytes <= full_bytes * (1 + 1 / 8) * 1.01, (nsa_bytes, full_bytes)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_decode_graph_replays_the_model_step(attention):
    """A DecodeGraph step equals the eager step from the same cache, step after step."""
    model = tiny_model(attention, "cuda", torch.bfloat16)
    idx = torch.randint(0, 67, (3, 128), device="cuda")
    lengths = [20, 45, 7]
    eager, _ = decode_logits(model, idx, lengths, 30)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    out = [model(idx[:, :max(lengths)], cache=cache, lengths=lengths)[0]]
    step = DecodeGraph(model, cache)
    rows, n = torch.arange(3, device="cuda"), torch.tensor(lengths, device="cuda")
    for s in range(30):
        out.append(step(idx[rows, n + s][:, None])[0].clone())
    err_max, err_rel = errors(torch.cat(out, dim=1).float(), eager.float())
    assert err_rel < 2e-2, f"max {err_max:.2e}, rel {err_rel:.2e}"
