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

import torch


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


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, *, block_len=32, block_stride=16,
                  select_block=64, n_select=16, window=512, scale=None):
    """NSA forward with autograd. Same arguments, shapes and semantics as nsa_attention_ref:
    q: [B, T, HQ, D], k, v: [B, T, H, D], k_cmp, v_cmp: [B, Tc, H, D], g_*: [B, T, HQ]."""
    return nsa_attention_ref(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, block_len=block_len,
                             block_stride=block_stride, select_block=select_block,
                             n_select=n_select, window=window, scale=scale)
