"""
Native Sparse Attention (DeepSeek, arXiv 2502.11089): the attention functions nanoNSA calls.

    o = g_cmp * Attn(q, K_cmp, V_cmp) + g_slc * Attn(q, K_slc, V_slc) + g_win * Attn(q, K_win, V_win)

Public API (shapes: B batch, T tokens, HQ query heads, H key/value heads, G = HQ // H):

    nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=32, block_stride=16,
                  select_block=64, n_select=16, window=512, scale=None) -> o
    nsa_attention_ref(...same...)      # plain PyTorch; defines the semantics

    q: [B, T, HQ, D]    k, v: [B, T, H, D]    k_cmp, v_cmp: [B, Tc, H, D]    g_*: [B, T, HQ]
    Tc = (T - l) // d + 1 if T >= l else 0; compressed block i summarises tokens [i*d, i*d + l).
    o: [B, T, HQ, D] in q's dtype; scale defaults to D ** -0.5.

nsa_attention runs hand-written Triton kernels (forward and backward of every branch, top-n
selection in-kernel) for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 was set
before this module was imported; otherwise, and for valid inputs the kernels do not take
(queries shorter than keys as in decoding, float64, head dims outside 16/32/64/128/256), it
runs nsa_attention_ref (on a GPU with a one-time warning). Kernel inputs: fp16, bf16 or fp32
(fp32 dots run as tf32 on a GPU), any T >= 1, any G >= 1 (tensor-core tiles are full for
G >= 16), B >= 1. Extra memory of forward + backward: O(T * (HQ*D + H*n)).

Per-branch entry points (Triton, for benchmarks and tests; each differentiable but nsa_select):

    o, lse = compressed_attention(q, k_cmp, v_cmp, block_len=32, block_stride=16)
        # lse: [B, T, HQ] fp32, base-2 log-sum-exp of the scaled logits (+inf: no block seen)
    idx = nsa_select(q, k_cmp, lse, block_len=32, block_stride=16, select_block=64, n_select=16)
        # int32 [B, T, H, n]: forced blocks first, then by score; -1 pads
    o = selected_attention(q, k, v, idx, select_block=64)
    o = window_attention(q, k, v, window=512)

nsa_attention = compressed_attention + nsa_select + selected_attention + window_attention +
a fused gate kernel (o = sum of g_b * o_b; its backward also gives the gate gradients), so the
branches' times add up to the whole. TUNING holds the GPU tile sizes.

Semantics for the query at 0-indexed position t:
 1. compressed branch: softmax over the blocks i with i*d + l <= t + 1 (zero if there is none);
 2. block scores: selection block j covers [j*l', (j+1)*l'); score[j] sums, over the G query
    heads of a KV head and the compressed blocks i, p_cmp[h, t, i] * |block i ∩ block j| / d
    (the overlap reading of the paper's Eq. 9);
 3. selection: blocks with j*l' <= t are eligible; block 0, t//l' and t//l' - 1 are always
    taken, the best-scoring others fill up to n; all G heads share the choice;
 4. selected branch: softmax over the tokens s <= t of the selected blocks;
 5. window branch: softmax over the tokens t - w < s <= t.
"""
import json
import math
import os
import warnings

import torch
import triton
import triton.language as tl


def num_compressed_blocks(T, block_len, block_stride):
    """Number of complete compression blocks in T tokens: block i covers [i*d, i*d + l)."""
    return (T - block_len) // block_stride + 1 if T >= block_len else 0


