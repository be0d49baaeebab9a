"""
Native Sparse Attention (DeepSeek, arXiv 2502.11089): the attention functions nanoNSA calls.

    o = g_cmp*Attn(q, K_cmp, V_cmp) + g_slc*Attn(q, K_slc, V_slc) + g_win*Attn(q, K_win, V_win)

Public API (shapes: B batch, T tokens, HQ query heads, H key/value heads, G = HQ // H):

    nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len, block_stride,
                  select_block, n_select, window, scale=None) -> o
    nsa_attention_ref(...same...)      # plain PyTorch; defines the semantics

    q: [B, T, HQ, D]    k, v: [B, T, H, D]    k_cmp, v_cmp: [B, Tc, H, D]    g_*: [B, T, HQ]
    Tc = (T - l) // d + 1 if T >= l else 0; compressed block i summarises tokens [i*d, i*d + l).
    Optional k_win=, v_win= [B, T, H, D]: the window branch's own keys and values (default:
    k, v, shared with the selected branch); nsa_decode takes k_win_cache=, v_win_cache=.
    o: [B, T, HQ, D] in q's dtype; scale defaults to D ** -0.5; the block sizes default to the
    paper's (PAPER_HP).

nsa_attention runs hand-written Triton kernels (forward and backward of every branch, top-n
selection in-kernel) for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 was set
before this module was imported. It runs nsa_attention_ref instead for queries shorter than
keys (KV-cache decoding, chunked prefill), for CPU tensors without the interpreter, and (with a
one-time warning on a GPU) for inputs the kernels do not take: float64, head dims outside
16/32/64/128/256. Kernel inputs: fp16, bf16 or fp32 (fp32 dots run as tf32 on a GPU), any T >= 1,
any G >= 1, B >= 1. Extra memory of forward + backward: O(T * (HQ*D + H*n)), and for G < 16
(SLC_BLOCK_ORDER_BELOW_G, SLC_DQ_PIECES_BELOW_G) a transient O(T * HQ * n * D) in the selected
branch's forward and backward.
RECOMPUTE names the branches whose outputs the backward recomputes instead of holding them.

Per-branch entry points (Triton only, for benchmarks and tests; each differentiable but
nsa_select; block-size arguments keyword-only, defaulting to PAPER_HP):

    o, lse = compressed_attention(q, k_cmp, v_cmp, block_len, block_stride)
        # lse: [B, T, HQ] fp32, base-2 log-sum-exp of the scaled logits (+inf: no block seen)
    idx = nsa_select(q, k_cmp, lse, block_len, block_stride, select_block, n_select)
        # int32 [B, T, H, n]: forced blocks first, then by score; -1 pads
    o = selected_attention(q, k, v, idx, select_block)
    o = window_attention(q, k, v, window)

Decoding (one new token per sequence; the Triton kernels on a GPU, the reference elsewhere):

    nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win, lengths, *,
               block_len, block_stride, select_block, n_select, window, scale=None) -> o
    nsa_decode_ref(...same...)          # plain PyTorch; defines the semantics
    nsa_decode_select(q, k_cache, k_cmp_cache, lengths, *, block_len, block_stride,
                      select_block, n_select, scale=None) -> idx  # the kernels' choice

    q: [B, 1, HQ, D]                  the new query of each sequence (rotated)
    k_cache, v_cache: [B, Tmax, H, D] token s of sequence b at [b, s]
    k_cmp_cache, v_cmp_cache: [B, Tcmax, H, D], compressed block i of sequence b at [b, i];
        rows i < num_compressed_blocks(lengths[b], l, d) must be valid (append a block before
        the call when the new token completes it); Tcmax >= num_compressed_blocks(Tmax, l, d)
    g_cmp, g_slc, g_win: [B, 1, HQ]
    lengths: int32 (or int64) [B] on q's device, tokens in the cache including the new one
        (the query sits at t = lengths[b] - 1). The kernels read it from device memory (no
        host sync; the grid depends on shapes only), so a decoding step can be captured in a
        CUDA graph and replayed after lengths change in place. A length outside [1, Tmax]
        gives a NaN row there (the reference raises instead).
    o: [B, 1, HQ, D] in q's dtype; idx: int32 [B, H, n], the chosen selection blocks in
        increasing order, -1 pads.

nsa_attention = compressed_attention + nsa_select + selected_attention + window_attention +
a fused gate kernel (o = sum of g_b * o_b; its backward also gives the gate gradients), so the
branches' times add up to the whole. The launchers fix the GPU tile sizes.

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
import math
import os
import warnings

import torch
import triton
import triton.language as tl


# The paper's hyperparameters (§4.1). Every default in this file, and GPTConfig's, comes from
# here.
BLOCK_LEN = 32      # l: tokens per compression block
BLOCK_STRIDE = 16   # d: stride between compression blocks
SELECT_BLOCK = 64   # l': tokens per selection block
N_SELECT = 16       # n: selected blocks per query, counting 1 initial + 2 local
WINDOW = 512        # w: sliding-window length
PAPER_HP = dict(block_len=BLOCK_LEN, block_stride=BLOCK_STRIDE, select_block=SELECT_BLOCK,
                n_select=N_SELECT, window=WINDOW)


def num_compressed_blocks(T, block_len, block_stride):
    """Number of complete compression blocks in T tokens: block i covers [i*d, i*d + l)."""
    return (T - block_len) // block_stride + 1 if T >= block_len else 0


# ----------------------------------------------------------------------------------------------
# Input checks. Every public function checks its inputs once, here, with errors that name the
# problem; the reference, the launchers and the kernels then trust them.

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # kernels on CPU tensors
_KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_positive(**sizes):
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_compression(block_len, block_stride):
    _check_positive(block_len=block_len, block_stride=block_stride)
    if block_len % block_stride != 0:
        raise ValueError(f"block_stride ({block_stride}) must divide block_len ({block_len})")


def _check_selection(block_len, block_stride, select_block, n_select):
    _check_compression(block_len, block_stride)
    _check_positive(select_block=select_block, n_select=n_select)
    if select_block % block_stride != 0:
        raise ValueError(f"block_stride ({block_stride}) must divide select_block ({select_block})")
    if n_select < 3:
        raise ValueError(f"n_select must be >= 3 (1 initial + 2 local blocks are always selected), "
                         f"got {n_select}")


def check_block_sizes(block_len, block_stride, select_block, n_select, window):
    """Raise a ValueError naming the rule a block-size setting breaks."""
    _check_selection(block_len, block_stride, select_block, n_select)
    _check_positive(window=window)


def _check_keys(q, **keys):
    """q: [B, T, HQ, D] with T >= 1; keys, by name: tensors of one shape [B, Tk, H, D], H
    dividing HQ, with q's dtype and device. Returns (B, T, HQ, H, D, Tk)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, HQ, D], got shape {tuple(q.shape)}")
    B, T, HQ, D = q.shape
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    first, k = next(iter(keys.items()))
    if k.dim() != 4 or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{first} must be [B, T, H, D] = [{B}, T, H, {D}], got {tuple(k.shape)}")
    for name, x in keys.items():
        if x.shape != k.shape:
            raise ValueError(f"{name} must have {first}'s shape {tuple(k.shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, q has {q.dtype}: they must match")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: they must match")
    Tk, H = k.shape[1], k.shape[2]
    if HQ % H != 0:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({H})")
    return B, T, HQ, H, D, Tk


def _check_compressed_keys(k_cmp, T, block_len, block_stride):
    Tc = num_compressed_blocks(T, block_len, block_stride)
    if k_cmp.shape[1] != Tc:
        raise ValueError(f"k_cmp has {k_cmp.shape[1]} blocks, T={T} makes {Tc} "
                         f"(Tc = (T - block_len) // block_stride + 1, or 0 if T < block_len)")


def _check_same_length(q, k):
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k must have the same length, got {q.shape[1]}, {k.shape[1]}")


def _check_nsa_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride,
                      select_block, n_select, window, k_win=None, v_win=None):
    """The checks of nsa_attention and nsa_attention_ref: q may be the last Tq <= T positions."""
    check_block_sizes(block_len, block_stride, select_block, n_select, window)
    B, Tq, HQ, H, D, T = _check_keys(q, k=k, v=v)
    _check_window_keys(q, k=k, k_win=k_win, v_win=v_win)
    if T < Tq:
        raise ValueError(f"k has {T} tokens, fewer than q's {Tq}")
    _check_keys(q, k_cmp=k_cmp, v_cmp=v_cmp)
    if k_cmp.shape[2] != H:
        raise ValueError(f"k_cmp has {k_cmp.shape[2]} heads, k has {H}: they must match")
    _check_compressed_keys(k_cmp, T, block_len, block_stride)
    _check_gates(q, "[B, T, HQ]", g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)


def _check_window_keys(q, **keys):
    """The window branch's own keys and values, by name after the keys they stand in for (k=,
    k_win=, v_win= or k_cache=, k_win_cache=, v_win_cache=): both None (the window uses the
    selected branch's), or both of the keys' shape."""
    (k_name, _), (kw_name, k_win), (vw_name, v_win) = keys.items()
    if (k_win is None) != (v_win is None):
        raise ValueError(f"{kw_name} and {vw_name} go together: pass both (the window branch's "
                         f"own keys and values) or neither (it uses {k_name} and its values)")
    if k_win is not None:
        _check_keys(q, **keys)


def _check_gates(q, shape, **gates):
    """Gates, by name: floating tensors [B, T, HQ] (shape names the form) on q's device."""
    B, Tq, HQ, _ = q.shape
    for name, g in gates.items():
        if tuple(g.shape) != (B, Tq, HQ):
            raise ValueError(f"{name} must be {shape} = [{B}, {Tq}, {HQ}], got "
                             f"{tuple(g.shape)}")
        if not g.is_floating_point() or g.device != q.device:
            raise ValueError(f"{name} must be a floating tensor on {q.device}, got {g.dtype} "
                             f"on {g.device}")


def _kernel_unsupported(q):
    """Why the kernels cannot take q's device, dtype or head dim (None if they can)."""
    if not (q.is_cuda or (_INTERPRET and q.device.type == "cpu")):
        return (f"the Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                f"set before importing nsa_kernels; got {q.device}")
    if q.dtype not in _KERNEL_DTYPES:
        return f"the kernels take float16, bfloat16 or float32, got {q.dtype}"
    if q.shape[-1] not in _KERNEL_HEAD_DIMS:
        return f"the kernels need head dim D in {_KERNEL_HEAD_DIMS}, got {q.shape[-1]}"
    return None


def _check_kernel_inputs(q, **keys):
    """_check_keys for the per-branch functions, which have no fallback: they also raise for
    inputs the kernels do not take."""
    shape = _check_keys(q, **keys)
    reason = _kernel_unsupported(q)
    if reason is not None:
        raise ValueError(reason)
    return shape


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


def selection_order(score, t, select_block):
    """The order the top-n takes over block scores [..., NB] of queries at positions t (a tensor
    that broadcasts against score's last two dims, e.g. [Tq, 1]): the forced blocks (block 0
    and the two local blocks) at +inf, blocks that start after t at -inf, the rest by score."""
    j = torch.arange(score.shape[-1], device=score.device)
    cur = t // select_block
    forced = (j == 0) | (j == cur) | (j == cur - 1)
    return score.masked_fill(forced, float("inf")).masked_fill(j * select_block > t, float("-inf"))


def select_blocks_ref(p_cmp, T, block_len, block_stride, select_block, n_select, q_start=0):
    """Selection as in the module docstring. p_cmp: [B, H, G, Tq, Tc] compressed-branch
    probabilities grouped by KV head; T: keys' length; queries at q_start ... q_start + Tq - 1.
    Returns (selected [B, H, Tq, NB] bool, score [B, H, Tq, NB]) with NB = ceil(T / l')."""
    B, H, G, Tq, Tc = p_cmp.shape
    n_blocks = (T + select_block - 1) // select_block
    w = overlap_weights(Tc, n_blocks, block_len, block_stride, select_block, p_cmp.device)
    score = p_cmp.sum(dim=2) @ w.to(p_cmp.dtype)                            # [B, H, Tq, NB]
    t = torch.arange(q_start, q_start + Tq, device=p_cmp.device)[:, None]
    order = selection_order(score, t, select_block)
    top = order.topk(min(n_select, n_blocks), dim=-1).indices
    eligible = order > float("-inf")
    selected = torch.zeros_like(eligible).scatter(-1, top, True) & eligible
    return selected, score


def nsa_attention_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=BLOCK_LEN,
                      block_stride=BLOCK_STRIDE, select_block=SELECT_BLOCK, n_select=N_SELECT,
                      window=WINDOW, scale=None, k_win=None, v_win=None):
    """Plain-PyTorch NSA; see the module docstring. q: [B, Tq, HQ, D] are the last Tq positions
    of k, v: [B, T, H, D]; k_cmp, v_cmp: [B, Tc, H, D]; g_*: [B, Tq, HQ] -> o: [B, Tq, HQ, D].
    k_win, v_win: [B, T, H, D], the window branch's own keys and values (default: k, v)."""
    _check_nsa_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride,
                      select_block, n_select, window, k_win, v_win)
    B, Tq, HQ, D = q.shape
    T, H = k.shape[1], k.shape[2]
    G = HQ // H
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

    def attend(k, v, mask):
        kh = k.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)
        vh = v.transpose(1, 2).to(dtype).repeat_interleave(G, dim=1)
        logits = (qh @ kh.transpose(-1, -2)) * scale                        # [B, HQ, Tq, T]
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ vh
    o_slc = attend(k, v, slc_mask)
    o_win = attend(k if k_win is None else k_win, v if v_win is None else v_win, win_mask)

    def gate(g):
        return g.transpose(1, 2).to(dtype)[..., None]                      # [B, HQ, Tq, 1]
    o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_win) * o_win
    return o.transpose(1, 2).to(q.dtype)


@torch.compiler.disable  # a torch.compile'd model runs the kernels as they are (graph break)
def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=BLOCK_LEN,
                  block_stride=BLOCK_STRIDE, select_block=SELECT_BLOCK, n_select=N_SELECT,
                  window=WINDOW, scale=None, k_win=None, v_win=None):
    """NSA forward with autograd. Same arguments, shapes and semantics as nsa_attention_ref:
    q: [B, Tq, HQ, D], k, v: [B, T, H, D], k_cmp, v_cmp: [B, Tc, H, D], g_*: [B, Tq, HQ],
    k_win, v_win: None or [B, T, H, D] (the window branch's own keys and values).
    Runs the kernels when Tq == T and they take the inputs, else the reference."""
    _check_nsa_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len, block_stride,
                      select_block, n_select, window, k_win, v_win)
    if q.shape[1] == k.shape[1]:   # decoding (queries shorter than keys) is the reference's
        reason = _kernel_unsupported(q)
        if reason is None:
            return _NSAFunction.apply(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, k_win, v_win,
                                      block_len, block_stride, select_block, n_select, window,
                                      _default_scale(q, scale))
        if q.is_cuda:
            _warn_once(f"nsa_attention: {reason}; using the (slow, O(T^2) memory) PyTorch "
                       f"reference")
    return nsa_attention_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len=block_len,
                             block_stride=block_stride, select_block=select_block,
                             n_select=n_select, window=window, scale=scale, k_win=k_win,
                             v_win=v_win)