def check_block_sizes(block_len, block_stride, select_block, n_select, window):
    """Raise a ValueError naming the rule a block-size setting breaks."""
    for name, value in [("block_len", block_len), ("block_stride", block_stride),
                        ("select_block", select_block), ("n_select", n_select), ("window", window)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if block_len % block_stride != 0:
        raise ValueError(f"block_stride ({block_stride}) must divide block_len ({block_len})")
    if select_block % block_stride != 0:
        raise ValueError(f"block_stride ({block_stride}) must divide select_block ({select_block})")
    if n_select < 3:
        raise ValueError(f"n_select must be >= 3 (1 initial + 2 local blocks are always selected), "
                         f"got {n_select}")


def check_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride):
    """Shape and dtype checks shared by the reference and the kernels. Returns (B, T, HQ, H, D)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, HQ, D], got shape {tuple(q.shape)}")
    B, T, HQ, D = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B, T, H, D] = [{B}, T, H, {D}], got {tuple(k.shape)}")
    Tk, H = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if Tk < T:
        raise ValueError(f"k has {Tk} tokens, fewer than q's {T}")
    if HQ % H != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({H})")
    Tc = num_compressed_blocks(Tk, block_len, block_stride)
    if tuple(k_cmp.shape) != (B, Tc, H, D) or v_cmp.shape != k_cmp.shape:
        raise ValueError(f"k_cmp and v_cmp must be [B, Tc, H, D] = [{B}, {Tc}, {H}, {D}] "
                         f"(Tc = (T - block_len) // block_stride + 1), got "
                         f"{tuple(k_cmp.shape)} and {tuple(v_cmp.shape)}")
    for name, g in [("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)]:
        if tuple(g.shape) != (B, T, HQ):
            raise ValueError(f"{name} must be [B, T, HQ] = [{B}, {T}, {HQ}], got {tuple(g.shape)}")
    for name, x in [("k", k), ("v", v), ("k_cmp", k_cmp), ("v_cmp", v_cmp)]:
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, q has {q.dtype}: they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: they must match")
    return B, T, HQ, H, D


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch reference. O(T^2) memory; it computes in at least fp32 and is the definition the
# kernels are tested against. Queries may be the last Tq <= T positions of the keys' sequence
# (KV-cache decoding and chunked prefill); for training Tq == T.

def overlap_weights(Tc, n_blocks, block_len, block_stride, select_block, device=None):
    """[Tc, n_blocks]: |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d, the weight with which compressed
    block i's probability counts towards selection block j (l=32, d=16, l'=64: 1,2,2,2,1)."""
    start = torch.arange(Tc, device=device)[:, None] * block_stride
    sel_start = torch.arange(n_blocks, device=device)[None, :] * select_block
    overlap = (torch.minimum(start + block_len, sel_start + select_block)
               - torch.maximum(start, sel_start)).clamp(min=0)
    return overlap.float() / block_stride


def compressed_probs_ref(q, k_cmp, block_len, block_stride, scale, q_start=0):
    """p_cmp: [B, HQ, Tq, Tc] softmax over the compressed blocks each query sees (rows with
    none are all zero). Queries sit at positions q_start .. q_start + Tq - 1."""
    B, Tq, HQ, D = q.shape
    H, Tc = k_cmp.shape[2], k_cmp.shape[1]
    G = HQ // H
    dtype = torch.promote_types(q.dtype, torch.float32)
    qh = q.transpose(1, 2).to(dtype)                                        # [B, HQ, Tq, D]
    kh = k_cmp.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)        # [B, HQ, Tc, D]
    s = (qh @ kh.transpose(-1, -2)) * scale                                 # [B, HQ, Tq, Tc]
    t = torch.arange(q_start, q_start + Tq, device=q.device)[:, None]
    visible = torch.arange(Tc, device=q.device)[None, :] * block_stride + block_len <= t + 1
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)                                     # no visible block: 0


def select_blocks_ref(p_cmp, T, block_len, block_stride, select_block, n_select, q_start=0):
    """Selection as in the module docstring. p_cmp: [B, H, G, Tq, Tc] compressed-branch
    probabilities grouped by KV head; T: keys' length; queries at q_start ... q_start + Tq - 1.
    Returns (selected [B, H, Tq, NB] bool, score [B, H, Tq, NB]) with NB = ceil(T / l')."""
    B, H, G, Tq, Tc = p_cmp.shape
    n_blocks = (T + select_block - 1) // select_block
    w = overlap_weights(Tc, n_blocks, block_len, block_stride, select_block, p_cmp.device)
    score = p_cmp.sum(dim=2) @ w.to(p_cmp.dtype)                            # [B, H, Tq, NB]
    t = torch.arange(q_start, q_start + Tq, device=p_cmp.device)[:, None]
    j = torch.arange(n_blocks, device=p_cmp.device)[None, :]
    eligible = j * select_block <= t
    cur = t // select_block
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    rank = score.masked_fill(forced, float("inf")).masked_fill(~eligible, float("-inf"))
    top = rank.topk(min(n_select, n_blocks), dim=-1).indices
    selected = torch.zeros_like(eligible.expand_as(score)).scatter(-1, top, True) & eligible
    return selected, score


def nsa_attention_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=32,
                      block_stride=16, select_block=64, n_select=16, window=512, scale=None):
    """Plain-PyTorch NSA; see the module docstring. q: [B, Tq, HQ, D] are the last Tq positions
    of k, v: [B, T, H, D]; k_cmp, v_cmp: [B, Tc, H, D]; g_*: [B, Tq, HQ] -> o: [B, Tq, HQ, D]."""
    check_block_sizes(block_len, block_stride, select_block, n_select, window)
    B, Tq, HQ, H, D = check_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win,
                                   block_len, block_stride)
    T, G = k.shape[1], HQ // H
    scale = D ** -0.5 if scale is None else scale
    q_start = T - Tq
    dtype = torch.promote_types(q.dtype, torch.float32)

    p_cmp = compressed_probs_ref(q, k_cmp, block_len, block_stride, scale, q_start)
    vc = v_cmp.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)        # [B, HQ, Tc, D]
    o_cmp = p_cmp.to(dtype) @ vc                                            # [B, HQ, Tq, D]

    with torch.no_grad():  # selection is not differentiable (paper §3.3.2)
        selected, _ = select_blocks_ref(p_cmp.detach().view(B, H, G, Tq, -1), T, block_len,
                                        block_stride, select_block, n_select, q_start)
    t = torch.arange(q_start, q_start + Tq, device=q.device)[:, None]     # [Tq, 1]
    s = torch.arange(T, device=q.device)[None, :]                           # [1, T]
    causal = s <= t
    token_selected = selected.repeat_interleave(select_block, dim=-1)[..., :T]  # [B, H, Tq, T]
    slc_mask = (token_selected & causal).repeat_interleave(G, dim=1)       # [B, HQ, Tq, T]
    win_mask = causal & (s > t - window)

    qh = q.transpose(1, 2).to(dtype)
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)
    logits = (qh @ kh.transpose(-1, -2)) * scale                            # [B, HQ, Tq, T]
    o_slc = torch.softmax(logits.masked_fill(~slc_mask, float("-inf")), dim=-1) @ vh
    o_win = torch.softmax(logits.masked_fill(~win_mask, float("-inf")), dim=-1) @ vh

    def gate(g):
        return g.transpose(1, 2).to(dtype)[..., None]                      # [B, HQ, Tq, 1]
    o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_win) * o_win
    return o.transpose(1, 2).to(q.dtype)


@torch.compiler.disable  # a torch.compile'd model runs the kernels as they are (graph break)
def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=32, block_stride=16,
                  select_block=64, n_select=16, window=512, scale=None):
    """NSA forward with autograd. Same arguments, shapes and semantics as nsa_attention_ref:
    q: [B, T, HQ, D], k, v: [B, T, H, D], k_cmp, v_cmp: [B, Tc, H, D], g_*: [B, T, HQ]."""
    if _use_triton(q):
        check_block_sizes(block_len, block_stride, select_block, n_select, window)
        check_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride)
        reason = _kernel_unsupported(q, k)
        if reason is None:
            for name, g in [("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)]:
                if not g.is_floating_point() or g.device != q.device:
                    raise ValueError(f"{name} must be a floating tensor on {q.device}, got "
                                     f"{g.dtype} on {g.device}")
            return _NSAFunction.apply(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len,
                                      block_stride, select_block, n_select, window,
                                      _default_scale(q, scale))
        if q.is_cuda:
            _warn_once(f"nsa_attention: {reason}; using the (slow, O(T^2) memory) PyTorch "
                       f"reference")
    return nsa_attention_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len=block_len,
                             block_stride=block_stride, select_block=select_block,
                             n_select=n_select, window=window, scale=scale)


# ----------------------------------------------------------------------------------------------
# Triton kernels (training: forward and backward of every branch, top-n selection in-kernel).
#
# Layout: q, o: [B, T, HQ, D] and k, v: [B, T, H, D] (k_cmp, v_cmp: [B, Tc, H, D]), contiguous.
# The G = HQ // H query heads of KV head h are the contiguous heads h*G .. h*G + G - 1, so a tile
# of "rows" is a set of (position t, head g) pairs that share one KV head: every key/value tile
# is loaded once for all G heads (the group-centric loading of the paper's §3.4).
# Logits are kept in the base-2 domain (s2 = q.k * scale * log2(e)); every saved log-sum-exp
# `lse` is log2(sum 2^s2) and is +inf for a row that sees no key (its output is 0).

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30        # "window" of the compressed branch: every earlier block is visible


def _use_triton(q):
    return q.is_cuda or (_INTERPRET and q.device.type == "cpu")


# GPU tile settings (bench scripts may change them; NSA_TUNING='{"dq_rows": 128}' in the
# environment overrides them at import): rows (positions x heads) per tile of the dense
# (compressed, window) forward, dq and dk/dv kernels, keys per forward and dk/dv tile, rows per
# selected-branch dk/dv chunk, warps of the selected-branch fwd/dq kernels (16 rows each) and
# their pipelining depth, pipelining depth of the others. Defaults: the fastest of a sweep on an
# H200 at T=64k (benchmarks/kernels_h200_2026-11-28_v2_sweep.json; 128 keys per dk/dv tile
# doubled the compressed backward there)
TUNING = {"fwd_rows": 64, "fwd_keys": 64, "dq_rows": 64, "dkdv_rows": 64, "dkdv_keys": 64,
          "slc_dkdv_rows": 64, "slc_warps": 2, "slc_stages": 2, "stages": 2}
TUNING.update(json.loads(os.environ.get("NSA_TUNING", "{}")))


def _num_warps(rows, D):
    return 1 if _INTERPRET else (8 if rows * D >= 128 * 128 else 4)


def _slc_warps():
    return 1 if _INTERPRET else TUNING["slc_warps"]


def _slc_stages():
    return 1 if _INTERPRET else TUNING["slc_stages"]


def _stages():
    return 1 if _INTERPRET else TUNING["stages"]


@triton.jit
def _dense_fwd_kernel(q, k, v, o, lse, T, TK, G, BT, HQ, H, scale_log2, KSTRIDE, KOFF, WINDOW,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Causal attention of BT positions x G heads (BM rows) over keys i whose position
    KOFF + i*KSTRIDE lies in (t - WINDOW, t]. Compressed branch: KSTRIDE=d, KOFF=l-1 (block i
    ends at i*d + l - 1); window branch: KSTRIDE=1, KOFF=0."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BM)
    t = i_t * BT + o_r // G                                                   # [BM]
    m_r = (o_r < BT * G) & (t < T)
    p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)            # [BM] row ids
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)  # [BM, D]

    t_lo = i_t * BT
    t_hi = tl.minimum(t_lo + BT, T) - 1
    # keys visible to some row of the tile; division is C-style, so keep numerators >= 0
    i_start = tl.maximum(t_lo - WINDOW - KOFF + KSTRIDE, 0) // KSTRIDE
    i_end = tl.minimum(tl.maximum(t_hi - KOFF + KSTRIDE, 0) // KSTRIDE, TK)

    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, D], tl.float32)
    for i0 in range(i_start, i_end, BN):
        o_i = i0 + tl.arange(0, BN)                                           # [BN]
        m_k = o_i < i_end
        p_key = (i_b * TK + o_i).to(tl.int64) * H + i_h
        b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BM, BN]
        pos = KOFF + o_i * KSTRIDE
        m_s = m_k[None, :] & (pos[None, :] <= t[:, None]) & (pos[None, :] > t[:, None] - WINDOW)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_o = (b_acc / b_l_safe[:, None]).to(o.dtype.element_ty)
    tl.store(o + p_row[:, None] * D + o_d[None, :], b_o,
             mask=m_r[:, None])
    tl.store(lse + p_row, tl.where(b_l > 0, b_m + tl.log2(b_l_safe), float("inf")), mask=m_r)