# ----------------------------------------------------------------------------------------------
# Triton kernels (training: forward and backward of every branch, top-n selection in-kernel).
#
# Layout: q, o: [B, T, HQ, D] and k, v: [B, T, H, D] (k_cmp, v_cmp: [B, Tc, H, D]), contiguous.
# The G = HQ // H query heads of KV head h are the contiguous heads h*G .. h*G + G - 1, so a tile
# of "rows" is a set of (position t, head g) pairs that share one KV head: every key/value tile
# is loaded once for all G heads (the group-centric loading of the paper's §3.4).
# Logits are kept in the base-2 domain (s2 = q.k * scale * log2(e)); every saved log-sum-exp
# `lse` is log2(sum 2^s2) and is +inf for a row that sees no key (its output is 0).

_LOG2E = 1.4426950408889634
_NO_WINDOW = 1 << 30        # "window" of the compressed branch: every earlier block is visible


# Pieces shared by the dense (compressed, window) and the selected-branch kernels, as the
# Triton tutorial's _attn_fwd_inner. Each kernel loads its tiles and computes the logits
# b_s = q.k * scale * log2(e) itself; the _step helpers take it from there, with the mask m_s
# of the (row, key) pairs that attend. (The interpreter pays ~0.2 ms per helper call, about as
# much as a tile load, so the per-block loops load their key tiles themselves.)

@triton.jit
def _load_bwd_rows(q, do, lse, delta, p_row, m_row, D: tl.constexpr):
    """The query side of a backward tile: q, do [rows, D] and lse, delta [rows]."""
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    b_do = tl.load(do + p_row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    b_lse = tl.load(lse + p_row, mask=m_row, other=float("inf"))
    b_delta = tl.load(delta + p_row, mask=m_row, other=0.)
    return b_q, b_do, b_lse, b_delta


@triton.jit
def _query_rows(t0, t_end, i_b, i_h, T, HQ, G, BT, BM: tl.constexpr):
    """The BM rows of a dense tile: positions t0 .. t0 + BT - 1 (those < t_end) x the G heads
    of KV head i_h. Returns the positions t, the row mask and the row ids into [B*T*HQ]."""
    o_r = tl.arange(0, BM)
    t = t0 + o_r // G                                                         # [BM]
    m_r = (o_r < BT * G) & (t < t_end)
    p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)
    return t, m_r, p_row