@triton.jit
def _dense_bwd_dq_kernel(q, k, v, do, lse, delta, dq, T, TK, G, BT, HQ, H, scale_log2, scale,
                         KSTRIDE, KOFF, WINDOW, ACCUM: tl.constexpr,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dq of _dense_fwd_kernel's attention; same tiling. dq is fp32 and owned by this program's
    rows (no atomics); ACCUM adds to what an earlier branch wrote there."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BM)
    t = i_t * BT + o_r // G
    m_r = (o_r < BT * G) & (t < T)
    p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
    b_do = tl.load(do + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
    b_lse = tl.load(lse + p_row, mask=m_r, other=float("inf"))               # [BM]
    b_delta = tl.load(delta + p_row, mask=m_r, other=0.)

    t_lo = i_t * BT
    t_hi = tl.minimum(t_lo + BT, T) - 1
    i_start = tl.maximum(t_lo - WINDOW - KOFF + KSTRIDE, 0) // KSTRIDE
    i_end = tl.minimum(tl.maximum(t_hi - KOFF + KSTRIDE, 0) // KSTRIDE, TK)
    b_dq = tl.zeros([BM, D], tl.float32)
    for i0 in range(i_start, i_end, BN):
        o_i = i0 + tl.arange(0, BN)
        m_k = o_i < i_end
        p_key = (i_b * TK + o_i).to(tl.int64) * H + i_h
        b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        pos = KOFF + o_i * KSTRIDE
        m_s = m_k[None, :] & (pos[None, :] <= t[:, None]) & (pos[None, :] > t[:, None] - WINDOW)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)              # [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    b_dq = b_dq * scale
    p_dq = dq + p_row[:, None] * D + o_d[None, :]
    if ACCUM:
        b_dq += tl.load(p_dq, mask=m_r[:, None], other=0.)
    tl.store(p_dq, b_dq, mask=m_r[:, None])


@triton.jit
def _dense_bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, T, TK, G, BT, HQ, H, scale_log2,
                           scale, KSTRIDE, KOFF, WINDOW, SLICE, ATOMIC: tl.constexpr,
                           D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dk, dv (fp32) of BN keys of one KV head: loop over the query tiles that can see them.
    Grid axis 1 cuts the queries into absolute slices of SLICE positions whose partial sums
    meet by atomic adds (ATOMIC), so that the early compressed keys, seen by every later
    query, do not serialise on one program; and since axis 0 (the key tiles) varies fastest,
    the programs running together read the same query slice, which stays in L2."""
    i_k, i_sp, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_i = i_k * BN + tl.arange(0, BN)
    m_k = o_i < TK
    o_d = tl.arange(0, D)
    p_key = (i_b * TK + o_i).to(tl.int64) * H + i_h
    b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)  # [BN, D]
    b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
    pos = KOFF + o_i * KSTRIDE                                                # [BN]
    t_beg = tl.maximum(KOFF + i_k * BN * KSTRIDE, i_sp * SLICE)
    t_end = tl.minimum(KOFF + (tl.minimum(i_k * BN + BN, TK) - 1) * KSTRIDE + WINDOW, T)
    t_end = tl.minimum(t_end, i_sp * SLICE + SLICE)
    b_dk = tl.zeros([BN, D], tl.float32)
    b_dv = tl.zeros([BN, D], tl.float32)
    o_r = tl.arange(0, BM)
    for t0 in range(t_beg, t_end, BT):
        t = t0 + o_r // G
        m_r = (o_r < BT * G) & (t < t_end)
        p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)
        b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
        b_do = tl.load(do + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
        b_lse = tl.load(lse + p_row, mask=m_r, other=float("inf"))
        b_delta = tl.load(delta + p_row, mask=m_r, other=0.)
        m_s = (m_r[:, None] & m_k[None, :] & (pos[None, :] <= t[:, None])
               & (pos[None, :] > t[:, None] - WINDOW))
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BM, BN]
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    p_out = p_key[:, None] * D + o_d[None, :]
    if ATOMIC:
        m_out = m_k[:, None] & (t_beg < t_end)
        tl.atomic_add(dk + p_out, b_dk * scale, mask=m_out)
        tl.atomic_add(dv + p_out, b_dv, mask=m_out)
    else:
        tl.store(dk + p_out, b_dk * scale, mask=m_k[:, None])
        tl.store(dv + p_out, b_dv, mask=m_k[:, None])


@triton.jit
def _select_kernel(q, k_cmp, lse, idx, T, TC, G, HQ, H, scale_log2, NSEL: tl.constexpr,
                   CBLK: tl.constexpr, CSTRIDE: tl.constexpr, SBLK: tl.constexpr,
                   BJ: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
                   BC: tl.constexpr, K: tl.constexpr):
    """Top-n selection blocks for BT positions x G heads of one KV head (BM = BT*BG rows, the G
    heads padded to BG = next_pow2(G)). Recomputes p_cmp = 2^(s2 - lse) chunk by chunk over the
    compressed blocks, maps it onto selection blocks with the overlap weights (a [BC, K] matrix
    that is the same for every chunk, since chunks start on selection-block boundaries), sums
    the G heads, and merges the chunk's candidates into a running top-n kept in registers
    (unsorted; sorted once at the end). A candidate is one int64: the fp32 score's bits
    (non-negative, so they order like the score) above the block index; ineligible blocks are
    NONE. Only [B, T, H, n] indices leave
    the kernel."""
    BT: tl.constexpr = BM // BG
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_r = tl.arange(0, BM)
    o_g = o_r % BG
    t = i_t * BT + o_r // BG                                                  # [BM]
    m_r = (o_g < G) & (t < T)
    p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_g)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
    b_lse = tl.load(lse + p_row, mask=m_r, other=float("inf"))

    # overlap weights: chunk column c is compressed block j0*R - M1 + c, column jj is selection
    # block j0 + jj (R = l'/d compressed strides per selection block, M1 = l/d - 1 blocks
    # reaching back into the previous selection block)
    R: tl.constexpr = SBLK // CSTRIDE
    M1: tl.constexpr = CBLK // CSTRIDE - 1
    o_c = tl.arange(0, BC)
    o_j = tl.arange(0, K)
    c_start = (o_c - M1) * CSTRIDE                                            # [BC]
    j_start = o_j * SBLK                                                      # [K]
    b_w = (tl.minimum(c_start[:, None] + CBLK, j_start[None, :] + SBLK)
           - tl.maximum(c_start[:, None], j_start[None, :]))
    b_w = tl.where(o_j[None, :] < BJ, tl.maximum(b_w, 0).to(tl.float32) / CSTRIDE, 0.)  # [BC, K]

    o_tt = i_t * BT + tl.arange(0, BT)                                        # [BT] positions
    cur = o_tt // SBLK
    t_hi = tl.minimum(i_t * BT + BT, T) - 1
    # the running top-n, unsorted: slot i < n starts empty as -1 - i (distinct, so the minimum is
    # always one slot), slots >= n hold FULL and are never the minimum
    NONE: tl.constexpr = -(1 << 62)                                           # ineligible
    FULL: tl.constexpr = (1 << 63) - 1                                        # unused slot
    b_top = tl.where(o_j[None, :] < NSEL, -1 - o_j[None, :].to(tl.int64), FULL)
    b_top = b_top + tl.zeros([BT, K], tl.int64)                               # [BT, K]
    for j0 in range(0, t_hi // SBLK + 1, BJ):
        o_ci = j0 * R - M1 + o_c                                              # [BC] cmp block ids
        m_c = (o_ci >= 0) & (o_ci < TC)
        p_key = (i_b * TC + o_ci).to(tl.int64) * H + i_h
        b_kc = tl.load(k_cmp + p_key[:, None] * D + o_d[None, :], mask=m_c[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_kc)) * scale_log2                       # [BM, BC]
        m_s = m_r[:, None] & m_c[None, :] & ((o_ci * CSTRIDE + CBLK - 1)[None, :] <= t[:, None])
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        if BT * BC * K <= 8192:
            # few positions (G large): sum the heads first, then weight in registers
            b_ps = tl.sum(tl.reshape(b_p, [BT, BG, BC]), 1)                   # [BT, BC]
            b_sc = tl.sum(b_ps[:, :, None] * b_w[None, :, :], 1)              # [BT, K]
        else:
            b_sc = tl.dot(b_p, b_w, input_precision="ieee")                   # [BM, K]
            b_sc = tl.sum(tl.reshape(b_sc, [BT, BG, K]), 1)                   # [BT, K]
        b_sc = b_sc + 0.                                                      # no -0.0 bits
        o_jj = j0 + o_j                                                       # [K]
        m_elig = (o_j[None, :] < BJ) & (o_jj[None, :] * SBLK <= o_tt[:, None])
        m_forced = ((o_jj[None, :] == 0) | (o_jj[None, :] == cur[:, None])
                    | (o_jj[None, :] == cur[:, None] - 1))
        b_sc = tl.where(m_forced, float("inf"), b_sc)
        b_key = (b_sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | o_jj[None, :].to(tl.int64)
        b_key = tl.where(m_elig, b_key, NONE)
        # merge: a candidate enters by replacing the smallest member when it is larger. Most
        # chunks far from the diagonal bring nothing that beats the current n-th best, so the
        # number of rounds (the most any row of the tile needs) is usually 0 or 1; a sorted
        # merge would pay n rounds of cross-warp reductions per chunk.
        b_min = tl.min(b_top, 1)                                              # [BT]
        n_round = tl.max(tl.sum((b_key > b_min[:, None]).to(tl.int32), 1))
        for _ in range(n_round):
            b_best = tl.max(b_key, 1)                                         # [BT]
            b_min = tl.min(b_top, 1)
            m_in = (b_best > b_min)[:, None]
            b_top = tl.where(m_in & (b_top == b_min[:, None]), b_best[:, None], b_top)
            b_key = tl.where(b_key == b_best[:, None], NONE, b_key)
    # largest first (the forced blocks, score +inf, lead), empty slots last
    b_out = tl.full([BT, K], -1, tl.int64)
    b_top = tl.where(o_j[None, :] < NSEL, b_top, NONE)
    for i_r in tl.static_range(NSEL):
        b_max = tl.max(b_top, 1)                                              # [BT]
        b_out = tl.where(o_j[None, :] == i_r, b_max[:, None], b_out)
        b_top = tl.where(b_top == b_max[:, None], NONE, b_top)
    b_top = b_out
    b_idx = tl.where(b_top >= 0, b_top.to(tl.int32), -1)            # low 32 bits: the block
    p_idx = ((i_b * T + o_tt).to(tl.int64) * H + i_h) * NSEL
    tl.store(idx + p_idx[:, None] + o_j[None, :], b_idx,
             mask=(o_tt[:, None] < T) & (o_j[None, :] < NSEL))


@triton.jit
def _slc_fwd_kernel(q, k, v, idx, o, lse, T, G, HQ, H, scale_log2, NSEL,
                    SBLK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BG: tl.constexpr):
    """Selected attention for one position and KV head: the G heads are the rows (padded to
    BG >= 16 for tl.dot), the inner loop runs over the n selected blocks (tokens s <= t)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g               # [BG]
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.)
    p_idx = idx + ((i_b * T + i_t).to(tl.int64) * H + i_h) * NSEL
    o_s = tl.arange(0, BS)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, D], tl.float32)
    # exactly min(n, t // l' + 1) blocks are eligible, and the kernel lists them first
    for i_n in range(tl.minimum(NSEL, i_t // SBLK + 1)):
        j = tl.load(p_idx + i_n)
        pos = j * SBLK + o_s                                                  # [BS]
        m_k = (o_s < SBLK) & (pos <= i_t) & (j >= 0)
        p_key = (i_b * T + pos).to(tl.int64) * H + i_h
        b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BG, BS]
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_p = tl.exp2(b_s - b_m_safe[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_o = (b_acc / b_l_safe[:, None]).to(o.dtype.element_ty)
    tl.store(o + p_row[:, None] * D + o_d[None, :], b_o,
             mask=m_g[:, None])
    tl.store(lse + p_row, tl.where(b_l > 0, b_m + tl.log2(b_l_safe), float("inf")), mask=m_g)


@triton.jit
def _slc_bwd_dq_kernel(q, k, v, idx, do, lse, delta, dq, T, G, HQ, H, scale_log2, scale, NSEL,
                       ACCUM: tl.constexpr, SBLK: tl.constexpr, BS: tl.constexpr,
                       D: tl.constexpr, BG: tl.constexpr):
    """dq of the selected branch; one program per (position, KV head) as in the forward, so
    every dq row has one writer and needs no atomics."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.)
    b_do = tl.load(do + p_row[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.)
    b_lse = tl.load(lse + p_row, mask=m_g, other=float("inf"))
    b_delta = tl.load(delta + p_row, mask=m_g, other=0.)
    p_idx = idx + ((i_b * T + i_t).to(tl.int64) * H + i_h) * NSEL
    o_s = tl.arange(0, BS)
    b_dq = tl.zeros([BG, D], tl.float32)
    # exactly min(n, t // l' + 1) blocks are eligible, and the kernel lists them first
    for i_n in range(tl.minimum(NSEL, i_t // SBLK + 1)):
        j = tl.load(p_idx + i_n)
        pos = j * SBLK + o_s
        m_k = (o_s < SBLK) & (pos <= i_t) & (j >= 0)
        p_key = (i_b * T + pos).to(tl.int64) * H + i_h
        b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        b_p = tl.where(m_k[None, :], tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    b_dq = b_dq * scale
    p_dq = dq + p_row[:, None] * D + o_d[None, :]
    if ACCUM:
        b_dq += tl.load(p_dq, mask=m_g[:, None], other=0.)
    tl.store(p_dq, b_dq, mask=m_g[:, None])


@triton.jit
def _slc_bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, q_list, seg_bin, seg_start, seg_end,
                         T, G, BQ, HQ, H, NB, scale_log2, scale,
                         SBLK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr):
    """dk, dv of one selection block from one segment of the queries that selected it (the
    inverted selection, q_list, holds the positions grouped by block). Each chunk stacks BQ
    positions x G heads as BM rows of one matmul; segments of a block meet by atomic adds."""
    i_seg = tl.program_id(0)
    i_bin = tl.load(seg_bin + i_seg)
    start = tl.load(seg_start + i_seg)
    end = tl.load(seg_end + i_seg)
    i_bh = i_bin // NB
    j = i_bin % NB
    i_b, i_h = i_bh // H, i_bh % H
    o_s = tl.arange(0, BS)
    pos = j * SBLK + o_s
    m_k = (o_s < SBLK) & (pos < T)
    o_d = tl.arange(0, D)
    p_key = (i_b * T + pos).to(tl.int64) * H + i_h
    b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)  # [BS, D]
    b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
    b_dk = tl.zeros([BS, D], tl.float32)
    b_dv = tl.zeros([BS, D], tl.float32)
    o_r = tl.arange(0, BM)
    for c0 in range(start, end, BQ):
        o_q = c0 + o_r // G
        m_r = (o_r < BQ * G) & (o_q < end)
        t = tl.load(q_list + o_q, mask=m_r, other=0)                          # [BM] positions
        p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)
        b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
        b_do = tl.load(do + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
        b_lse = tl.load(lse + p_row, mask=m_r, other=float("inf"))
        b_delta = tl.load(delta + p_row, mask=m_r, other=0.)
        m_s = m_r[:, None] & m_k[None, :] & (pos[None, :] <= t[:, None])
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BM, BS]
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q)
    m_out = m_k[:, None] & (start < end)
    p_out = p_key[:, None] * D + o_d[None, :]
    tl.atomic_add(dk + p_out, b_dk * scale, mask=m_out)
    tl.atomic_add(dv + p_out, b_dv, mask=m_out)


@triton.jit
def _combine_fwd_kernel(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, N,
                        D: tl.constexpr, BR: tl.constexpr):
    """o = g_cmp*o_cmp + g_slc*o_slc + g_win*o_win over BR rows of [N, D], in fp32."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < N
    o_d = tl.arange(0, D)
    p = o_r[:, None] * D + o_d[None, :]
    b_o = tl.load(g_cmp + o_r, mask=m_r, other=0.).to(tl.float32)[:, None] * \
        tl.load(o_cmp + p, mask=m_r[:, None], other=0.).to(tl.float32)
    b_o += tl.load(g_slc + o_r, mask=m_r, other=0.).to(tl.float32)[:, None] * \
        tl.load(o_slc + p, mask=m_r[:, None], other=0.).to(tl.float32)
    b_o += tl.load(g_win + o_r, mask=m_r, other=0.).to(tl.float32)[:, None] * \
        tl.load(o_win + p, mask=m_r[:, None], other=0.).to(tl.float32)
    tl.store(o + p, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _combine_bwd_one(do, o_b, g_b, do_b, dg_b, delta_b, o_r, m_r, p):
    b_g = tl.load(g_b + o_r, mask=m_r, other=0.).to(tl.float32)
    b_dg = tl.sum(do * tl.load(o_b + p, mask=m_r[:, None], other=0.).to(tl.float32), 1)
    tl.store(do_b + p, (b_g[:, None] * do).to(do_b.dtype.element_ty), mask=m_r[:, None])
    tl.store(dg_b + o_r, b_dg, mask=m_r)
    # the branch's softmax backward needs rowsum(do_b * o_b) = g_b * rowsum(do * o_b)
    tl.store(delta_b + o_r, b_g * b_dg, mask=m_r)


@triton.jit
def _combine_bwd_kernel(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, do_cmp, do_slc, do_win,
                        dg_cmp, dg_slc, dg_win, dl_cmp, dl_slc, dl_win, N,
                        D: tl.constexpr, BR: tl.constexpr):
    """From do: each branch's upstream gradient g_b*do, the gate gradients rowsum(do*o_b), and
    each branch's softmax-backward term delta_b, in one pass over the rows."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < N
    o_d = tl.arange(0, D)
    p = o_r[:, None] * D + o_d[None, :]
    b_do = tl.load(do + p, mask=m_r[:, None], other=0.).to(tl.float32)
    _combine_bwd_one(b_do, o_cmp, g_cmp, do_cmp, dg_cmp, dl_cmp, o_r, m_r, p)
    _combine_bwd_one(b_do, o_slc, g_slc, do_slc, dg_slc, dl_slc, o_r, m_r, p)
    _combine_bwd_one(b_do, o_win, g_win, do_win, dg_win, dl_win, o_r, m_r, p)


# ----------------------------------------------------------------------------------------------
# Launchers: check inputs, allocate outputs, pick tiles and grids.

POISON_OUTPUTS = _INTERPRET  # fill outputs with NaN (indices with -2) first: unwritten shows up
_KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dk/dv of the compressed keys: split each key tile's query range into slices of 256 to this
# many positions (atomic adds join them), enough for about _CMP_SPLIT_PROGRAMS programs;
# selected dk/dv: at most _SLC_SEGMENT queries per program
_CMP_SPLIT_POSITIONS = 256 if _INTERPRET else 4096
_CMP_SPLIT_PROGRAMS = 4096
_SLC_SEGMENT = 32 if _INTERPRET else 256


def _alloc(shape, dtype, device, fill=float("nan")):
    if POISON_OUTPUTS:
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rows_per_tile(G, D, kind):
    """Rows (positions x heads) of a dense tile: TUNING[kind] (64 for D > 128), and at least
    all G heads of a position. The interpreter pays per operation, not per element: it gets
    big tiles."""
    if _INTERPRET:
        return max(256, triton.next_power_of_2(G))
    bm = TUNING[kind] if D <= 128 else 64
    return max(bm, triton.next_power_of_2(G))


def _dense_fwd(q, k, v, kstride, koff, window, scale):
    """Attention of q over keys at positions koff + i*kstride in (t - window, t].
    Returns o (q's dtype) and the base-2 lse [B, T, HQ] (fp32, +inf where nothing is visible)."""
    B, T, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = HQ // H
    o = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((B, T, HQ), torch.float32, q.device)
    if TK == 0:
        return o.zero_(), lse.fill_(float("inf"))
    BM = _rows_per_tile(G, D, "fwd_rows")
    BN = TUNING["fwd_keys"] if D <= 128 and not _INTERPRET else (64 if D <= 128 else 32)
    BT = BM // G
    grid = (triton.cdiv(T, BT), B * H)
    _dense_fwd_kernel[grid](q, k, v, o, lse, T, TK, G, BT, HQ, H, scale * _LOG2E, kstride, koff,
                            window, D=D, BM=BM, BN=BN, num_warps=_num_warps(max(BM, BN), D),
                            num_stages=_stages())
    return o, lse


def _dense_bwd(q, k, v, do, lse, delta, dq, accum, kstride, koff, window, scale):
    """Backward of _dense_fwd. Writes (accum: adds) the fp32 dq; returns fp32 dk, dv."""
    B, T, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = HQ // H
    if TK == 0:
        if not accum:
            dq.zero_()
        return (torch.zeros(k.shape, dtype=torch.float32, device=q.device),
                torch.zeros(k.shape, dtype=torch.float32, device=q.device))
    BM = _rows_per_tile(G, D, "dq_rows")
    BN = 64 if D <= 128 else 32
    _dense_bwd_dq_kernel[(triton.cdiv(T, BM // G), B * H)](
        q, k, v, do, lse, delta, dq, T, TK, G, BM // G, HQ, H, scale * _LOG2E, scale, kstride,
        koff, window, ACCUM=accum, D=D, BM=BM, BN=BN, num_warps=_num_warps(BM, D),
        num_stages=_stages())
    BM = _rows_per_tile(G, D, "dkdv_rows")
    BN = TUNING["dkdv_keys"] if D <= 128 and not _INTERPRET else BN
    BT = BM // G
    # each key tile sees at most min(T, span) query positions; split long ranges, into short
    # slices when there are few key tiles (at 8k, 1 KV head: 8 tiles would be 8 programs)
    span = min(T, (BN - 1) * kstride + window)
    tiles = triton.cdiv(TK, BN) * B * H
    slice_len = min(_CMP_SPLIT_POSITIONS,
                    max(256, triton.next_power_of_2(triton.cdiv(T * tiles, _CMP_SPLIT_PROGRAMS))))
    nsplit = 1 if span <= slice_len else triton.cdiv(T, slice_len)
    if nsplit > 1:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    else:
        dk = _alloc(k.shape, torch.float32, q.device)
        dv = _alloc(k.shape, torch.float32, q.device)
    _dense_bwd_dkdv_kernel[(triton.cdiv(TK, BN), nsplit, B * H)](
        q, k, v, do, lse, delta, dk, dv, T, TK, G, BT, HQ, H, scale * _LOG2E, scale, kstride,
        koff, window, T if nsplit == 1 else slice_len, ATOMIC=nsplit > 1, D=D,
        BM=BM, BN=BN, num_warps=_num_warps(max(BM, BN), D), num_stages=_stages())
    return dk, dv


def _slc_tiles(G, select_block):
    return max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(select_block))


def _slc_fwd(q, k, v, idx, select_block, scale):
    B, T, HQ, D = q.shape
    H, n = k.shape[2], idx.shape[-1]
    G = HQ // H
    BG, BS = _slc_tiles(G, select_block)
    o = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((B, T, HQ), torch.float32, q.device)
    _slc_fwd_kernel[(T, B * H)](q, k, v, idx, o, lse, T, G, HQ, H, scale * _LOG2E, n,
                                SBLK=select_block, BS=BS, D=D, BG=BG,
                                num_warps=_slc_warps(), num_stages=_slc_stages())
    return o, lse


def _invert_selection(idx, n_blocks, segment):
    """CSR of the selection, without a host sync: the positions that chose each (batch, KV
    head, block) bin, sorted by bin then position (q_list), cut into segments of at most
    `segment` positions. Returns q_list and per-segment (bin, start, end) into q_list; the grid
    bound E/segment + bins is an upper bound on the segment count (unused ones are empty)."""
    B, T, H, n = idx.shape
    dev = idx.device
    n_bins = B * H * n_blocks
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, None, :, None]
    t = torch.arange(T, device=dev)[None, :, None, None]
    bins = torch.where(idx >= 0, (b * H + h) * n_blocks + idx.long(), n_bins)   # [B, T, H, n]
    key = torch.sort((bins * T + t).flatten()).values
    q_list = (key % T).to(torch.int32)
    offsets = torch.searchsorted(key // T, torch.arange(n_bins + 1, device=dev))  # [bins + 1]
    n_seg = (offsets[1:] - offsets[:-1] + segment - 1) // segment
    seg_cum = n_seg.cumsum(0)
    s = torch.arange(idx.numel() // segment + n_bins, device=dev)
    seg_bin = torch.searchsorted(seg_cum, s, right=True)
    valid = seg_bin < n_bins
    sb = seg_bin.clamp(max=n_bins - 1)
    start = offsets[sb] + (s - (seg_cum[sb] - n_seg[sb])) * segment
    end = torch.minimum(start + segment, offsets[sb + 1])
    zero = torch.zeros_like(start)
    return (q_list, torch.where(valid, sb, zero).to(torch.int32),
            torch.where(valid, start, zero).to(torch.int32),
            torch.where(valid, end, zero).to(torch.int32))


def _slc_bwd(q, k, v, idx, do, lse, delta, dq, accum, dk, dv, select_block, scale):
    """Backward of _slc_fwd: writes (accum: adds) the fp32 dq; adds into the fp32 dk, dv."""
    B, T, HQ, D = q.shape
    H, n = k.shape[2], idx.shape[-1]
    G = HQ // H
    BG, BS = _slc_tiles(G, select_block)
    _slc_bwd_dq_kernel[(T, B * H)](q, k, v, idx, do, lse, delta, dq, T, G, HQ, H,
                                   scale * _LOG2E, scale, n, ACCUM=accum, SBLK=select_block,
                                   BS=BS, D=D, BG=BG, num_warps=_slc_warps(),
                                   num_stages=_slc_stages())
    n_blocks = triton.cdiv(T, select_block)
    q_list, seg_bin, seg_start, seg_end = _invert_selection(idx, n_blocks, _SLC_SEGMENT)
    BM = _rows_per_tile(G, D, "slc_dkdv_rows")
    _slc_bwd_dkdv_kernel[(seg_bin.numel(),)](
        q, k, v, do, lse, delta, dk, dv, q_list, seg_bin, seg_start, seg_end, T, G, BM // G, HQ,
        H, n_blocks, scale * _LOG2E, scale, SBLK=select_block, BS=BS, D=D, BM=BM,
        num_warps=_num_warps(BM, D), num_stages=_stages())


def _select(q, k_cmp, lse, block_len, block_stride, select_block, n_select, scale):
    B, T, HQ, D = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    BG = triton.next_power_of_2(G)
    BM = max(64, BG)
    R, M1 = select_block // block_stride, block_len // block_stride - 1
    BC = max(64, triton.next_power_of_2(R + M1))
    BJ = (BC - M1) // R
    K = max(16, triton.next_power_of_2(n_select), triton.next_power_of_2(BJ))
    idx = _alloc((B, T, H, n_select), torch.int32, q.device, fill=-2)
    kc = k_cmp if Tc > 0 else q.new_zeros(1)   # nothing is loaded when Tc == 0
    _select_kernel[(triton.cdiv(T, BM // BG), B * H)](
        q, kc, lse, idx, T, Tc, G, HQ, H, scale * _LOG2E, n_select,
        CBLK=block_len, CSTRIDE=block_stride, SBLK=select_block, BJ=BJ, D=D, BM=BM, BG=BG,
        BC=BC, K=K, num_warps=_num_warps(BM, D), num_stages=_stages())
    return idx


def _combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    B, T, HQ, D = o_cmp.shape
    N = B * T * HQ
    o = _alloc(o_cmp.shape, o_cmp.dtype, o_cmp.device)
    BR = max(1, 4096 // D)
    _combine_fwd_kernel[(triton.cdiv(N, BR),)](o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, N,
                                              D=D, BR=BR, num_warps=4)
    return o


def _combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    B, T, HQ, D = do.shape
    N = B * T * HQ
    dev = do.device
    d_o = [_alloc(do.shape, o_cmp.dtype, dev) for _ in range(3)]
    d_g = [_alloc((B, T, HQ), torch.float32, dev) for _ in range(3)]
    d_l = [_alloc((B, T, HQ), torch.float32, dev) for _ in range(3)]
    BR = max(1, 4096 // D)
    _combine_bwd_kernel[(triton.cdiv(N, BR),)](do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win,
                                              *d_o, *d_g, *d_l, N, D=D, BR=BR, num_warps=4)
    return d_o, d_g, d_l


def _kernel_unsupported(q, k):
    """Why valid inputs cannot take the kernels (None if they can)."""
    if k.shape[1] != q.shape[1]:
        return (f"the kernels need q and k of the same length (training), got {q.shape[1]} "
                f"and {k.shape[1]}")
    if q.dtype not in _KERNEL_DTYPES:
        return f"the kernels take float16, bfloat16 or float32, got {q.dtype}"
    if q.shape[-1] not in _KERNEL_HEAD_DIMS:
        return f"the kernels need head dim D in {_KERNEL_HEAD_DIMS}, got {q.shape[-1]}"
    return None


_WARNED = set()


def _warn_once(message):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Autograd. _NSAFunction runs the whole layer (the path nsa_attention takes); the per-branch
# functions below expose each kernel with its own backward, for benchmarks and tests.

def _cmp_geometry(block_len, block_stride):
    return block_stride, block_len - 1, _NO_WINDOW      # kstride, koff, window


class _NSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride,
                select_block, n_select, window, scale):
        q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win = (
            x.contiguous() for x in (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win))
        o_cmp, lse_cmp = _dense_fwd(q, k_cmp, v_cmp, *_cmp_geometry(block_len, block_stride),
                                    scale)
        idx = _select(q, k_cmp, lse_cmp, block_len, block_stride, select_block, n_select, scale)
        o_slc, lse_slc = _slc_fwd(q, k, v, idx, select_block, scale)
        o_win, lse_win = _dense_fwd(q, k, v, 1, 0, window, scale)
        o = _combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, o_cmp, o_slc, o_win,
                              lse_cmp, lse_slc, lse_win, idx)
        ctx.cfg = (block_len, block_stride, select_block, window, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, o_cmp, o_slc, o_win,
         lse_cmp, lse_slc, lse_win, idx) = ctx.saved_tensors
        block_len, block_stride, select_block, window, scale = ctx.cfg
        (do_cmp, do_slc, do_win), dg, (dl_cmp, dl_slc, dl_win) = _combine_bwd(
            do.contiguous(), o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        dq = _alloc(q.shape, torch.float32, q.device)
        dk_cmp, dv_cmp = _dense_bwd(q, k_cmp, v_cmp, do_cmp, lse_cmp, dl_cmp, dq, False,
                                    *_cmp_geometry(block_len, block_stride), scale)
        dk, dv = _dense_bwd(q, k, v, do_win, lse_win, dl_win, dq, True, 1, 0, window, scale)
        _slc_bwd(q, k, v, idx, do_slc, lse_slc, dl_slc, dq, True, dk, dv, select_block, scale)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dk_cmp.to(k_cmp.dtype),
                dv_cmp.to(v_cmp.dtype), dg[0].to(g_cmp.dtype), dg[1].to(g_slc.dtype),
                dg[2].to(g_win.dtype), None, None, None, None, None, None)


def _delta(do, o):
    return (do.float() * o.float()).sum(-1)


class _DenseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kstride, koff, window, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _dense_fwd(q, k, v, kstride, koff, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg = (kstride, koff, window, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq = _alloc(q.shape, torch.float32, q.device)
        dk, dv = _dense_bwd(q, k, v, do, lse, _delta(do, o), dq, False, *ctx.cfg)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class _SlcFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_block, scale):
        q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
        o, lse = _slc_fwd(q, k, v, idx, select_block, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse)
        ctx.cfg = (select_block, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse = ctx.saved_tensors
        select_block, scale = ctx.cfg
        do = do.contiguous()
        dq = _alloc(q.shape, torch.float32, q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        _slc_bwd(q, k, v, idx, do, lse, _delta(do, o), dq, False, dk, dv, select_block, scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _check_branch(q, k, v, same_length=True):
    """Shape/dtype checks of the per-branch functions: q [B, T, HQ, D], k, v [B, T', H, D]."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"need q [B, T, HQ, D] and k, v [B, T, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} (batch, head dim, "
                         f"query heads a multiple of key heads)")
    if same_length and k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must have the same length, got {q.shape[1]}, {k.shape[1]}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v must share dtype and device")
    reason = _kernel_unsupported(q, q)
    if reason is not None:
        raise ValueError(reason)


def compressed_attention(q, k_cmp, v_cmp, *, block_len=32, block_stride=16, scale=None):
    """Compressed branch alone (Triton, autograd): q [B, T, HQ, D], k_cmp, v_cmp [B, Tc, H, D]
    -> (o [B, T, HQ, D], lse [B, T, HQ] fp32, base 2: log2 sum_i 2^(q.k_i * scale * log2 e),
    +inf for queries that see no block). Pass lse to nsa_select."""
    check_block_sizes(block_len, block_stride, block_stride, 3, 1)
    _check_branch(q, k_cmp, v_cmp, same_length=False)
    if k_cmp.shape[1] != num_compressed_blocks(q.shape[1], block_len, block_stride):
        raise ValueError(f"k_cmp has {k_cmp.shape[1]} blocks, T={q.shape[1]} makes "
                         f"{num_compressed_blocks(q.shape[1], block_len, block_stride)}")
    return _DenseFunction.apply(q, k_cmp, v_cmp, *_cmp_geometry(block_len, block_stride),
                                _default_scale(q, scale))


def nsa_select(q, k_cmp, lse, *, block_len=32, block_stride=16, select_block=64, n_select=16,
               scale=None):
    """Top-n selection blocks from the compressed branch's lse (no gradient): int32
    [B, T, H, n_select], the always-taken blocks first, -1 where fewer blocks are eligible."""
    check_block_sizes(block_len, block_stride, select_block, n_select, 1)
    _check_branch(q, k_cmp, k_cmp, same_length=False)
    if tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [B, T, HQ] = {tuple(q.shape[:3])}, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    with torch.no_grad():
        return _select(q.contiguous(), k_cmp.contiguous(), lse.contiguous(), block_len,
                       block_stride, select_block, n_select, _default_scale(q, scale))


def selected_attention(q, k, v, idx, *, select_block=64, scale=None):
    """Selected branch alone (Triton, autograd): attention of q over the tokens s <= t of the
    blocks idx [B, T, H, n] (from nsa_select; -1 = none) -> o [B, T, HQ, D]."""
    _check_branch(q, k, v)
    if (idx.dim() != 4 or tuple(idx.shape[:3]) != (q.shape[0], q.shape[1], k.shape[2])
            or idx.dtype != torch.int32):
        raise ValueError(f"idx must be int32 [B, T, H, n], got {idx.dtype} {tuple(idx.shape)}")
    return _SlcFunction.apply(q, k, v, idx, select_block, _default_scale(q, scale))


def window_attention(q, k, v, *, window=512, scale=None):
    """Sliding-window branch alone (Triton, autograd): keys t - window < s <= t -> o."""
    check_block_sizes(1, 1, 1, 3, window)
    _check_branch(q, k, v)
    return _DenseFunction.apply(q, k, v, 1, 0, window, _default_scale(q, scale))[0]