@triton.jit
def _key_range(t_lo, BT, T, TK, KSTRIDE, KOFF, W):
    """Keys i visible to some position of the tile t_lo .. t_lo + BT - 1: [i_start, i_end)."""
    t_hi = tl.minimum(t_lo + BT, T) - 1
    # division is C-style, so keep numerators >= 0
    i_start = tl.maximum(t_lo - W - KOFF + KSTRIDE, 0) // KSTRIDE
    i_end = tl.minimum(tl.maximum(t_hi - KOFF + KSTRIDE, 0) // KSTRIDE, TK)
    return i_start, i_end


@triton.jit
def _softmax_step(b_s, m_s, b_v, b_m, b_l, b_acc, MASKED: tl.constexpr):
    """Online softmax over one key tile: fold the logits b_s [rows, keys] (where m_s if MASKED,
    else all of them), and the values b_v [keys, D], into the running max b_m, sum b_l and
    unnormalised output b_acc."""
    if MASKED:
        b_s = tl.where(m_s, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # a row with nothing visible yet keeps m = -inf; subtract 0 instead to avoid inf - inf
    b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
    b_p = tl.exp2(b_s - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    return b_m_new, b_l, b_acc


@triton.jit
def _store_attention(o, lse, p_row, m_row, b_m, b_l, b_acc, D: tl.constexpr):
    """o = b_acc / b_l and lse = b_m + log2(b_l); 0 and +inf for rows that saw no key."""
    b_l_safe = tl.where(b_l > 0, b_l, 1.)
    b_o = (b_acc / b_l_safe[:, None]).to(o.dtype.element_ty)
    o_d = tl.arange(0, D)
    tl.store(o + p_row[:, None] * D + o_d[None, :], b_o, mask=m_row[:, None])
    tl.store(lse + p_row, tl.where(b_l > 0, b_m + tl.log2(b_l_safe), float("inf")), mask=m_row)


@triton.jit
def _dq_step(b_dq, b_s, m_s, b_lse, b_do, b_delta, b_k, b_v, MASKED: tl.constexpr):
    """dq += dS k over one key tile: P = 2^(s - lse) from the saved lse (0 outside m_s if
    MASKED), dS = P * (do v^T - delta) with delta = rowsum(do * o)."""
    b_p = tl.exp2(b_s - b_lse[:, None])                                       # [rows, keys]
    if MASKED:
        b_p = tl.where(m_s, b_p, 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    return b_dq


@triton.jit
def _store_dq(dq, dq_out, b_dq, p_row, m_row, scale, ACCUM: tl.constexpr, D: tl.constexpr):
    """dq_out = b_dq * scale, plus what earlier branches wrote to the fp32 dq if ACCUM. dq_out
    is dq itself, or (for the last branch) the gradient in q's dtype, which saves a pass."""
    b_dq = b_dq * scale
    o_dq = p_row[:, None] * D + tl.arange(0, D)[None, :]
    if ACCUM:
        b_dq += tl.load(dq + o_dq, mask=m_row[:, None], other=0.)
    tl.store(dq_out + o_dq, b_dq.to(dq_out.dtype.element_ty), mask=m_row[:, None])


@triton.jit
def _dkdv_step(b_dk, b_dv, b_s, m_s, b_q, b_do, b_lse, b_delta, b_v, MASKED: tl.constexpr):
    """dv += P^T do and dk += dS^T q (unscaled) over one tile of query rows; P and dS as in
    _dq_step. Also returns dS [rows, keys] (in q's dtype)."""
    b_p = tl.exp2(b_s - b_lse[:, None])                                       # [rows, keys]
    if MASKED:
        b_p = tl.where(m_s, b_p, 0.)
    b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_q.dtype)
    b_dk += tl.dot(tl.trans(b_ds), b_q)
    return b_dk, b_dv, b_ds


# The dense kernels split their loops: the tiles visible to every row of the other side (all
# but the one or two at each edge of the causal or window band) run without the element masks.

@triton.jit
def _full_key_tiles(t_lo, BT, T, i_start, i_end, KSTRIDE, KOFF, W, BN: tl.constexpr):
    """The key tiles i_start + k*BN, k < n_tiles, of the query tile t_lo .. t_lo + BT - 1:
    those with k_lo <= k < k_hi exist whole and every position of the query tile sees all of
    their keys (KOFF + i*KSTRIDE in (t - W, t])."""
    t_hi = tl.minimum(t_lo + BT, T) - 1
    n_tiles = tl.maximum(i_end - i_start + BN - 1, 0) // BN
    # the first key that t_hi still sees: KOFF + i*KSTRIDE > t_hi - W (division is C-style,
    # so numerators stay >= 0)
    i_seen = (tl.maximum(t_hi - W - KOFF + 1, 0) + KSTRIDE - 1) // KSTRIDE
    # the keys that t_lo already sees: KOFF + i*KSTRIDE <= t_lo, and that exist
    n_seen = tl.minimum(tl.maximum(t_lo - KOFF + KSTRIDE, 0) // KSTRIDE, i_end)
    k_lo = tl.minimum((tl.maximum(i_seen - i_start, 0) + BN - 1) // BN, n_tiles)
    k_hi = tl.maximum(tl.minimum(tl.maximum(n_seen - i_start, 0) // BN, n_tiles), k_lo)
    return k_lo, k_hi, n_tiles


@triton.jit
def _band_mask(m_k, pos, t, W):
    """Which rows (positions t [rows]) see which keys (at positions pos [keys], existing where
    m_k): pos in (t - W, t]."""
    return m_k[None, :] & (pos[None, :] <= t[:, None]) & (pos[None, :] > t[:, None] - W)


@triton.jit
def _dense_keys(k, v, i0, i_end, t, i_b, i_h, TK, H, KSTRIDE, KOFF, W, MASKED: tl.constexpr,
                D: tl.constexpr, BN: tl.constexpr):
    """K, V [BN, D] of keys i0 .. i0 + BN - 1 and, if MASKED, which rows see which of them
    [rows, BN] (keys past i_end are zeros); else every key exists and every row sees it."""
    o_i = i0 + tl.arange(0, BN)                                               # [BN]
    p_kv = ((i_b * TK + o_i).to(tl.int64) * H + i_h)[:, None] * D + tl.arange(0, D)[None, :]
    if MASKED:
        m_k = o_i < i_end
        b_k = tl.load(k + p_kv, mask=m_k[:, None], other=0.)
        b_v = tl.load(v + p_kv, mask=m_k[:, None], other=0.)
        m_s = _band_mask(m_k, KOFF + o_i * KSTRIDE, t, W)
    else:
        b_k = tl.load(k + p_kv)
        b_v = tl.load(v + p_kv)
        m_s = 0
    return b_k, b_v, m_s


@triton.jit
def _dense_fwd_tile(b_q, k, v, i0, i_end, t, i_b, i_h, TK, H, scale_log2, KSTRIDE, KOFF, W,
                    b_m, b_l, b_acc, MASKED: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):
    b_k, b_v, m_s = _dense_keys(k, v, i0, i_end, t, i_b, i_h, TK, H, KSTRIDE, KOFF, W, MASKED,
                                D, BN)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                            # [BM, BN]
    return _softmax_step(b_s, m_s, b_v, b_m, b_l, b_acc, MASKED)


@triton.jit
def _dense_fwd_kernel(q, k, v, o, lse, T, TK, G, BT, HQ, H, scale_log2, KSTRIDE, KOFF, W,
                      D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Causal attention of BT positions x G heads (BM rows) over keys i whose position
    KOFF + i*KSTRIDE lies in (t - W, t]. Compressed branch: KSTRIDE=d, KOFF=l-1 (block i
    ends at i*d + l - 1), W unbounded; window branch: KSTRIDE=1, KOFF=0, W=w."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t, m_r, p_row = _query_rows(i_t * BT, T, i_b, i_h, T, HQ, G, BT, BM)
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)  # [BM, D]
    i_start, i_end = _key_range(i_t * BT, BT, T, TK, KSTRIDE, KOFF, W)
    k_lo, k_hi, n_tiles = _full_key_tiles(i_t * BT, BT, T, i_start, i_end, KSTRIDE, KOFF, W, BN)
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, D], tl.float32)
    for i_k in range(0, k_lo):
        b_m, b_l, b_acc = _dense_fwd_tile(b_q, k, v, i_start + i_k * BN, i_end, t, i_b, i_h, TK,
                                          H, scale_log2, KSTRIDE, KOFF, W, b_m, b_l, b_acc, True,
                                          D, BN)
    for i_k in range(k_lo, k_hi):
        b_m, b_l, b_acc = _dense_fwd_tile(b_q, k, v, i_start + i_k * BN, i_end, t, i_b, i_h, TK,
                                          H, scale_log2, KSTRIDE, KOFF, W, b_m, b_l, b_acc,
                                          False, D, BN)
    for i_k in range(k_hi, n_tiles):
        b_m, b_l, b_acc = _dense_fwd_tile(b_q, k, v, i_start + i_k * BN, i_end, t, i_b, i_h, TK,
                                          H, scale_log2, KSTRIDE, KOFF, W, b_m, b_l, b_acc, True,
                                          D, BN)
    _store_attention(o, lse, p_row, m_r, b_m, b_l, b_acc, D)


@triton.jit
def _dense_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, k, v, i0, i_end, t, i_b, i_h, TK, H,
                   scale_log2, KSTRIDE, KOFF, W, MASKED: tl.constexpr, D: tl.constexpr,
                   BN: tl.constexpr):
    b_k, b_v, m_s = _dense_keys(k, v, i0, i_end, t, i_b, i_h, TK, H, KSTRIDE, KOFF, W, MASKED,
                                D, BN)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                            # [BM, BN]
    return _dq_step(b_dq, b_s, m_s, b_lse, b_do, b_delta, b_k, b_v, MASKED)


@triton.jit
def _dense_bwd_dq_kernel(q, k, v, do, lse, delta, dq, T, TK, G, BT, HQ, H, scale_log2, scale,
                         KSTRIDE, KOFF, W, ACCUM: tl.constexpr,
                         D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dq of _dense_fwd_kernel's attention; same tiling. dq is fp32 and owned by this program's
    rows (no atomics); ACCUM adds to what an earlier branch wrote there."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t, m_r, p_row = _query_rows(i_t * BT, T, i_b, i_h, T, HQ, G, BT, BM)
    b_q, b_do, b_lse, b_delta = _load_bwd_rows(q, do, lse, delta, p_row, m_r, D)
    i_start, i_end = _key_range(i_t * BT, BT, T, TK, KSTRIDE, KOFF, W)
    k_lo, k_hi, n_tiles = _full_key_tiles(i_t * BT, BT, T, i_start, i_end, KSTRIDE, KOFF, W, BN)
    b_dq = tl.zeros([BM, D], tl.float32)
    for i_k in range(0, k_lo):
        b_dq = _dense_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, k, v, i_start + i_k * BN, i_end,
                              t, i_b, i_h, TK, H, scale_log2, KSTRIDE, KOFF, W, True, D, BN)
    for i_k in range(k_lo, k_hi):
        b_dq = _dense_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, k, v, i_start + i_k * BN, i_end,
                              t, i_b, i_h, TK, H, scale_log2, KSTRIDE, KOFF, W, False, D, BN)
    for i_k in range(k_hi, n_tiles):
        b_dq = _dense_dq_tile(b_dq, b_q, b_do, b_lse, b_delta, k, v, i_start + i_k * BN, i_end,
                              t, i_b, i_h, TK, H, scale_log2, KSTRIDE, KOFF, W, True, D, BN)
    _store_dq(dq, dq, b_dq, p_row, m_r, scale, ACCUM, D)


@triton.jit
def _dense_dkdv_tile(b_dk, b_dv, b_k, b_v, m_k, pos, q, do, lse, delta, t0, t_end, i_b, i_h, T,
                     HQ, G, BT, scale_log2, W, MASKED: tl.constexpr, D: tl.constexpr,
                     BM: tl.constexpr):
    t, m_r, p_row = _query_rows(t0, t_end, i_b, i_h, T, HQ, G, BT, BM)
    # rows outside the slice load q = do = 0 and lse = +inf: P = 0, whatever the mask
    b_q, b_do, b_lse, b_delta = _load_bwd_rows(q, do, lse, delta, p_row, m_r, D)
    if MASKED:
        m_s = _band_mask(m_k, pos, t, W)
    else:
        m_s = 0
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                            # [BM, BN]
    b_dk, b_dv, _ = _dkdv_step(b_dk, b_dv, b_s, m_s, b_q, b_do, b_lse, b_delta, b_v, MASKED)
    return b_dk, b_dv


@triton.jit
def _dense_bwd_dkdv_kernel(q, k, v, do, lse, delta, dk, dv, T, TK, G, BT, HQ, H, scale_log2,
                           scale, KSTRIDE, KOFF, W, SLICE, ATOMIC: tl.constexpr,
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
    pos_first = KOFF + i_k * BN * KSTRIDE
    pos_last = KOFF + (tl.minimum(i_k * BN + BN, TK) - 1) * KSTRIDE
    t_beg = tl.maximum(pos_first, i_sp * SLICE)
    t_end = tl.minimum(tl.minimum(pos_last + W, T), i_sp * SLICE + SLICE)
    # query tiles t_beg + j*BT that see every key of this (whole) tile: j_lo <= j < j_hi
    n_tiles = tl.maximum(t_end - t_beg + BT - 1, 0) // BT
    j_lo = tl.minimum((tl.maximum(pos_last - t_beg, 0) + BT - 1) // BT, n_tiles)
    j_hi = tl.maximum(tl.minimum(tl.maximum(pos_first + W - t_beg, 0) // BT, n_tiles), j_lo)
    j_hi = tl.where(i_k * BN + BN <= TK, j_hi, j_lo)
    b_dk = tl.zeros([BN, D], tl.float32)
    b_dv = tl.zeros([BN, D], tl.float32)
    for j in range(0, j_lo):
        b_dk, b_dv = _dense_dkdv_tile(b_dk, b_dv, b_k, b_v, m_k, pos, q, do, lse, delta,
                                      t_beg + j * BT, t_end, i_b, i_h, T, HQ, G, BT, scale_log2,
                                      W, True, D, BM)
    for j in range(j_lo, j_hi):
        b_dk, b_dv = _dense_dkdv_tile(b_dk, b_dv, b_k, b_v, m_k, pos, q, do, lse, delta,
                                      t_beg + j * BT, t_end, i_b, i_h, T, HQ, G, BT, scale_log2,
                                      W, False, D, BM)
    for j in range(j_hi, n_tiles):
        b_dk, b_dv = _dense_dkdv_tile(b_dk, b_dv, b_k, b_v, m_k, pos, q, do, lse, delta,
                                      t_beg + j * BT, t_end, i_b, i_h, T, HQ, G, BT, scale_log2,
                                      W, True, D, BM)
    p_out = p_key[:, None] * D + o_d[None, :]
    if ATOMIC:
        m_out = m_k[:, None] & (t_beg < t_end)
        tl.atomic_add(dk + p_out, b_dk * scale, mask=m_out)
        tl.atomic_add(dv + p_out, b_dv, mask=m_out)
    else:
        tl.store(dk + p_out, b_dk * scale, mask=m_k[:, None])
        tl.store(dv + p_out, b_dv, mask=m_k[:, None])


# Top-n selection keeps a running top-n per position in registers. A candidate is one int64
# key: the fp32 score's bits (non-negative, so they order like the score; +inf for the forced
# blocks) above the block index, so ties go to the larger block; ineligible blocks are -2^62.
# Each chunk's candidates are merged into it by bitonic networks.

@triton.jit
def _slot_bit(N_DIMS: tl.constexpr, i: tl.constexpr):
    """Bit i of the slot index on a [2] * N_DIMS hypercube (slot bits are the innermost axes)."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - 1 - i) + [2] + [1] * i)


@triton.jit
def _compare_swap(b_x, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """One layer of a bitonic network on slot bit i: pairs of slots that differ in bit i are
    ordered ascending where flip is 0 and descending where it is 1. The partner of each
    element is the pair's sum minus itself (int64 wrap-around cancels): no gather needed."""
    b_y = tl.sum(b_x, N_DIMS - 1 - i, keep_dims=True) - b_x
    return tl.where((b_x > b_y) != (flip ^ _slot_bit(N_DIMS, i)), b_y, b_x)


@triton.jit
def _bitonic_sort(b_x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr):
    """Sorts the rows of b_x [2^LOG_ROWS, 2^LOG_N] (int64 keys); DESCENDING is 0 or 1."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_N
    b_h = tl.reshape(b_x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            flip = _slot_bit(N_DIMS, stage)       # alternate runs of 2^stage: a bitonic input
        else:
            flip = DESCENDING
        for i in tl.static_range(stage):
            b_h = _compare_swap(b_h, flip, stage - 1 - i, N_DIMS)
    return tl.reshape(b_h, b_x.shape)


@triton.jit
def _bitonic_merge_desc(b_x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr):
    """Sorts rows of b_x that are bitonic (rise then fall, or fall then rise) descending."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_N
    b_h = tl.reshape(b_x, [2] * N_DIMS)
    for i in tl.static_range(LOG_N):
        b_h = _compare_swap(b_h, 1, LOG_N - 1 - i, N_DIMS)
    return tl.reshape(b_h, b_x.shape)


@triton.jit
def _merge_top(b_top, b_key, BT: tl.constexpr, K: tl.constexpr, NS: tl.constexpr,
               LOG_BT: tl.constexpr, LOG_K: tl.constexpr, LOG_NS: tl.constexpr):
    """The top NS of the running top b_top [BT, NS] (sorted descending) and a chunk's keys
    b_key [BT, K >= NS], by bitonic networks. Most chunks far from the diagonal bring nothing
    above a row's NS-th best: then nothing runs."""
    b_min = tl.min(b_top, 1)                                                  # [BT]
    if tl.max((tl.max(b_key, 1) > b_min).to(tl.int32), 0) > 0:
        b_cand = _bitonic_sort(b_key, LOG_BT, LOG_K, 0)                       # ascending
        # the largest NS of an ascending row are its last NS slots, and the elementwise
        # maximum over the [K / NS, NS] split picks exactly those
        b_cand = tl.max(tl.reshape(b_cand, [BT, K // NS, NS]), 1)             # [BT, NS]
        # descending top vs ascending candidates: the elementwise maximum is the top NS of the
        # union, as a bitonic sequence (the first layer of Batcher's merge)
        b_top = _bitonic_merge_desc(tl.maximum(b_top, b_cand), LOG_BT, LOG_NS)
    return b_top


@triton.jit
def _chunk_keys(k_cmp, b_q, b_lse, b_w, t_row, o_tt, j0, i_b, i_h, TC, H, scale_log2,
                MASKED: tl.constexpr, CBLK: tl.constexpr, CSTRIDE: tl.constexpr,
                SBLK: tl.constexpr, BJ: tl.constexpr, D: tl.constexpr, BT: tl.constexpr,
                BG: tl.constexpr, BC: tl.constexpr, K: tl.constexpr):
    """Keys [BT, K] of selection blocks j0 .. j0 + BJ - 1 for the tile's positions o_tt [BT]
    (rows: t_row [BM]). MASKED: the chunk may hold compressed blocks that some position does
    not see yet, or that do not exist."""
    R: tl.constexpr = SBLK // CSTRIDE
    M1: tl.constexpr = CBLK // CSTRIDE - 1
    o_c = tl.arange(0, BC)
    o_ci = j0 * R - M1 + o_c                                                  # [BC] cmp block ids
    o_d = tl.arange(0, D)
    p_kc = k_cmp + ((i_b * TC + o_ci).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
    if MASKED:
        m_c = (o_ci >= 0) & (o_ci < TC)
        b_kc = tl.load(p_kc, mask=m_c[:, None], other=0.)
    else:
        b_kc = tl.load(p_kc)
    b_s = tl.dot(b_q, tl.trans(b_kc))                                         # [BM, BC]
    b_p = tl.exp2(b_s * scale_log2 - b_lse[:, None])         # padded rows: lse = +inf -> 0
    if MASKED:
        m_s = m_c[None, :] & ((o_ci * CSTRIDE + CBLK - 1)[None, :] <= t_row[:, None])
        b_p = tl.where(m_s, b_p, 0.)
    # sum the G heads before the overlap weighting (G times less weighting work)
    b_ps = tl.sum(tl.reshape(b_p, [BT, BG, BC]), 1)                           # [BT, BC]
    # overlap weights in full fp32 (small integers times probabilities); no -0.0 bits
    b_sc = tl.dot(b_ps, b_w, input_precision="ieee") + 0.                     # [BT, K]
    o_k = tl.arange(0, K)
    o_jj = j0 + o_k                                                           # [K]
    cur = o_tt // SBLK                                                        # [BT]
    m_elig = (o_k[None, :] < BJ) & (o_jj[None, :] * SBLK <= o_tt[:, None])
    m_forced = ((o_jj[None, :] == 0) | (o_jj[None, :] == cur[:, None])
                | (o_jj[None, :] == cur[:, None] - 1))
    b_sc = tl.where(m_forced, float("inf"), b_sc)
    b_key = (b_sc.to(tl.int32, bitcast=True).to(tl.int64) << 32) | o_jj[None, :].to(tl.int64)
    return tl.where(m_elig, b_key, -(1 << 62))


@triton.jit
def _select_kernel(q, k_cmp, lse, idx, T, TC, G, HQ, H, scale_log2, NSEL: tl.constexpr,
                   CBLK: tl.constexpr, CSTRIDE: tl.constexpr, SBLK: tl.constexpr,
                   BJ: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BG: tl.constexpr,
                   BC: tl.constexpr, K: tl.constexpr, NS: tl.constexpr, LOG_BT: tl.constexpr,
                   LOG_K: tl.constexpr, LOG_NS: tl.constexpr):
    """Top-n selection blocks of BT positions of one KV head: the tile's BM = BT*BG rows are
    the G heads of each position (row r: position r // BG, head r % BG; heads padded to
    BG = next_pow2(G)), so each chunk of compressed keys is one tensor-core product for all of
    them. Chunk by chunk over the compressed blocks (BJ selection blocks at a time; chunks start
    on selection-block boundaries, so the [BC, K] overlap-weight matrix is the same for every
    chunk): recompute p_cmp = 2^(s2 - lse), sum the G heads, weight onto selection blocks,
    merge into the running top NS = next_pow2(n). Only [B, T, H, n] indices leave the kernel."""
    BM: tl.constexpr = BT * BG
    M1: tl.constexpr = CBLK // CSTRIDE - 1
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t_lo = i_t * BT
    o_m = tl.arange(0, BM)
    t_row, g_row = t_lo + o_m // BG, o_m % BG                                 # [BM]
    m_row = (g_row < G) & (t_row < T)
    p_row = (i_b * T + t_row).to(tl.int64) * HQ + i_h * G + g_row
    o_d = tl.arange(0, D)
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_row[:, None], other=0.)
    b_lse = tl.load(lse + p_row, mask=m_row, other=float("inf"))              # [BM]
    o_tt = t_lo + tl.arange(0, BT)                                            # [BT] positions

    # overlap weights: chunk row c is compressed block j0*R - M1 + c, column jj is selection
    # block j0 + jj (R = l'/d strides per selection block, M1 = l/d - 1 blocks reaching back
    # into the previous selection block)
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, K)
    c_start = (o_c - M1) * CSTRIDE                                            # [BC]
    j_start = o_k * SBLK                                                      # [K]
    b_w = (tl.minimum(c_start[:, None] + CBLK, j_start[None, :] + SBLK)
           - tl.maximum(c_start[:, None], j_start[None, :]))
    b_w = tl.where(o_k[None, :] < BJ, tl.maximum(b_w, 0).to(tl.float32) / CSTRIDE, 0.)  # [BC, K]

    # chunks 0 .. n_chunk - 1 hold the tile's eligible blocks. Chunk i_c is full (every block
    # exists and every position of the tile sees it: no masks, pipelined loads) iff its last
    # block (i_c*BJ*R - M1 + BC - 1) ends at or before t_lo; chunks FULL_LO .. full_hi - 1 are
    # (all but the last one or two far from the start). Chunk 0 reaches back to block -M1.
    t_hi = tl.minimum(t_lo + BT, T) - 1
    n_chunk = t_hi // SBLK // BJ + 1
    FULL_LO: tl.constexpr = 1 if M1 > 0 else 0
    room = t_lo - CBLK + 1 - (BC - 1 - M1) * CSTRIDE        # full iff i_c*BJ*l' <= room
    full_hi = tl.maximum(tl.maximum(room + BJ * SBLK, 0) // (BJ * SBLK), FULL_LO)
    o_s = tl.arange(0, NS)
    # sorted descending: the forced blocks (score +inf) lead, empty slots (-2^62) come last
    b_top = tl.full([BT, NS], -(1 << 62), tl.int64)
    for i_c in range(FULL_LO, full_hi):
        b_key = _chunk_keys(k_cmp, b_q, b_lse, b_w, t_row, o_tt, i_c * BJ, i_b, i_h, TC, H,
                            scale_log2, False, CBLK, CSTRIDE, SBLK, BJ, D, BT, BG, BC, K)
        b_top = _merge_top(b_top, b_key, BT, K, NS, LOG_BT, LOG_K, LOG_NS)
    for i_m in range(0, FULL_LO + n_chunk - full_hi):
        i_c = tl.where(i_m < FULL_LO, i_m, i_m - FULL_LO + full_hi)
        b_key = _chunk_keys(k_cmp, b_q, b_lse, b_w, t_row, o_tt, i_c * BJ, i_b, i_h, TC, H,
                            scale_log2, True, CBLK, CSTRIDE, SBLK, BJ, D, BT, BG, BC, K)
        b_top = _merge_top(b_top, b_key, BT, K, NS, LOG_BT, LOG_K, LOG_NS)
    b_idx = tl.where(b_top >= 0, b_top.to(tl.int32), -1)            # low 32 bits: the block
    p_idx = ((i_b * T + o_tt).to(tl.int64) * H + i_h) * NSEL
    tl.store(idx + p_idx[:, None] + o_s[None, :], b_idx,
             mask=(o_tt[:, None] < T) & (o_s[None, :] < NSEL))


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
        b_m, b_l, b_acc = _softmax_step(b_s, m_k[None, :], b_v, b_m, b_l, b_acc, True)
    _store_attention(o, lse, p_row, m_g, b_m, b_l, b_acc, D)


# The selected branch in key-block order (small-G forward, dk/dv): each program takes one
# segment of the inverted selection (_invert_selection), the positions that chose one block.

@triton.jit
def _segment_block(k, v, seg_bin, seg_start, seg_end, T, H, NB, SBLK: tl.constexpr,
                   BS: tl.constexpr, D: tl.constexpr):
    """This program's segment: batch, KV head, block j, its range [start, end) in q_list, and
    the block's token positions, mask, row ids and K, V tiles [BS, D]."""
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
    b_k = tl.load(k + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
    b_v = tl.load(v + p_key[:, None] * D + o_d[None, :], mask=m_k[:, None], other=0.)
    return i_b, i_h, j, start, end, pos, m_k, p_key, b_k, b_v


@triton.jit
def _segment_rows(q_list, c0, end, i_b, i_h, T, HQ, G, BQ, BM: tl.constexpr):
    """The BM rows of one chunk of a segment: the positions q_list[c0 .. c0 + BQ - 1] (those
    before end) x the G heads of KV head i_h. Returns positions, row mask, row ids."""
    o_r = tl.arange(0, BM)
    o_q = c0 + o_r // G
    m_r = (o_r < BQ * G) & (o_q < end)
    t = tl.load(q_list + o_q, mask=m_r, other=0)                              # [BM] positions
    p_row = ((i_b * T + t).to(tl.int64) * HQ + i_h * G + o_r % G)
    return t, m_r, p_row


@triton.jit
def _block_slot(idx, i_b, i_h, t, j, m_r, T, H, NSEL, NS: tl.constexpr):
    """The slot (0 .. n-1) where the selection of each position t lists block j: where a row
    writes its piece of the block."""
    o_n = tl.arange(0, NS)
    p_sel = ((i_b * T + t).to(tl.int64) * H + i_h) * NSEL
    b_sel = tl.load(idx + p_sel[:, None] + o_n[None, :],
                    mask=m_r[:, None] & (o_n[None, :] < NSEL), other=-1)       # [BM, NS]
    return tl.sum(tl.where(b_sel == j, o_n[None, :], 0), 1)                   # listed once


@triton.jit
def _slc_fwd_blocks_kernel(q, k, v, idx, o_part, lse_part, q_list, seg_bin, seg_start, seg_end,
                           T, G, BQ, HQ, H, NB, NSEL, scale_log2, SBLK: tl.constexpr,
                           BS: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                           NS: tl.constexpr):
    """Selected attention in key-block order (small G; FSA, arXiv 2508.18224): one selection
    block against one segment of the positions that selected it (the inverted selection, as in
    the dk/dv backward), BQ positions x G heads stacked as the BM rows of one matmul, so that
    the block is loaded once per BQ positions instead of once per position. Each row's softmax
    over this block alone goes to the row's slot of the block (where idx lists it): the
    normalised output in o_part and its base-2 lse in lse_part; _slc_merge_kernel combines a
    row's slots."""
    i_b, i_h, j, start, end, pos, m_k, p_key, b_k, b_v = _segment_block(
        k, v, seg_bin, seg_start, seg_end, T, H, NB, SBLK, BS, D)
    o_d = tl.arange(0, D)
    for c0 in range(start, end, BQ):
        t, m_r, p_row = _segment_rows(q_list, c0, end, i_b, i_h, T, HQ, G, BQ, BM)
        b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BM, BS]
        # the block starts at or before t (it is eligible), so every live row sees a key
        b_s = tl.where(m_r[:, None] & m_k[None, :] & (pos[None, :] <= t[:, None]), b_s,
                       float("-inf"))
        b_m = tl.where(m_r, tl.max(b_s, 1), 0.)
        b_p = tl.exp2(b_s - b_m[:, None])
        b_l = tl.where(m_r, tl.sum(b_p, 1), 1.)
        b_o = tl.dot(b_p.to(b_v.dtype), b_v) / b_l[:, None]                   # [BM, D]
        p_part = p_row * NSEL + _block_slot(idx, i_b, i_h, t, j, m_r, T, H, NSEL, NS)
        tl.store(o_part + p_part[:, None] * D + o_d[None, :], b_o.to(o_part.dtype.element_ty),
                 mask=m_r[:, None])
        tl.store(lse_part + p_part, b_m + tl.log2(b_l), mask=m_r)


@triton.jit
def _slc_merge_kernel(o_part, lse_part, o, lse, T, G, HQ, H, NSEL, SBLK: tl.constexpr,
                      D: tl.constexpr, BG: tl.constexpr):
    """o, lse of the selected branch for one position and KV head from the per-block pieces of
    _slc_fwd_blocks_kernel: o = sum over slots of 2^(lse_slot - lse) * o_slot."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g               # [BG]
    o_d = tl.arange(0, D)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, D], tl.float32)
    # the eligible slots are the first min(n, t // l' + 1), each written by one block program
    for i_n in range(tl.minimum(NSEL, i_t // SBLK + 1)):
        p_part = p_row * NSEL + i_n
        b_lse = tl.load(lse_part + p_part, mask=m_g, other=0.)
        b_o = tl.load(o_part + p_part[:, None] * D + o_d[None, :], mask=m_g[:, None], other=0.)
        b_m_new = tl.maximum(b_m, b_lse)
        b_alpha = tl.exp2(b_m - b_m_new)
        b_w = tl.exp2(b_lse - b_m_new)
        b_l = b_l * b_alpha + b_w
        b_acc = b_acc * b_alpha[:, None] + b_w[:, None] * b_o.to(tl.float32)
        b_m = b_m_new
    _store_attention(o, lse, p_row, m_g, b_m, b_l, b_acc, D)


@triton.jit
def _slc_bwd_dq_kernel(q, k, v, idx, do, lse, delta, dq, dq_out, T, G, HQ, H, scale_log2, scale,
                       NSEL, ACCUM: tl.constexpr, SBLK: tl.constexpr, BS: tl.constexpr,
                       D: tl.constexpr, BG: tl.constexpr):
    """dq of the selected branch; one program per (position, KV head) as in the forward, so
    every dq row has one writer and needs no atomics."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_row = (i_b * T + i_t).to(tl.int64) * HQ + i_h * G + o_g
    o_d = tl.arange(0, D)
    b_q, b_do, b_lse, b_delta = _load_bwd_rows(q, do, lse, delta, p_row, m_g, D)
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
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BG, BS]
        b_dq = _dq_step(b_dq, b_s, m_k[None, :], b_lse, b_do, b_delta, b_k, b_v, True)
    _store_dq(dq, dq_out, b_dq, p_row, m_g, scale, ACCUM, D)


@triton.jit
def _slc_bwd_dkdv_kernel(q, k, v, idx, do, lse, delta, dq_part, dk, dv, q_list, seg_bin,
                         seg_start, seg_end, T, G, BQ, HQ, H, NB, NSEL, scale_log2, scale,
                         DQ_PIECES: tl.constexpr, SBLK: tl.constexpr, BS: tl.constexpr,
                         D: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr):
    """dk, dv of one selection block from one segment of the queries that selected it (the
    inverted selection, q_list, holds the positions grouped by block). Each chunk stacks BQ
    positions x G heads as BM rows of one matmul; segments of a block meet by atomic adds.
    DQ_PIECES: each chunk's dS also gives its rows' share of dq, dS k, stored as the row's piece
    for this block (at its slot, as the forward's pieces) for _slc_dq_merge_kernel to sum, in
    place of _slc_bwd_dq_kernel (which loads the n blocks of every position again)."""
    i_b, i_h, j, start, end, pos, m_k, p_key, b_k, b_v = _segment_block(
        k, v, seg_bin, seg_start, seg_end, T, H, NB, SBLK, BS, D)
    o_d = tl.arange(0, D)
    b_dk = tl.zeros([BS, D], tl.float32)
    b_dv = tl.zeros([BS, D], tl.float32)
    for c0 in range(start, end, BQ):
        t, m_r, p_row = _segment_rows(q_list, c0, end, i_b, i_h, T, HQ, G, BQ, BM)
        b_q, b_do, b_lse, b_delta = _load_bwd_rows(q, do, lse, delta, p_row, m_r, D)
        m_s = m_r[:, None] & m_k[None, :] & (pos[None, :] <= t[:, None])
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                        # [BM, BS]
        b_dk, b_dv, b_ds = _dkdv_step(b_dk, b_dv, b_s, m_s, b_q, b_do, b_lse, b_delta, b_v,
                                      True)
        if DQ_PIECES:
            p_part = p_row * NSEL + _block_slot(idx, i_b, i_h, t, j, m_r, T, H, NSEL, NS)
            tl.store(dq_part + p_part[:, None] * D + o_d[None, :],
                     (tl.dot(b_ds, b_k) * scale).to(dq_part.dtype.element_ty),
                     mask=m_r[:, None])
    m_out = m_k[:, None] & (start < end)
    p_out = p_key[:, None] * D + o_d[None, :]
    tl.atomic_add(dk + p_out, b_dk * scale, mask=m_out)
    tl.atomic_add(dv + p_out, b_dv, mask=m_out)


@triton.jit
def _slc_dq_merge_kernel(dq_part, dq, dq_out, T, HQ, NSEL, N_ROWS, ACCUM: tl.constexpr,
                         SBLK: tl.constexpr, D: tl.constexpr, BR: tl.constexpr):
    """dq_out of BR query rows = the sum of their pieces from _slc_bwd_dkdv_kernel, plus
    what earlier branches wrote to the fp32 dq if ACCUM (as _store_dq)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < N_ROWS
    n_eligible = tl.minimum(NSEL, (o_r // HQ) % T // SBLK + 1)                 # [BR]
    o_d = tl.arange(0, D)
    p_dq = dq + o_r[:, None] * D + o_d[None, :]
    b_dq = tl.zeros([BR, D], tl.float32)
    if ACCUM:
        b_dq += tl.load(p_dq, mask=m_r[:, None], other=0.)
    for i_n in range(NSEL):
        m_n = m_r & (i_n < n_eligible)
        b_dq += tl.load(dq_part + (o_r * NSEL + i_n)[:, None] * D + o_d[None, :],
                        mask=m_n[:, None], other=0.).to(tl.float32)
    tl.store(dq_out + o_r[:, None] * D + o_d[None, :], b_dq.to(dq_out.dtype.element_ty),
             mask=m_r[:, None])


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
def _combine_bwd_one(do, o_b, g_b, lse_b, dg_b, lse_g_b, o_r, m_r, p):
    b_dg = tl.sum(do * tl.load(o_b + p, mask=m_r[:, None], other=0.).to(tl.float32), 1)
    tl.store(dg_b + o_r, b_dg, mask=m_r)
    b_g = tl.load(g_b + o_r, mask=m_r, other=1.).to(tl.float32)
    b_lse = tl.load(lse_b + o_r, mask=m_r, other=0.)
    b_lse = tl.where(b_g > 0, b_lse - tl.log2(tl.where(b_g > 0, b_g, 1.)), float("inf"))
    tl.store(lse_g_b + o_r, b_lse, mask=m_r)


@triton.jit
def _combine_bwd_kernel(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win,
                        dg_cmp, dg_slc, dg_win, lg_cmp, lg_slc, lg_win, N,
                        D: tl.constexpr, BR: tl.constexpr):
    """The gate gradients dg_b = rowsum(do * o_b), and each branch's lse shifted by -log2(g_b),
    in one pass over the rows. The branch's upstream gradient is g*do, so its softmax backward
    has dP = g*(do.v) and delta = g*dg, hence dS = P*(dP - delta) = (g*P)*(do.v - dg) and
    dv = (g*P)^T do. With P' = 2^(s - lse + log2 g) = g*P the backward kernels therefore take
    the layer's do as it is, and delta = dg: no gated copy of do is written (g = 0: P' = 0)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < N
    o_d = tl.arange(0, D)
    p = o_r[:, None] * D + o_d[None, :]
    b_do = tl.load(do + p, mask=m_r[:, None], other=0.).to(tl.float32)
    _combine_bwd_one(b_do, o_cmp, g_cmp, lse_cmp, dg_cmp, lg_cmp, o_r, m_r, p)
    _combine_bwd_one(b_do, o_slc, g_slc, lse_slc, dg_slc, lg_slc, o_r, m_r, p)
    _combine_bwd_one(b_do, o_win, g_win, lse_win, dg_win, lg_win, o_r, m_r, p)


# ----------------------------------------------------------------------------------------------
# Launchers: allocate outputs, pick tiles and grids (the public functions check the inputs).
# Tile sizes, warps and stages: DENSE_TILES, SLC_TILES and _select_tiles below.

POISON_OUTPUTS = _INTERPRET  # fill outputs with NaN (indices with -2) first: unwritten shows up
# The selected forward runs in key-block order (each selected block loaded once per BQ
# positions that chose it, then a merge of the n pieces per query row) below this group size,
# and per position (the G heads of one position as the rows, n block loads per position) from
# it on, where the per-position tiles fill the tensor cores and the pieces would take n times
# the output's memory. H200, the branch alone, 64k, HQ = 4G, H = 4, D = 128 (2026-11-29), per
# position / key-block order: G=1 15.9 / 2.5 ms, G=4 17.3 / 6.8, G=8 17.4 / 12.1,
# G=16 15.8 / 23.2.
SLC_BLOCK_ORDER_BELOW_G = 16
# Below this group size the selected branch's backward forms dq in key-block order too: the
# dk/dv kernel stores each row's share for each selected block (a transient n x q, like the
# forward's pieces) and a merge kernel sums a row's n shares; from it on a per-position kernel
# loads every position's n blocks again, as the per-position forward does. H200, the branch's
# fwd+bwd (key-block forward), 64k, HQ = 4G, H = 4, D = 128 (2026-11-29), dq per position /
# atomic adds in the dk/dv kernel / pieces: G=1 21.8 / 13.9 / 7.25 ms, G=4 30.7 / 50.5 / 21.6,
# G=8 41.0 / 97.9 / 37.8; at G=16 the per-position order throughout takes 54.1 ms, pieces
# after the key-block forward 66.6 (benchmarks/selected_order_h200_2026-11-29b.jsonl).
SLC_DQ_PIECES_BELOW_G = 16
# dk/dv of the compressed keys: split each key tile's query range into slices of 256 to this
# many positions (atomic adds join them), enough for about _CMP_SPLIT_PROGRAMS programs
_CMP_SPLIT_POSITIONS = 4096
_CMP_SPLIT_PROGRAMS = 4096
# the selected branch in key-block order (forward, dk/dv, dq pieces): at most _SLC_SEGMENT
# queries per program
_SLC_SEGMENT = 256


def _alloc(shape, dtype, device, fill=float("nan")):
    if POISON_OUTPUTS:
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _tile_rows(G, rows):
    """Rows (positions x heads) per tile: `rows`, and at least all G heads of a position. The
    one change under the interpreter (which ignores warps and stages): it pays per operation,
    not per element, so it gets 256 rows."""
    return max(256 if _INTERPRET else rows, triton.next_power_of_2(G))


# Tiles of the dense kernels, per branch and kernel: query rows per tile (positions x heads, at
# least the G heads of one position), keys per tile, warps, pipeline stages; an entry that
# depends on the group size maps the smallest G it serves to its setting. Chosen by sweeps on the
# H200 (D = 128; benchmarks/dev/tiles.py -> benchmarks/dense_tiles_h200_2026-11-29.jsonl,
# tiles_h200_2026-11-29b.jsonl, group_tiles_h200_2026-11-29/). The compressed dk/dv at 64k: with
# (128, 64, 8, 2) the branch's backward takes 10.3 ms at G = 4 against 10.8 with (64, 64, 4, 2),
# and 37.3 against 34.9 at G = 16; its fwd+bwd 28.9 against 29.8 ms at G = 8, but 3.65 against
# 3.49 at G = 1 (G = 2, 3 not measured). D > 128 keeps its earlier settings (registers): at most
# 64 rows and 32 keys, 8 warps, 2 stages.
DENSE_TILES = {
    "compressed": {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 3),
                   "dkdv": {1: (64, 64, 4, 2), 4: (128, 64, 8, 2), 16: (64, 64, 4, 2)}},
    "window": {"fwd": (128, 32, 4, 3), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)},
}


def _for_group(setting, G):
    """A DENSE_TILES or SLC_TILES entry at group size G: the setting, or {smallest G: setting}."""
    if isinstance(setting, dict):
        return setting[max(g for g in setting if g <= G)]
    return setting


def _dense_tiles(kernel, window, G, D):
    branch = "compressed" if window == _NO_WINDOW else "window"
    rows, keys, warps, stages = _for_group(DENSE_TILES[branch][kernel], G)
    if D > 128:
        rows, keys, warps, stages = min(rows, 64), min(keys, 32), 8, 2
    return _tile_rows(G, rows), keys, warps, stages


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
    BM, BN, warps, stages = _dense_tiles("fwd", window, G, D)
    BT = BM // G
    grid = (triton.cdiv(T, BT), B * H)
    _dense_fwd_kernel[grid](q, k, v, o, lse, T, TK, G, BT, HQ, H, scale * _LOG2E, kstride, koff,
                            window, D=D, BM=BM, BN=BN, num_warps=warps, num_stages=stages)
    return o, lse


def _dense_bwd(q, k, v, do, lse, delta, dq, accum, kstride, koff, window, scale):
    """Backward of _dense_fwd. Writes dq (accum: adds to the fp32 dq; else dq may be in q's
    dtype); returns fp32 dk, dv."""
    B, T, HQ, D = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = HQ // H
    if TK == 0:
        if not accum:
            dq.zero_()
        return (torch.zeros(k.shape, dtype=torch.float32, device=q.device),
                torch.zeros(k.shape, dtype=torch.float32, device=q.device))
    BM, BN, warps, stages = _dense_tiles("dq", window, G, D)
    _dense_bwd_dq_kernel[(triton.cdiv(T, BM // G), B * H)](
        q, k, v, do, lse, delta, dq, T, TK, G, BM // G, HQ, H, scale * _LOG2E, scale, kstride,
        koff, window, ACCUM=accum, D=D, BM=BM, BN=BN, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _dense_tiles("dkdv", window, G, D)
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
        BM=BM, BN=BN, num_warps=warps, num_stages=stages)
    return dk, dv


def _slc_tiles(G, select_block):
    return max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(select_block))


# Launch settings of the selected-branch kernels: (warps, stages) of those that run one position
# per program (from G = 16: the forward and dq), and (query rows, warps, stages) of those that
# run one selection block's queries per program (the dk/dv, and below G = 16 the forward; for
# D > 128 these get at most 64 rows and at least 8 warps); by group size as in DENSE_TILES.
# Swept on the H200 at 64k and 8k (benchmarks/tiles_h200_2026-11-29b.jsonl,
# group_tiles_h200_2026-11-29/): at G = 16 the settings below were the fastest of 16 (forward,
# dq) and 12 (dk/dv) tried. Below G = 16 the dk/dv with 128 rows and 8 warps takes 4.08 / 9.8 /
# 17.2 ms at G = 1 / 4 / 8 against 4.28 / 11.6 / 21.3 with 64 rows and 4 warps. The key-block
# forward keeps (64, 4, 2): the fastest of 12 at G = 1; at G = 8, 4 stages took 11.4 ms
# against 11.9.
SLC_TILES = {"fwd": (2, 2), "dq": (2, 2), "blocks_fwd": (64, 4, 2),
             "dkdv": {1: (128, 8, 2), 16: (64, 4, 2)}}


def _slc_launch(kernel, G, D):
    setting = _for_group(SLC_TILES[kernel], G)
    if kernel in ("blocks_fwd", "dkdv") and D > 128:
        rows, warps, stages = setting
        return min(rows, 64), max(warps, 8), stages
    return setting


def _slc_fwd(q, k, v, idx, select_block, scale, inv=()):
    """Selected attention: o, lse, and the inverted selection it built or was given (inv;
    empty from G = 16) for _slc_bwd to reuse."""
    B, T, HQ, D = q.shape
    H, n = k.shape[2], idx.shape[-1]
    G = HQ // H
    BG, BS = _slc_tiles(G, select_block)
    o = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((B, T, HQ), torch.float32, q.device)
    if G >= SLC_BLOCK_ORDER_BELOW_G:
        warps, stages = _slc_launch("fwd", G, D)
        _slc_fwd_kernel[(T, B * H)](q, k, v, idx, o, lse, T, G, HQ, H, scale * _LOG2E, n,
                                    SBLK=select_block, BS=BS, D=D, BG=BG,
                                    num_warps=warps, num_stages=stages)
        return o, lse, ()
    # small G: key-block order, then a merge (the pieces: n outputs per query row)
    n_blocks = triton.cdiv(T, select_block)
    inv = inv or _invert_selection(idx, n_blocks, _SLC_SEGMENT)
    q_list, seg_bin, seg_start, seg_end = inv
    o_part = _alloc((B, T, HQ, n, D), q.dtype, q.device)
    lse_part = _alloc((B, T, HQ, n), torch.float32, q.device)
    rows, warps, stages = _slc_launch("blocks_fwd", G, D)
    BM = _tile_rows(G, rows)
    _slc_fwd_blocks_kernel[(seg_bin.numel(),)](
        q, k, v, idx, o_part, lse_part, q_list, seg_bin, seg_start, seg_end, T, G, BM // G, HQ,
        H, n_blocks, n, scale * _LOG2E, SBLK=select_block, BS=BS, D=D, BM=BM,
        NS=triton.next_power_of_2(n), num_warps=warps, num_stages=stages)
    _slc_merge_kernel[(T, B * H)](o_part, lse_part, o, lse, T, G, HQ, H, n, SBLK=select_block,
                                  D=D, BG=triton.next_power_of_2(G), num_warps=4)
    return o, lse, inv


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
    key = (bins * T + t).flatten()
    # int32 keys where they fit (up to 2^31 / T bins; B = 1, H = 4 at 64k uses 1/8 of that):
    # the radix sort then makes half the passes
    if (n_bins + 1) * T <= torch.iinfo(torch.int32).max:
        key = key.int()
    key = torch.sort(key).values.long()
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


def _slc_bwd(q, k, v, idx, inv, do, lse, delta, dq, accum, dk, dv, select_block, scale,
             dq_out=None):
    """Backward of _slc_fwd: writes its dq (accum: plus the fp32 dq) to dq_out (default: dq);
    adds into the fp32 dk, dv. inv: the forward's inverted selection, or () to build it here."""
    dq_out = dq if dq_out is None else dq_out
    B, T, HQ, D = q.shape
    H, n = k.shape[2], idx.shape[-1]
    G = HQ // H
    BG, BS = _slc_tiles(G, select_block)
    dq_pieces = G < SLC_DQ_PIECES_BELOW_G
    if dq_pieces:
        dq_part = _alloc((B, T, HQ, n, D), q.dtype, q.device)
    else:
        dq_part = dq  # not written
        warps, stages = _slc_launch("dq", G, D)
        _slc_bwd_dq_kernel[(T, B * H)](q, k, v, idx, do, lse, delta, dq, dq_out, T, G, HQ, H,
                                       scale * _LOG2E, scale, n, ACCUM=accum, SBLK=select_block,
                                       BS=BS, D=D, BG=BG, num_warps=warps, num_stages=stages)
    n_blocks = triton.cdiv(T, select_block)
    q_list, seg_bin, seg_start, seg_end = inv or _invert_selection(idx, n_blocks, _SLC_SEGMENT)
    rows, warps, stages = _slc_launch("dkdv", G, D)
    BM = _tile_rows(G, rows)
    _slc_bwd_dkdv_kernel[(seg_bin.numel(),)](
        q, k, v, idx, do, lse, delta, dq_part, dk, dv, q_list, seg_bin, seg_start, seg_end,
        T, G, BM // G, HQ, H, n_blocks, n, scale * _LOG2E, scale, DQ_PIECES=dq_pieces,
        SBLK=select_block, BS=BS, D=D, BM=BM, NS=triton.next_power_of_2(n),
        num_warps=warps, num_stages=stages)
    if dq_pieces:
        BR = 256 if _INTERPRET else 32
        _slc_dq_merge_kernel[(triton.cdiv(dq.numel() // D, BR),)](
            dq_part, dq, dq_out, T, HQ, n, dq.numel() // D, ACCUM=accum, SBLK=select_block, D=D,
            BR=BR, num_warps=4)


def _select_tiles(G, D, elem_size, block_len, block_stride, select_block, n_select):
    """Tiles of _select_kernel: (BT, BG, BC, BJ, K, NS) = positions and padded heads per tile,
    compressed and selection blocks per chunk, candidate slots per chunk, top-n slots."""
    # H200, T=64k, bf16, D=128, paper hyperparameters (2026-11-29): at G=16, 128 rows (8
    # positions), 4 warps and 64 compressed blocks per chunk took 10.66 ms; 256 rows and 8
    # warps: 11.4 ms, and with 128 blocks per chunk: 15.3 ms. The bitonic merge costs the same
    # per position whatever enters, so tiles keep at most 64 positions: at G=1, 32 / 64 / 128 /
    # 256 positions took 3.07 / 2.69 / 8.51 / 10.5 ms (insertion rounds, the merge this kernel
    # had for G < 8 before: 3.32 / 2.92 / 4.56 / 8.78); at G=4, 16 / 32 / 64 positions 4.27 /
    # 4.15 / 6.41 ms (rounds: 6.06 / 4.27 / 5.11; benchmarks/select_tiles_h200_2026-11-29.jsonl).
    # A tile's q block stays near 64 KB. The interpreter pays per operation, not per element:
    # 1024 rows, up to 256 positions.
    BG = triton.next_power_of_2(G)
    rows = min(1024 if _INTERPRET else 128, max(16, 65536 // (D * elem_size)))
    BT = max(1, min(rows // BG, 256 if _INTERPRET else 64))
    R, M1 = select_block // block_stride, block_len // block_stride - 1
    BC = max(64, triton.next_power_of_2(R + M1))
    BJ = (BC - M1) // R
    NS = triton.next_power_of_2(n_select)
    K = max(16, triton.next_power_of_2(BJ), NS)
    return BT, BG, BC, BJ, K, NS


def _select(q, k_cmp, lse, block_len, block_stride, select_block, n_select, scale):
    B, T, HQ, D = q.shape
    Tc, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    BT, BG, BC, BJ, K, NS = _select_tiles(G, D, q.element_size(), block_len, block_stride,
                                          select_block, n_select)
    idx = _alloc((B, T, H, n_select), torch.int32, q.device, fill=-2)
    kc = k_cmp if Tc > 0 else q.new_zeros(1)   # nothing is loaded when Tc == 0
    _select_kernel[(triton.cdiv(T, BT), B * H)](
        q, kc, lse, idx, T, Tc, G, HQ, H, scale * _LOG2E, n_select,
        CBLK=block_len, CSTRIDE=block_stride, SBLK=select_block, BJ=BJ, D=D, BT=BT, BG=BG,
        BC=BC, K=K, NS=NS, LOG_BT=BT.bit_length() - 1, LOG_K=K.bit_length() - 1,
        LOG_NS=NS.bit_length() - 1, num_warps=4, num_stages=2)
    return idx


def _combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    B, T, HQ, D = o_cmp.shape
    N = B * T * HQ
    o = _alloc(o_cmp.shape, o_cmp.dtype, o_cmp.device)
    BR = max(1, 4096 // D)
    _combine_fwd_kernel[(triton.cdiv(N, BR),)](o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, N,
                                              D=D, BR=BR, num_warps=4)
    return o


def _combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win):
    """The gate gradients dg_b [B, T, HQ] (fp32), which are also the branches' softmax-backward
    terms for do, and the gate-shifted lse of each branch (see _combine_bwd_kernel)."""
    B, T, HQ, D = do.shape
    N = B * T * HQ
    dev = do.device
    d_g = [_alloc((B, T, HQ), torch.float32, dev) for _ in range(3)]
    lse_g = [_alloc((B, T, HQ), torch.float32, dev) for _ in range(3)]
    BR = max(1, 4096 // D)
    _combine_bwd_kernel[(triton.cdiv(N, BR),)](do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win,
                                              lse_cmp, lse_slc, lse_win, *d_g, *lse_g, N, D=D,
                                              BR=BR, num_warps=4)
    return d_g, lse_g


_WARNED = set()


def _warn_once(message):
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Autograd. _NSAFunction runs the whole layer (the path nsa_attention takes); the per-branch
# functions below expose each kernel with its own backward, for benchmarks and tests.

# Branches whose output the forward does not keep for the backward, which recomputes it: the
# backward needs every o_b (for the gate gradient rowsum(do * o_b)), and each held o_b is a
# [B, T, HQ, D] tensor per layer beyond what full attention holds. H200, the 32k config's
# model (8 layers), one training step at T=32k (2026-11-29, 65d6026): holding all three,
# 155 ms and a 30.4 GiB peak; recomputing the window branch, 157 ms and 29.9 GiB (the
# default); the window and compressed branches, 161 ms and 29.4 GiB; all three, 167 ms and
# 28.9 GiB (full attention: 226 ms, 28.7 GiB). Results are identical (tested).
RECOMPUTE = ("window",)


def _cmp_geometry(block_len, block_stride):
    return block_stride, block_len - 1, _NO_WINDOW      # kstride, koff, window


class _NSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, k_win, v_win, block_len,
                block_stride, select_block, n_select, window, scale):
        q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win = (
            x.contiguous() for x in (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win))
        ctx.own_window_kv = k_win is not None
        # the window branch's keys: its own (then their gradients are its own too), or k, v
        k_win, v_win = (k_win.contiguous(), v_win.contiguous()) if ctx.own_window_kv else (k, v)
        o_cmp, lse_cmp = _dense_fwd(q, k_cmp, v_cmp, *_cmp_geometry(block_len, block_stride),
                                    scale)
        idx = _select(q, k_cmp, lse_cmp, block_len, block_stride, select_block, n_select, scale)
        o_slc, lse_slc, inv = _slc_fwd(q, k, v, idx, select_block, scale)
        o_win, lse_win = _dense_fwd(q, k_win, v_win, 1, 0, window, scale)
        o = _combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
        if "compressed" in RECOMPUTE:
            o_cmp = lse_cmp = None
        if "window" in RECOMPUTE:
            o_win = lse_win = None
        if "selected" in RECOMPUTE:
            o_slc = lse_slc = None
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, k_win, v_win, o_cmp,
                              o_slc, o_win, lse_cmp, lse_slc, lse_win, idx, *inv)
        ctx.cfg = (block_len, block_stride, select_block, window, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, k_win, v_win, o_cmp, o_slc, o_win,
         lse_cmp, lse_slc, lse_win, idx, *inv) = ctx.saved_tensors
        block_len, block_stride, select_block, window, scale = ctx.cfg
        if o_cmp is None:
            o_cmp, lse_cmp = _dense_fwd(q, k_cmp, v_cmp, *_cmp_geometry(block_len, block_stride),
                                        scale)
        if o_win is None:
            o_win, lse_win = _dense_fwd(q, k_win, v_win, 1, 0, window, scale)
        if o_slc is None:
            o_slc, lse_slc, _ = _slc_fwd(q, k, v, idx, select_block, scale, inv)
        do = do.contiguous()
        dg, (lg_cmp, lg_slc, lg_win) = _combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win,
                                                   lse_cmp, lse_slc, lse_win)
        dq = _alloc(q.shape, torch.float32, q.device)
        dk_cmp, dv_cmp = _dense_bwd(q, k_cmp, v_cmp, do, lg_cmp, dg[0], dq, False,
                                    *_cmp_geometry(block_len, block_stride), scale)
        dk_win, dv_win = _dense_bwd(q, k_win, v_win, do, lg_win, dg[2], dq, True, 1, 0, window,
                                    scale)
        if ctx.own_window_kv:   # else the selected branch adds its dk, dv to the window's
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        else:
            dk, dv = dk_win, dv_win
        # the last branch adds its share and writes dq in q's dtype (no separate cast)
        dq_out = dq if q.dtype == torch.float32 else _alloc(q.shape, q.dtype, q.device)
        _slc_bwd(q, k, v, idx, inv, do, lg_slc, dg[1], dq, True, dk, dv, select_block, scale,
                 dq_out)
        d_window_kv = ((dk_win.to(k_win.dtype), dv_win.to(v_win.dtype)) if ctx.own_window_kv
                       else (None, None))
        return (dq_out, dk.to(k.dtype), dv.to(v.dtype), dk_cmp.to(k_cmp.dtype),
                dv_cmp.to(v_cmp.dtype), dg[0].to(g_cmp.dtype), dg[1].to(g_slc.dtype),
                dg[2].to(g_win.dtype), *d_window_kv, None, None, None, None, None, None)


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
        dq = _alloc(q.shape, q.dtype, q.device)      # no accumulation: written in q's dtype
        dk, dv = _dense_bwd(q, k, v, do, lse, _delta(do, o), dq, False, *ctx.cfg)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class _SlcFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, select_block, scale):
        q, k, v, idx = q.contiguous(), k.contiguous(), v.contiguous(), idx.contiguous()
        o, lse, inv = _slc_fwd(q, k, v, idx, select_block, scale)
        ctx.save_for_backward(q, k, v, idx, o, lse, *inv)
        ctx.cfg = (select_block, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, o, lse, *inv = ctx.saved_tensors
        select_block, scale = ctx.cfg
        do = do.contiguous()
        dq = _alloc(q.shape, q.dtype, q.device)      # no accumulation: written in q's dtype
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        _slc_bwd(q, k, v, idx, inv, do, lse, _delta(do, o), dq, False, dk, dv, select_block,
                 scale)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def compressed_attention(q, k_cmp, v_cmp, *, block_len=BLOCK_LEN, block_stride=BLOCK_STRIDE,
                         scale=None):
    """Compressed branch alone (Triton, autograd): q [B, T, HQ, D], k_cmp, v_cmp [B, Tc, H, D]
    -> (o [B, T, HQ, D], lse [B, T, HQ] fp32, base 2: log2 sum_i 2^(q.k_i * scale * log2 e),
    +inf for queries that see no block). Pass lse to nsa_select."""
    _check_compression(block_len, block_stride)
    _check_kernel_inputs(q, k_cmp=k_cmp, v_cmp=v_cmp)
    _check_compressed_keys(k_cmp, q.shape[1], block_len, block_stride)
    return _DenseFunction.apply(q, k_cmp, v_cmp, *_cmp_geometry(block_len, block_stride),
                                _default_scale(q, scale))


def nsa_select(q, k_cmp, lse, *, block_len=BLOCK_LEN, block_stride=BLOCK_STRIDE,
               select_block=SELECT_BLOCK, n_select=N_SELECT, scale=None):
    """Top-n selection blocks from the compressed branch's lse (no gradient): int32
    [B, T, H, n_select], the always-taken blocks first, -1 where fewer blocks are eligible."""
    _check_selection(block_len, block_stride, select_block, n_select)
    _check_kernel_inputs(q, k_cmp=k_cmp)
    _check_compressed_keys(k_cmp, q.shape[1], block_len, block_stride)
    if tuple(lse.shape) != tuple(q.shape[:3]) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 [B, T, HQ] = {tuple(q.shape[:3])}, got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device}, q on {q.device}: they must match")
    with torch.no_grad():
        return _select(q.contiguous(), k_cmp.contiguous(), lse.contiguous(), block_len,
                       block_stride, select_block, n_select, _default_scale(q, scale))


def selected_attention(q, k, v, idx, *, select_block=SELECT_BLOCK, scale=None):
    """Selected branch alone (Triton, autograd): attention of q over the tokens s <= t of the
    blocks idx [B, T, H, n] (from nsa_select; -1 = none) -> o [B, T, HQ, D]."""
    _check_positive(select_block=select_block)
    B, T, HQ, H, D, _ = _check_kernel_inputs(q, k=k, v=v)
    _check_same_length(q, k)
    if idx.dim() != 4 or tuple(idx.shape[:3]) != (B, T, H) or idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32 [B, T, H, n], got {idx.dtype} {tuple(idx.shape)}")
    return _SlcFunction.apply(q, k, v, idx, select_block, _default_scale(q, scale))


def window_attention(q, k, v, *, window=WINDOW, scale=None):
    """Sliding-window branch alone (Triton, autograd): keys t - window < s <= t -> o."""
    _check_positive(window=window)
    _check_kernel_inputs(q, k=k, v=v)
    _check_same_length(q, k)
    return _DenseFunction.apply(q, k, v, 1, 0, window, _default_scale(q, scale))[0]


# ==============================================================================================
# Decoding
#
# One new query token per sequence against preallocated KV caches: flash-decoding-style Triton
# kernels, CUDA-graph friendly (the grids depend on shapes only; lengths are read on the device).
#
# The semantics are nsa_attention's at the last position (see nsa_kernels' docstring): per
# sequence, nsa_decode_ref runs nsa_attention_ref on the caches cut to lengths[b] with q as the
# last query. Ties between equal block scores go to the larger block index, as in training.
#
# Five launches, each with a grid that fills the GPU at B=1 (flash-decoding):
#  1. _decode_cmp_kernel, grid (S splits, B*H): compressed attention over one split of the
#     compressed cache for the G heads of a KV head (partial m, l, acc), and per chunk the
#     heads' selection-block scores sum_i w_ij 2^(s_i - m_chunk) (compressed keys are read once
#     for both);
#  2. _decode_scores_kernel, grid (B*H, NB / 256): the heads' log-sum-exp from the split
#     partials turns the partial scores into p_cmp-weighted block scores, summed over heads;
#  3. _decode_select_kernel, grid (B*H,): the exact top-n of the block scores (forced blocks
#     +inf), in registers;
#  4. _decode_tokens_kernel, grid (pieces, B*H): selected blocks and the window, cut into
#     pieces, each writing partial m, l, acc;
#  5. _decode_merge_kernel, grid (B*H, D / BD): merges every branch's partials and applies the
#     gates.

# ----------------------------------------------------------------------------------------------
# Input checks and the plain-PyTorch reference.

def check_decode_inputs(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win,
                        lengths, block_len, block_stride, k_win_cache=None, v_win_cache=None):
    """Shape, dtype and device checks (no device sync). Returns (B, Tmax, HQ, H, D)."""
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, HQ, D] (one new token per sequence), got shape "
                         f"{tuple(q.shape)}")
    B, _, HQ, H, D, Tmax = _check_keys(q, k_cache=k_cache, v_cache=v_cache)
    _check_window_keys(q, k_cache=k_cache, k_win_cache=k_win_cache, v_win_cache=v_win_cache)
    if Tmax < 1:
        raise ValueError("k_cache must hold at least one token slot (Tmax >= 1)")
    Tc_need = num_compressed_blocks(Tmax, block_len, block_stride)
    if (k_cmp_cache.dim() != 4 or k_cmp_cache.shape[0] != B or k_cmp_cache.shape[2:] != (H, D)
            or k_cmp_cache.shape[1] < Tc_need or v_cmp_cache.shape != k_cmp_cache.shape):
        raise ValueError(f"k_cmp_cache and v_cmp_cache must be [B, Tcmax, H, D] = [{B}, Tcmax, "
                         f"{H}, {D}] with Tcmax >= {Tc_need} (the compressed blocks of Tmax = "
                         f"{Tmax} tokens), got {tuple(k_cmp_cache.shape)} and "
                         f"{tuple(v_cmp_cache.shape)}")
    _check_keys(q, k_cmp_cache=k_cmp_cache, v_cmp_cache=v_cmp_cache)
    _check_gates(q, "[B, 1, HQ]", g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be a tensor of shape [B] = [{B}], got "
                         f"{getattr(lengths, 'shape', type(lengths).__name__)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype}")
    if lengths.device != q.device:
        raise ValueError(f"lengths is on {lengths.device}, q on {q.device}: they must match "
                         f"(the kernels read it from device memory)")
    return B, Tmax, HQ, H, D


def nsa_decode_ref(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win, lengths,
                   *, block_len=BLOCK_LEN, block_stride=BLOCK_STRIDE, select_block=SELECT_BLOCK,
                   n_select=N_SELECT, window=WINDOW, scale=None, k_win_cache=None,
                   v_win_cache=None):
    """The definition of nsa_decode (plain PyTorch, reads lengths on the host): per sequence,
    nsa_attention_ref over the caches cut to lengths[b], q the last query (sequences of one
    length in one call). -> [B, 1, HQ, D]"""
    check_block_sizes(block_len, block_stride, select_block, n_select, window)
    B, Tmax, HQ, H, D = check_decode_inputs(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp,
                                            g_slc, g_win, lengths, block_len, block_stride,
                                            k_win_cache, v_win_cache)
    hp = dict(block_len=block_len, block_stride=block_stride, select_block=select_block,
              n_select=n_select, window=window, scale=scale)
    host = lengths.tolist()
    for b, T in enumerate(host):
        if not 1 <= T <= Tmax:
            raise ValueError(f"lengths[{b}] = {T} is outside [1, Tmax = {Tmax}]")
    out = torch.empty_like(q)
    for T in set(host):
        rows = torch.tensor([b for b in range(B) if host[b] == T], device=q.device)
        Tc = num_compressed_blocks(T, block_len, block_stride)
        own = {} if k_win_cache is None else dict(k_win=k_win_cache[rows, :T],
                                                  v_win=v_win_cache[rows, :T])
        out[rows] = nsa_attention_ref(
            q[rows], k_cache[rows, :T], v_cache[rows, :T], k_cmp_cache[rows, :Tc],
            v_cmp_cache[rows, :Tc], g_cmp[rows], g_slc[rows], g_win[rows], **hp, **own)
    return out


# ----------------------------------------------------------------------------------------------
# Triton decode kernels.
#
# Partial results: piece p of KV head (b, h) holds, for each of its G heads, the running max m,
# the sum l of 2^(s - m) and the unnormalised acc = sum 2^(s - m) v (base-2 logits, as in
# training), in part_m, part_l [B, H, NP, G] and part_acc [B, H, NP, G, D] (fp32). Pieces
# 0 .. S-1 are the compressed splits, then the selected pieces, then the window pieces.
# Compressed chunk c (DECODE_TUNING["cmp_chunk"] = BC compressed blocks, CH chunks per split)
# owns selection blocks c*BJ .. c*BJ + BJ - 1, hence the compressed blocks c*BJ*R ..
# (c+1)*BJ*R - 1 (R = l'/d); it also reads the M1 = l/d - 1 blocks before them, which overlap
# its first selection block (and are another chunk's for attention). It writes its max
# chunk_m [B, H, G, NCH] and per-head block scores chunk_score [B, H, G, NB] relative to it.


# GPU tile and split settings (the fastest of a sweep on an H200, 2026-11-29; the tests
# also run a tiny setting that exercises every path): compressed blocks per chunk
# (BC), compressed programs aimed at (B*H*S) and most splits per KV head (S), candidates the
# top-n ranks exactly (a power of 2; more fall back to bisection), selected blocks per piece,
# window tokens per piece, keys per tile of the token pieces, pieces unrolled and head-dim
# columns per merge program, warps, pipelining depth.
DECODE_TUNING = {"cmp_chunk": 128, "cmp_programs": 1024, "cmp_splits": 32, "select_cap": 64,
                 "slc_blocks": 2, "win_tokens": 128, "tokens": 64, "merge_pieces": 8,
                 "merge_dims": 32, "warps": 4, "stages": 2}


@triton.jit
def _decode_query(q, i_b, i_h, HQ, G, D: tl.constexpr, BG: tl.constexpr):
    """The G query heads of KV head i_h as tile rows, zero-padded to BG."""
    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, D)
    p_row = (i_b * HQ + i_h * G + o_g).to(tl.int64)                            # [BG]
    return tl.load(q + p_row[:, None] * D + o_d[None, :], mask=(o_g < G)[:, None], other=0.)


@triton.jit
def _decode_length(lengths, i_b, TMAX):
    """Tokens in sequence i_b's cache, clamped into [1, TMAX] so that every address stays inside
    the caches (the merge kernel writes NaN for out-of-range lengths)."""
    return tl.minimum(tl.maximum(tl.load(lengths + i_b).to(tl.int32), 1), TMAX)


@triton.jit
def _decode_store_partial(part_m, part_l, part_acc, piece, b_m, b_l, b_acc, G,
                          D: tl.constexpr, BG: tl.constexpr):
    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, D)
    m_g = o_g < G
    p_row = piece.to(tl.int64) * G + o_g                                       # [BG]
    tl.store(part_m + p_row, b_m, mask=m_g)
    tl.store(part_l + p_row, b_l, mask=m_g)
    tl.store(part_acc + p_row[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None])


@triton.jit
def _decode_cmp_kernel(q, k_cmp, v_cmp, lengths, part_m, part_l, part_acc, chunk_m, chunk_score,
                       s_b, s_t, s_h, TMAX, TCMAX, NB, NCH, NP, HQ, H, G, scale_log2,
                       CH: tl.constexpr, CBLK: tl.constexpr, CSTRIDE: tl.constexpr,
                       SBLK: tl.constexpr, D: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr,
                       BJ: tl.constexpr, K: tl.constexpr):
    """Split i_s (chunks i_s*CH ..) of the compressed cache for the G heads of one KV head:
    partial attention over the compressed blocks the chunks own, and per chunk the heads'
    selection-block scores relative to the chunk's max. Splits past the query exit."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    n_tok = _decode_length(lengths, i_b, TMAX)
    t = n_tok - 1
    n_chunk = (t // SBLK) // BJ + 1                  # chunks holding an eligible block j*l' <= t
    c_lo = i_s * CH
    if c_lo >= n_chunk:
        return
    c_hi = tl.minimum(c_lo + CH, n_chunk)
    # visible compressed blocks i*d + l <= t + 1 (C division: keep the numerator >= 0)
    tc = tl.minimum(tl.maximum(n_tok - CBLK + CSTRIDE, 0) // CSTRIDE, TCMAX)

    b_q = _decode_query(q, i_b, i_h, HQ, G, D, BG)                            # [BG, D]
    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, BC)
    o_j = tl.arange(0, K)
    R: tl.constexpr = SBLK // CSTRIDE
    M1: tl.constexpr = CBLK // CSTRIDE - 1
    # overlap weights: column c of a chunk is compressed block c0*BJ*R - M1 + c, column jj the
    # selection block c0*BJ + jj; the same [BC, K] matrix for every chunk
    c_start = (o_c - M1) * CSTRIDE
    j_start = o_j * SBLK
    b_w = (tl.minimum(c_start[:, None] + CBLK, j_start[None, :] + SBLK)
           - tl.maximum(c_start[:, None], j_start[None, :]))
    b_w = tl.where(o_j[None, :] < BJ, tl.maximum(b_w, 0).to(tl.float32) / CSTRIDE, 0.)  # [BC, K]

    p_kv = i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h
    o_kd = o_c[:, None] * s_t + o_d[None, :]                                  # [BC, D] int32
    p_head = (i_bh * G + o_g).to(tl.int64)                                    # [BG] head rows
    m_g = o_g < G
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, D], tl.float32)
    for c in range(c_lo, c_hi):
        i0 = c * (BJ * R) - M1
        o_ci = i0 + o_c                                                        # [BC] block ids
        m_c = (o_ci >= 0) & (o_ci < tc) & (o_c < M1 + BJ * R)
        p_k = p_kv + tl.cast(i0, tl.int64) * s_t + o_kd
        b_k = tl.load(k_cmp + p_k, mask=m_c[:, None], other=0.)               # [BC, D]
        b_v = tl.load(v_cmp + p_k, mask=m_c[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                         # [BG, BC]
        b_s = tl.where(m_c[None, :], b_s, float("-inf"))
        # scores: relative to the chunk's own max (reach-back blocks included, so no 2^x > 1)
        b_mc = tl.max(b_s, 1)                                                  # [BG]
        b_mc_safe = tl.where(b_mc == float("-inf"), 0., b_mc)
        b_p = tl.exp2(b_s - b_mc_safe[:, None])                                # [BG, BC]
        b_sc = tl.dot(b_p, b_w, input_precision="ieee")                        # [BG, K]
        o_jj = c * BJ + o_j
        tl.store(chunk_score + p_head[:, None] * NB + o_jj[None, :], b_sc,
                 mask=m_g[:, None] & (o_j[None, :] < BJ) & (o_jj[None, :] < NB))
        tl.store(chunk_m + p_head * NCH + c, b_mc, mask=m_g)
        # attention over the blocks this chunk owns; any max >= theirs keeps 2^x <= 1
        b_m_new = tl.maximum(b_m, b_mc)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0., b_m_new)
        b_pa = tl.where((o_c >= M1)[None, :], b_p * tl.exp2(b_mc_safe - b_m_safe)[:, None], 0.)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_pa, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pa.to(b_v.dtype), b_v)
        b_m = b_m_new
    _decode_store_partial(part_m, part_l, part_acc, i_bh * NP + i_s, b_m, b_l, b_acc, G, D, BG)


@triton.jit
def _decode_scores_kernel(lengths, part_m, part_l, chunk_m, chunk_score, scores, TMAX, NB, NCH,
                          NP, H, G, CH: tl.constexpr, SBLK: tl.constexpr, BJ: tl.constexpr,
                          SP: tl.constexpr, BG: tl.constexpr, NBP: tl.constexpr,
                          BJC: tl.constexpr):
    """Scores of selection blocks i_j*BJC .. of one KV head. p_cmp = 2^(s - lse) needs the
    heads' lse, known only once every split is done: the chunk scores, relative to their
    chunk's max, are scaled by 2^(m_chunk - lse) here and summed over the G heads. (Many
    programs per head: the per-head partial scores are too many for one program to read.)"""
    i_bh, i_j = tl.program_id(0), tl.program_id(1)
    t = _decode_length(lengths, i_bh // H, TMAX) - 1
    n_elig = t // SBLK + 1                                       # blocks with j*l' <= t
    if i_j * BJC >= n_elig:
        return
    n_split = ((t // SBLK) // BJ) // CH + 1                      # splits the cmp kernel ran
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_head = (i_bh * G + o_g).to(tl.int64)                                    # [BG]
    # the heads' base-2 log-sum-exp over all splits (+inf: no compressed block visible)
    o_s = tl.arange(0, SP)
    m_sg = (o_s[:, None] < n_split) & m_g[None, :]
    p_part = (i_bh * NP + o_s[:, None]).to(tl.int64) * G + o_g[None, :]      # [SP, BG]
    b_ms = tl.load(part_m + p_part, mask=m_sg, other=float("-inf"))
    b_ls = tl.load(part_l + p_part, mask=m_sg, other=0.)
    b_mx = tl.max(b_ms, 0)                                                    # [BG]
    b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_sum = tl.sum(b_ls * tl.exp2(b_ms - b_mx[None, :]), 0)
    b_lse = tl.where(b_sum > 0, b_mx + tl.log2(tl.where(b_sum > 0, b_sum, 1.)), float("inf"))

    o_j = i_j * BJC + tl.arange(0, BJC)
    m_gj = m_g[:, None] & (o_j < n_elig)[None, :]
    b_sc = tl.load(chunk_score + p_head[:, None] * NB + o_j[None, :], mask=m_gj, other=0.)
    b_mc = tl.load(chunk_m + p_head[:, None] * NCH + (o_j // BJ)[None, :], mask=m_gj,
                   other=float("-inf"))
    b_sc = tl.where(m_gj, b_sc * tl.exp2(b_mc - b_lse[:, None]), 0.)           # [BG, BJC]
    tl.store(scores + i_bh.to(tl.int64) * NBP + o_j, tl.sum(b_sc, 0), mask=o_j < n_elig)


@triton.jit
def _decode_select_kernel(lengths, scores, cand, idx, TMAX, H, NSEL, SBLK: tl.constexpr,
                          NBP: tl.constexpr, NSELP: tl.constexpr, NG: tl.constexpr,
                          CAP: tl.constexpr, IB: tl.constexpr):
    """Top-n selection blocks of one KV head from its block scores. A block's key is its fp32
    score's bits << IB | its index (distinct keys; equal scores prefer the larger block, as in
    training); the blocks with keys >= the n-th largest are written in block order."""
    i_bh = tl.program_id(0)
    t = _decode_length(lengths, i_bh // H, TMAX) - 1
    n_elig = t // SBLK + 1
    o_j = tl.arange(0, NBP)
    m_elig = o_j < n_elig
    b_score = tl.load(scores + i_bh.to(tl.int64) * NBP + o_j, mask=m_elig, other=0.)
    cur = t // SBLK
    m_forced = (o_j == 0) | (o_j == cur) | (o_j == cur - 1)
    b_score = tl.where(m_forced, float("inf"), b_score) + 0.                 # no -0.0 bits
    b_key = (b_score.to(tl.int32, bitcast=True).to(tl.int64) << IB) | o_j.to(tl.int64)
    b_key = tl.where(m_elig, b_key, -1)
    # the n-th largest key (need of them are eligible) is at least the need-th largest of the NG
    # group maxima (group j % NG): need distinct keys lie at or above that. Few keys usually
    # pass this bound (about need + need^2 / 2NG): rank them exactly in a [CAP, CAP] compare.
    need = tl.minimum(NSEL, n_elig)
    b_gmax = tl.max(tl.reshape(b_key, [NBP // NG, NG]), 0)                    # [NG]
    b_grank = tl.sum((b_gmax[None, :] > b_gmax[:, None]).to(tl.int32), 1)
    lo = tl.max(tl.where(b_grank == need - 1, b_gmax, -1))
    m_cand = b_key >= lo
    n_cand = tl.sum(m_cand.to(tl.int32))
    if n_cand <= CAP:
        p_cand = cand + i_bh.to(tl.int64) * CAP
        tl.store(p_cand + tl.cumsum(m_cand.to(tl.int32), 0) - 1, b_key, mask=m_cand)
        tl.debug_barrier()
        o_c = tl.arange(0, CAP)
        b_c = tl.load(p_cand + o_c, mask=o_c < n_cand, other=-1)               # [CAP]
        b_crank = tl.sum((b_c[None, :] > b_c[:, None]).to(tl.int32), 1)
        lo = tl.max(tl.where(b_crank == need - 1, b_c, -1))
    else:
        # bisection: the largest lo with count(key >= lo) >= need
        hi = tl.max(b_key) + 1
        for _ in range(31 + IB):                                 # +inf's bits are < 2^31
            mid = (lo + hi) >> 1
            enough = tl.sum((b_key >= mid).to(tl.int32)) >= need
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
    m_sel = b_key >= lo
    slot = tl.cumsum(m_sel.to(tl.int32), 0) - 1
    p_idx = idx + i_bh.to(tl.int64) * NSEL
    tl.store(p_idx + slot, o_j, mask=m_sel)
    o_n = tl.arange(0, NSELP)
    tl.store(p_idx + o_n, tl.full([NSELP], -1, tl.int32), mask=(o_n >= need) & (o_n < NSEL))


@triton.jit
def _decode_attend(b_q, k, v, p_kv, s_t, lo, hi, b_m, b_l, b_acc, scale_log2,
                   D: tl.constexpr, BN: tl.constexpr):
    """Online-softmax update of (m, l, acc) [BG], [BG], [BG, D] with the tokens lo .. hi - 1."""
    o_n = tl.arange(0, BN)
    o_kd = o_n[:, None] * s_t + tl.arange(0, D)[None, :]                      # [BN, D] int32
    for s0 in range(lo, hi, BN):
        m_k = s0 + o_n < hi                                                   # [BN]
        p_k = p_kv + tl.cast(s0, tl.int64) * s_t + o_kd
        b_k = tl.load(k + p_k, mask=m_k[:, None], other=0.)                   # [BN, D]
        b_v = tl.load(v + p_k, mask=m_k[:, None], other=0.)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2                         # [BG, BN]
        b_m, b_l, b_acc = _softmax_step(b_s, m_k[None, :], b_v, b_m, b_l, b_acc, True)
    return b_m, b_l, b_acc


@triton.jit
def _decode_tokens_kernel(q, k, v, k_win, v_win, lengths, idx, part_m, part_l, part_acc, s_b, s_t,
                          s_h, TMAX, NP, S, NPS, HQ, H, G, NSEL, WINDOW, scale_log2,
                          SPP: tl.constexpr, WPC: tl.constexpr, SBLK: tl.constexpr,
                          D: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr):
    """Piece i_p of one KV head's token attention: selected blocks i_p*SPP .. (tokens s <= t)
    for i_p < NPS, else window tokens (i_p - NPS)*WPC .. of the window (t - w, t], from k_win,
    v_win (k, v themselves unless the window branch has its own; same strides)."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    n_tok = _decode_length(lengths, i_b, TMAX)
    b_q = _decode_query(q, i_b, i_h, HQ, G, D, BG)
    p_kv = i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, D], tl.float32)
    if i_p < NPS:
        for r in tl.static_range(SPP):
            slot = i_p * SPP + r
            j = tl.load(idx + i_bh.to(tl.int64) * NSEL + slot, mask=slot < NSEL, other=-1)
            lo = j * SBLK
            hi = tl.where(j >= 0, tl.minimum(lo + SBLK, n_tok), lo)          # -1 pads: empty
            b_m, b_l, b_acc = _decode_attend(b_q, k, v, p_kv, s_t, lo, hi, b_m, b_l, b_acc,
                                             scale_log2, D, BN)
    else:
        lo = tl.maximum(n_tok - WINDOW, 0) + (i_p - NPS) * WPC
        hi = tl.minimum(lo + WPC, n_tok)
        b_m, b_l, b_acc = _decode_attend(b_q, k_win, v_win, p_kv, s_t, lo, hi, b_m, b_l, b_acc,
                                         scale_log2, D, BN)
    _decode_store_partial(part_m, part_l, part_acc, i_bh * NP + S + i_p, b_m, b_l, b_acc, G,
                          D, BG)


@triton.jit
def _decode_branch_stats(b_mp, b_lp, m_b, b_gate):
    """(max, gate / sum) [BG] of one branch from the pieces' m, l [NPP, BG] where m_b holds."""
    b_mx = tl.max(tl.where(m_b, b_mp, float("-inf")), 0)
    b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_l = tl.sum(tl.where(m_b, b_lp * tl.exp2(b_mp - b_mx[None, :]), 0.), 0)
    return b_mx, tl.where(b_l > 0, b_gate / tl.where(b_l > 0, b_l, 1.), 0.)


@triton.jit
def _decode_merge_add(part_m, part_acc, b_o, p_lo, p_hi, p_base, S, NPS, b_mx_c, b_co_c, b_mx_s,
                      b_co_s, b_mx_w, b_co_w, m_g, o_g, o_gd, G, D: tl.constexpr,
                      BP: tl.constexpr):
    """b_o += the acc rows of pieces p_lo .. p_hi - 1 (of this head), each weighted by its
    branch's gate / sum * 2^(m - branch max); BP pieces per step unrolled, so that their loads
    are in flight together."""
    for p0 in range(p_lo, p_hi, BP):
        for r in tl.static_range(BP):
            p = p0 + r
            m_r = m_g & (p < p_hi)
            p_row = tl.cast(p_base + p, tl.int64) * G
            b_m = tl.load(part_m + p_row + o_g, mask=m_r, other=float("-inf"))   # [BG]
            b_a = tl.load(part_acc + p_row * D + o_gd, mask=m_r[:, None], other=0.)
            b_mx = tl.where(p < S, b_mx_c, tl.where(p < S + NPS, b_mx_s, b_mx_w))
            b_co = tl.where(p < S, b_co_c, tl.where(p < S + NPS, b_co_s, b_co_w))
            b_o += b_a * (b_co * tl.exp2(b_m - b_mx))[:, None]
    return b_o


@triton.jit
def _decode_merge_kernel(lengths, part_m, part_l, part_acc, g_cmp, g_slc, g_win, o, TMAX, NP, S,
                         NPS, HQ, H, G, CH: tl.constexpr, SBLK: tl.constexpr, BJ: tl.constexpr,
                         D: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
                         NPP: tl.constexpr):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win for the G heads of one KV head,
    columns i_d*BD ..; each branch's partials merged (flash-decoding), all branches in one pass
    over the pieces. NaN rows where lengths[b] is outside [1, TMAX]."""
    i_bh, i_d = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    n_raw = tl.load(lengths + i_b).to(tl.int32)
    t = tl.minimum(tl.maximum(n_raw, 1), TMAX) - 1
    n_split = ((t // SBLK) // BJ) // CH + 1                      # compressed pieces written
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    p_row = (i_b * HQ + i_h * G + o_g).to(tl.int64)                            # [BG]
    b_gc = tl.load(g_cmp + p_row, mask=m_g, other=0.).to(tl.float32)
    b_gs = tl.load(g_slc + p_row, mask=m_g, other=0.).to(tl.float32)
    b_gw = tl.load(g_win + p_row, mask=m_g, other=0.).to(tl.float32)

    o_p = tl.arange(0, NPP)
    m_pg = (((o_p < n_split) | (o_p >= S)) & (o_p < NP))[:, None] & m_g[None, :]  # [NPP, BG]
    p_pg = (i_bh * NP + o_p)[:, None].to(tl.int64) * G + o_g[None, :]
    b_mp = tl.load(part_m + p_pg, mask=m_pg, other=float("-inf"))
    b_lp = tl.load(part_l + p_pg, mask=m_pg, other=0.)
    b_mx_c, b_co_c = _decode_branch_stats(b_mp, b_lp, (o_p < S)[:, None], b_gc)
    b_mx_s, b_co_s = _decode_branch_stats(b_mp, b_lp, ((o_p >= S) & (o_p < S + NPS))[:, None],
                                          b_gs)
    b_mx_w, b_co_w = _decode_branch_stats(b_mp, b_lp, (o_p >= S + NPS)[:, None], b_gw)

    o_gd = o_g[:, None] * D + (i_d * BD + tl.arange(0, BD))[None, :]          # [BG, BD]
    b_o = tl.zeros([BG, BD], tl.float32)
    b_o = _decode_merge_add(part_m, part_acc, b_o, 0, n_split, i_bh * NP, S, NPS, b_mx_c, b_co_c,
                            b_mx_s, b_co_s, b_mx_w, b_co_w, m_g, o_g, o_gd, G, D, BP)
    b_o = _decode_merge_add(part_m, part_acc, b_o, S, NP, i_bh * NP, S, NPS, b_mx_c, b_co_c,
                            b_mx_s, b_co_s, b_mx_w, b_co_w, m_g, o_g, o_gd, G, D, BP)
    b_o = tl.where((n_raw < 1) | (n_raw > TMAX), float("nan"), b_o)
    p_o = o + (i_b * HQ + i_h * G).to(tl.int64) * D
    tl.store(p_o + o_gd, b_o.to(o.dtype.element_ty), mask=m_g[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers and public functions.

def _decode_tile(rows, row_bytes, least):
    """Halve a tile of `rows` rows of row_bytes each until it fits 32 KB (not below least)."""
    while rows * row_bytes > 32768 and rows // 2 >= least:
        rows //= 2
    return rows


def _decode_plan(B, H, D, Tmax, elem_bytes, block_len, block_stride, select_block, n_select,
                 window):
    """Static sizes of one decoding step (they depend on shapes only, never on lengths)."""
    tune = DECODE_TUNING
    R, M1 = select_block // block_stride, block_len // block_stride - 1
    BC = _decode_tile(max(tune["cmp_chunk"], triton.next_power_of_2(R + M1), 16), D * elem_bytes,
                      max(16, triton.next_power_of_2(R + M1)))
    BJ = (BC - M1) // R                         # selection blocks owned by one chunk
    NB = triton.cdiv(Tmax, select_block)
    NCH = triton.cdiv(NB, BJ)
    S = min(NCH, tune["cmp_splits"], max(1, triton.cdiv(tune["cmp_programs"], B * H)))
    CH = triton.cdiv(NCH, S)
    S = triton.cdiv(NCH, CH)
    SPP = min(tune["slc_blocks"], n_select)
    NPS = triton.cdiv(n_select, SPP)
    WPC = tune["win_tokens"]
    NW = triton.cdiv(min(window, Tmax), WPC)
    return dict(R=R, M1=M1, BC=BC, BJ=BJ, K=max(16, triton.next_power_of_2(BJ)), NB=NB, NCH=NCH,
                S=S, CH=CH, SPP=SPP, NPS=NPS, WPC=WPC, NW=NW, NP=S + NPS + NW,
                BN=_decode_tile(max(16, tune["tokens"]), D * elem_bytes, 16))


def _decode_warps():
    return 1 if _INTERPRET else DECODE_TUNING["warps"]


def _decode_stages():
    return 1 if _INTERPRET else DECODE_TUNING["stages"]


def _decode_cmp_select(q, k_cmp, v_cmp, lengths, plan, Tmax, block_len, block_stride,
                       select_block, n_select, scale):
    """Launches 1 and 2: returns the partial buffers (compressed splits filled) and idx."""
    B, _, HQ, D = q.shape
    Tcmax, H = k_cmp.shape[1], k_cmp.shape[2]
    G = HQ // H
    BG = max(16, triton.next_power_of_2(G))
    dev = q.device
    NP, NB, NCH = plan["NP"], plan["NB"], plan["NCH"]
    part_m = _alloc((B, H, NP, G), torch.float32, dev)
    part_l = _alloc((B, H, NP, G), torch.float32, dev)
    part_acc = _alloc((B, H, NP, G, D), torch.float32, dev)
    chunk_m = _alloc((B, H, G, NCH), torch.float32, dev)
    chunk_score = _alloc((B, H, G, NB), torch.float32, dev)
    NBP = max(16, triton.next_power_of_2(NB))
    scores = _alloc((B, H, NBP), torch.float32, dev)
    CAP = DECODE_TUNING["select_cap"]
    cand = _alloc((B, H, CAP), torch.int64, dev, fill=-2)
    idx = _alloc((B, H, n_select), torch.int32, dev, fill=-2)
    if Tcmax == 0:                      # nothing is loaded then, but Triton wants a pointer
        k_cmp = v_cmp = q.new_zeros(1, 1, 1, 1)
    s_b, s_t, s_h = k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2)
    _decode_cmp_kernel[(plan["S"], B * H)](
        q, k_cmp, v_cmp, lengths, part_m, part_l, part_acc, chunk_m, chunk_score,
        s_b, s_t, s_h, Tmax, Tcmax, NB, NCH, NP, HQ, H, G, scale * _LOG2E,
        CH=plan["CH"], CBLK=block_len, CSTRIDE=block_stride, SBLK=select_block, D=D, BG=BG,
        BC=plan["BC"], BJ=plan["BJ"], K=plan["K"], num_warps=_decode_warps(),
        num_stages=_decode_stages())
    BJC = min(256, NBP)
    _decode_scores_kernel[(B * H, NBP // BJC)](
        lengths, part_m, part_l, chunk_m, chunk_score, scores, Tmax, NB, NCH, NP, H, G,
        CH=plan["CH"], SBLK=select_block, BJ=plan["BJ"],
        SP=max(16, triton.next_power_of_2(plan["S"])), BG=BG, NBP=NBP, BJC=BJC,
        num_warps=_decode_warps())
    _decode_select_kernel[(B * H,)](
        lengths, scores, cand, idx, Tmax, H, n_select, SBLK=select_block, NBP=NBP,
        NSELP=max(16, triton.next_power_of_2(n_select)),
        NG=min(NBP, max(64, triton.next_power_of_2(n_select))), CAP=CAP, IB=int(math.log2(NBP)),
        num_warps=_decode_warps() * (2 if NBP >= 4096 else 1))
    return part_m, part_l, part_acc, idx


def _decode_forward(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win, lengths,
                    block_len, block_stride, select_block, n_select, window, scale,
                    k_win_cache, v_win_cache):
    B, Tmax, H, D = k_cache.shape
    HQ = q.shape[2]
    G = HQ // H
    BG = max(16, triton.next_power_of_2(G))
    q, g_cmp, g_slc, g_win = (x.contiguous() for x in (q, g_cmp, g_slc, g_win))
    plan = _decode_plan(B, H, D, Tmax, q.element_size(), block_len, block_stride, select_block,
                        n_select, window)
    part_m, part_l, part_acc, idx = _decode_cmp_select(
        q, k_cmp_cache, v_cmp_cache, lengths, plan, Tmax, block_len, block_stride, select_block,
        n_select, scale)
    S, NPS, NP = plan["S"], plan["NPS"], plan["NP"]
    s_b, s_t, s_h = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    _decode_tokens_kernel[(NPS + plan["NW"], B * H)](
        q, k_cache, v_cache, k_win_cache, v_win_cache, lengths, idx, part_m, part_l, part_acc,
        s_b, s_t, s_h, Tmax, NP, S,
        NPS, HQ, H, G, n_select, window, scale * _LOG2E, SPP=plan["SPP"],
        WPC=plan["WPC"], SBLK=select_block, D=D, BG=BG, BN=plan["BN"],
        num_warps=_decode_warps(), num_stages=_decode_stages())
    o = _alloc(q.shape, q.dtype, q.device)
    BD = min(D, DECODE_TUNING["merge_dims"])
    _decode_merge_kernel[(B * H, D // BD)](
        lengths, part_m, part_l, part_acc, g_cmp, g_slc, g_win, o, Tmax, NP, S, NPS, HQ, H, G,
        CH=plan["CH"], SBLK=select_block, BJ=plan["BJ"], D=D, BG=BG, BD=BD,
        BP=DECODE_TUNING["merge_pieces"],
        NPP=max(16, triton.next_power_of_2(NP)), num_warps=_decode_warps())
    return o


def _decode_unsupported(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, k_win_cache,
                        v_win_cache):
    """Why valid inputs cannot take the decode kernels (None if they can)."""
    reason = _kernel_unsupported(q)
    if reason is not None:
        return reason
    for name, a, b in [("k_cache and v_cache", k_cache, v_cache),
                       ("k_cmp_cache and v_cmp_cache", k_cmp_cache, v_cmp_cache),
                       ("k_cache and k_win_cache", k_cache, k_win_cache),
                       ("k_cache and v_win_cache", k_cache, v_win_cache)]:
        if a.stride() != b.stride() or a.stride(3) != 1:
            return (f"the kernels need {name} with equal strides and contiguous head dims, got "
                    f"{a.stride()} and {b.stride()}")
    return None


@torch.compiler.disable  # a torch.compile'd model runs the kernels as they are (graph break)
def nsa_decode(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win, lengths, *,
               block_len=BLOCK_LEN, block_stride=BLOCK_STRIDE, select_block=SELECT_BLOCK,
               n_select=N_SELECT, window=WINDOW, scale=None, k_win_cache=None,
               v_win_cache=None):
    """One NSA decoding step (see the section docstring): q [B, 1, HQ, D], k_cache, v_cache
    [B, Tmax, H, D], k_cmp_cache, v_cmp_cache [B, Tcmax, H, D], g_* [B, 1, HQ], lengths [B],
    k_win_cache, v_win_cache: None or [B, Tmax, H, D] (the window branch's own keys and values)
    -> o [B, 1, HQ, D]. Triton kernels for CUDA tensors (and CPU ones under
    TRITON_INTERPRET=1), else nsa_decode_ref."""
    check_block_sizes(block_len, block_stride, select_block, n_select, window)
    check_decode_inputs(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win,
                        lengths, block_len, block_stride, k_win_cache, v_win_cache)
    # the window's keys and values: its own caches, or the selected branch's
    kw, vw = (k_cache, v_cache) if k_win_cache is None else (k_win_cache, v_win_cache)
    reason = _decode_unsupported(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, kw, vw)
    if reason is None:
        return _decode_forward(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc,
                               g_win, lengths, block_len, block_stride, select_block, n_select,
                               window, _default_scale(q, scale), kw, vw)
    if q.is_cuda:
        _warn_once(f"nsa_decode: {reason}; using the (slow, host-syncing) PyTorch reference")
    return nsa_decode_ref(q, k_cache, v_cache, k_cmp_cache, v_cmp_cache, g_cmp, g_slc, g_win,
                          lengths, block_len=block_len, block_stride=block_stride,
                          select_block=select_block, n_select=n_select, window=window,
                          scale=scale, k_win_cache=k_win_cache, v_win_cache=v_win_cache)


def nsa_decode_select(q, k_cache, k_cmp_cache, lengths, *, block_len=BLOCK_LEN,
                      block_stride=BLOCK_STRIDE,
                      select_block=SELECT_BLOCK, n_select=N_SELECT, scale=None):
    """The selection blocks nsa_decode's kernels choose (for tests and benchmarks): int32
    [B, H, n], in increasing block order, -1 pads. k_cache only gives Tmax."""
    check_block_sizes(block_len, block_stride, select_block, n_select, 1)
    B, _, HQ, _ = q.shape
    g = q.new_zeros(B, 1, HQ)
    check_decode_inputs(q, k_cache, k_cache, k_cmp_cache, k_cmp_cache, g, g, g, lengths,
                        block_len, block_stride)
    reason = _decode_unsupported(q, k_cache, k_cache, k_cmp_cache, k_cmp_cache, k_cache, k_cache)
    if reason is not None:
        raise ValueError(f"nsa_decode_select runs the kernels only: {reason}")
    B, Tmax, H, D = k_cache.shape
    plan = _decode_plan(B, H, D, Tmax, q.element_size(), block_len, block_stride, select_block,
                        n_select, 1)
    return _decode_cmp_select(q.contiguous(), k_cmp_cache, k_cmp_cache, lengths, plan, Tmax,
                              block_len, block_stride, select_block, n_select,
                              _default_scale(q, scale))[3]
