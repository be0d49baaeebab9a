"""
nanoNSA's GPT: nanoGPT with DeepSeek's Native Sparse Attention (NSA, arXiv 2502.11089) or, for
comparison, full causal attention; everything else is identical between the two.

    from model import GPTConfig, GPT
    model = GPT(GPTConfig(attention="nsa", block_size=8192, n_head=16, n_kv_head=1))
    logits, loss = model(idx, targets)
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)

Design choices (the paper leaves these open or we depart from it; each is one place to edit):
- K/V sharing. The paper gives each branch its own keys and values (§3.3.3, against shortcut
  learning between branches). Here the compressed branch has its own K/V projection, because
  its keys also score blocks for selection, a different job from token-level matching; the
  selected and window branches share one K/V projection, so decoding keeps one token-level KV
  cache and the kernels read one K/V stream. `own_window_kv=True` gives the window branch its
  own projection, as the paper does (issue 12 asks whether retrieval needs it), at the cost of
  a second token-level cache.
- RoPE and compression. Compressing rotated keys would average vectors rotated at l different
  angles. We compress the un-rotated keys of a block (plus a learned intra-block position
  embedding) with the MLP φ, then rotate the compressed key at the block's centre, i*d + (l-1)/2,
  so a query at t sees the block at its relative distance. Values are not rotated.
"""
import inspect
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import nsa_kernels as nk


@dataclass
class GPTConfig:
    block_size: int = 1024       # context length in tokens (nanoGPT's name)
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 16             # query heads
    n_kv_head: int = 1           # key/value heads; G = n_head // n_kv_head query heads share one
    n_embd: int = 1024
    dropout: float = 0.0
    bias: bool = False
    attention: str = "nsa"       # "nsa" or "full"
    # NSA's block sizes, defaulting to the paper's (nk.PAPER_HP)
    block_len: int = nk.PAPER_HP["block_len"]          # l: tokens per compression block
    block_stride: int = nk.PAPER_HP["block_stride"]    # d: stride between compression blocks
    select_block: int = nk.PAPER_HP["select_block"]    # l': tokens per selection block
    n_select: int = nk.PAPER_HP["n_select"]            # n: selected blocks (1 initial + 2 local)
    window: int = nk.PAPER_HP["window"]                # w: sliding-window length
    own_window_kv: bool = False  # NSA: the window branch projects its own K/V (see the docstring)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.attention not in ("nsa", "full"):
            raise ValueError(f"attention must be 'nsa' or 'full', got {self.attention!r}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head_dim = n_embd / n_head = {self.n_embd // self.n_head} must be "
                             f"even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention == "nsa":
            nk.check_block_sizes(self.block_len, self.block_stride, self.select_block,
                                 self.n_select, self.window)

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def dense_warnings(self):
        """Messages for NSA settings under which a branch is not sparse at this block_size
        (NSA then costs more than full attention for the same result); [] if none."""
        if self.attention != "nsa":
            return []
        T, out = self.block_size, []
        n = nsa_key_counts(T, self.block_len, self.block_stride, self.select_block,
                           self.n_select, self.window)
        keys = (f"a query attends to {n['compressed'] / T:.0f} compressed + "
                f"{n['selected'] / T:.0f} selected + {n['window'] / T:.0f} window keys on "
                f"average, against {n['causal'] / T:.0f} for full attention")
        if T < self.block_len:
            out.append(f"block_size ({T}) < block_len ({self.block_len}): no compression block "
                       f"ever completes, so selection sees only its forced blocks; {keys}")
        if self.n_select * self.select_block >= T:
            out.append(f"n_select * select_block = {self.n_select * self.select_block} >= "
                       f"block_size ({T}): the selected branch is full attention; {keys}")
        if self.window >= T:
            out.append(f"window ({self.window}) >= block_size ({T}): the window branch is full "
                       f"attention; {keys}")
        return out


def rope(x, pos, base):
    """Rotate x: [B, T, H, D] at the (possibly fractional) positions pos: [T], or [B, T] when
    each sequence has its own (RoFormer)."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.float()[..., None, None] * inv_freq                         # [(B,) T, 1, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def nsa_key_counts(T, block_len, block_stride, select_block, n_select, window):
    """Keys each NSA branch attends to, summed over the query positions t = 0 .. T-1 (per
    sequence and query head), exactly as nsa_attention_ref's masks define them:
      compressed: blocks i with i*d + l <= t + 1             max(0, (t + 1 - l) // d + 1)
      selected:   tokens s <= t of the n chosen blocks; all are whole but the current one,
                  which holds t % l' + 1 tokens               min(t + 1, (n-1)*l' + t % l' + 1)
      window:     t - w < s <= t                              min(w, t + 1)
      causal:     s <= t (full attention)                     t + 1"""
    t = torch.arange(T, dtype=torch.int64)
    compressed = ((t + 1 - block_len).div(block_stride, rounding_mode="floor") + 1).clamp(min=0)
    selected = torch.minimum(t + 1, (n_select - 1) * select_block + t % select_block + 1)
    return {"compressed": int(compressed.sum()), "selected": int(selected.sum()),
            "window": int((t + 1).clamp(max=window).sum()), "causal": T * (T + 1) // 2}


class KVCache:
    """Decoding state of every layer, preallocated for max_len tokens per sequence at the
    prefill: keys and values (as full attention keeps them) and, with NSA, the compressed keys
    and values plus a ring of the last block_len raw keys/values of the compressed branch, all a
    future compression block needs (so NSA costs full attention's cache plus 1/d of it, plus
    the ring; with own_window_kv, plus the window branch's keys and values). lengths: int32
    [B] on the device, tokens held per sequence (the kernels read it); host_lengths: the same
    as a list, for bookkeeping without device syncs."""

    def __init__(self, n_layer, max_len):
        self.layers = [dict() for _ in range(n_layer)]
        self.max_len = max_len
        self.lengths = None
        self.host_lengths = None
        self.static = False   # set by DecodeGraph: decoding steps read no host values
        self.compress = True  # static steps: whether this step's graph compresses blocks

    def allocate(self, layer, name, like, length):
        """A zeroed buffer `name` of layer: like's shape with dim 1 replaced by length."""
        store = self.layers[layer]
        store[name] = like.new_zeros(like.shape[0], length, *like.shape[2:])
        return store[name]

    def completing(self, block_len, block_stride):
        """The sequences whose next token completes a compression block (its last token)."""
        return [b for b, n in enumerate(self.host_lengths)
                if n + 1 >= block_len and (n + 1 - block_len) % block_stride == 0]

    def nbytes_per_token(self):
        """Bytes of cache per token of context, summed over layers (the ring is not per token)."""
        total = sum(t.numel() * t.element_size() for store in self.layers
                    for name, t in store.items() if not name.startswith("ring"))
        return total / (self.max_len * self.layers[0]["k"].shape[0])


class DecodeGraph:
    """One decoding step of `model` captured in a CUDA graph and replayed per token: a step
    of a small batch is hundreds of tiny kernels, bound by launch overhead rather than by the
    GPU (as gpt-fast and vLLM do). Needs a prefilled cache on a CUDA device; the step then
    reads no host values (cache.static), so one capture serves every later step. NSA gets two
    graphs: one that also compresses the blocks the step completes, replayed when some
    sequence completes one (every d-th step when the lengths are equal), and one that does
    not, which skips φ's dozens of small kernels on the other steps.
    Usage: step = DecodeGraph(model, cache); logits, _ = step(next_tokens [B, 1])."""

    def __init__(self, model, cache):
        if cache.lengths is None or not cache.lengths.is_cuda:
            raise ValueError("DecodeGraph needs a cache prefilled on a CUDA device")
        self.cache, self.config, cache.static = cache, model.config, True
        self.tokens = torch.zeros(len(cache.host_lengths), 1, dtype=torch.long,
                                  device=cache.lengths.device)
        lengths, host = cache.lengths.clone(), list(cache.host_lengths)
        self.graphs, self.logits, pool = {}, {}, None
        for compress in ((False, True) if model.config.attention == "nsa" else (True,)):
            cache.compress = compress
            # warm-up (Triton compilation) on a side stream, as torch.cuda.graph asks; its
            # writes land past each sequence's end, where the real steps overwrite them
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(self.tokens, cache=cache)
            torch.cuda.current_stream().wait_stream(stream)
            cache.lengths.copy_(lengths)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[compress], _ = model(self.tokens, cache=cache)
            self.graphs[compress], pool = graph, graph.pool()
            cache.host_lengths = list(host)  # capturing ran the Python bookkeeping only

    def __call__(self, tokens):
        cache = self.cache
        if max(cache.host_lengths) + 1 > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens and is full")
        compress = len(self.graphs) == 1 or bool(
            cache.completing(self.config.block_len, self.config.block_stride))
        self.tokens.copy_(tokens)
        self.graphs[compress].replay()
        cache.host_lengths = [n + 1 for n in cache.host_lengths]
        return self.logits[compress], None


class Attention(nn.Module):
    """Grouped-query causal attention: NSA's three gated branches, or full attention (SDPA)."""

    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        H, HQ, D = config.n_kv_head, config.n_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, HQ * D, bias=config.bias)
        self.c_kv = nn.Linear(config.n_embd, 2 * H * D, bias=config.bias)
        self.c_proj = nn.Linear(HQ * D, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.attention == "nsa":
            l = config.block_len
            # The compressed branch's own keys/values, and φ (paper Eq. 7): an MLP over the l
            # keys (values) of a block plus an intra-block position embedding, applied per head.
            self.c_kv_cmp = nn.Linear(config.n_embd, 2 * H * D, bias=config.bias)
            if config.own_window_kv:
                self.c_kv_win = nn.Linear(config.n_embd, 2 * H * D, bias=config.bias)
            self.block_pos = nn.Parameter(torch.zeros(2, l, D))
            self.phi_k = nn.Sequential(nn.Linear(l * D, D), nn.GELU(), nn.Linear(D, D))
            self.phi_v = nn.Sequential(nn.Linear(l * D, D), nn.GELU(), nn.Linear(D, D))
            # gates (paper Eq. 5): sigmoid of a linear map of the block input, per head and branch
            self.c_gate = nn.Linear(config.n_embd, 3 * HQ, bias=True)

    def project(self, x, pos):
        """Everything attention needs from x: [B, T, C] at positions pos ([T] or [B, T]):
        q [B, T, HQ, D] and k, v [B, T, H, D] (RoPE applied to q and k); with NSA also the
        compressed branch's raw keys and values k_raw, v_raw [B, T, H, D] (not rotated), the
        gates g_cmp, g_slc, g_win [B, T, HQ], and the window branch's own (k_win, v_win) with
        own_window_kv (rotated; else None). Full attention: None for all but q, k, v."""
        cfg = self.config
        B, T, _ = x.shape
        H, HQ, D = cfg.n_kv_head, cfg.n_head, cfg.head_dim
        if torch.is_autocast_enabled(x.device.type):
            # cast once: autocast would give each projection of x its own copy, and each copy
            # is held for the backward (four with NSA: q, kv, the compressed kv and the gates)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        q = rope(self.c_q(x).view(B, T, HQ, D), pos, cfg.rope_base)
        k, v = self.c_kv(x).view(B, T, 2, H, D).unbind(2)
        k = rope(k, pos, cfg.rope_base)
        if cfg.attention == "full":
            return q, k, v, None, None, None, None
        k_raw, v_raw = self.c_kv_cmp(x).view(B, T, 2, H, D).unbind(2)
        gates = torch.sigmoid(self.c_gate(x)).to(q.dtype).view(B, T, 3, HQ).unbind(2)
        kv_win = None
        if cfg.own_window_kv:
            k_win, v_win = self.c_kv_win(x).view(B, T, 2, H, D).unbind(2)
            kv_win = rope(k_win, pos, cfg.rope_base), v_win
        return q, k, v, k_raw, v_raw, gates, kv_win

    def compress(self, k_raw, v_raw):
        """Raw keys/values [B, T, H, D] -> (k_cmp, v_cmp) [B, Tc, H, D], one per complete
        compression block i (tokens [i*d, i*d + l))."""
        cfg = self.config
        l, d = cfg.block_len, cfg.block_stride
        B, T, H, D = k_raw.shape
        Tc = nk.num_compressed_blocks(T, l, d)
        if Tc == 0:
            empty = k_raw.new_zeros(B, 0, H, D)
            return empty, empty

        def blocks(x):                                                        # [B * Tc, l, H, D]
            return x.unfold(1, l, d).permute(0, 1, 4, 2, 3).reshape(B * Tc, l, H, D)

        block = torch.arange(Tc, device=k_raw.device).repeat(B)
        k_cmp, v_cmp = self.compress_blocks(blocks(k_raw), blocks(v_raw), block)
        return k_cmp.view(B, Tc, H, D), v_cmp.view(B, Tc, H, D)

    def forward(self, x, cache=None):
        """x: [B, T, C]. Without a cache: training (all T positions). With a fresh cache: the
        prefill (it is filled with the T tokens, per-sequence lengths already in cache.lengths);
        after it: one decoding step (T = 1) per call."""
        cfg = self.config
        B, T, _ = x.shape
        decoding = cache is not None and "k" in cache.layers[self.layer]
        pos = cache.lengths.long()[:, None] if decoding else torch.arange(T, device=x.device)
        q, k, v, k_raw, v_raw, gates, kv_win = self.project(x, pos)
        k_win, v_win = kv_win or (None, None)
        k_cmp = v_cmp = None
        if decoding:
            y = self.decode(cache, q, k, v, k_raw, v_raw, gates, k_win, v_win)
        elif cfg.attention == "full":
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=T > 1,
                                               enable_gqa=True).transpose(1, 2)
        else:
            k_cmp, v_cmp = self.compress(k_raw, v_raw)
            y = nk.nsa_attention(q, k, v, k_cmp, v_cmp, *gates, **self.nsa_hp(), k_win=k_win,
                                 v_win=v_win)
        if cache is not None and not decoding:
            self.prefill(cache, k, v, k_raw, v_raw, k_cmp, v_cmp, k_win, v_win)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, -1)))

    def nsa_hp(self):
        cfg = self.config
        return dict(block_len=cfg.block_len, block_stride=cfg.block_stride,
                    select_block=cfg.select_block, n_select=cfg.n_select, window=cfg.window)

    def prefill(self, cache, k, v, k_raw, v_raw, k_cmp, v_cmp, k_win, v_win):
        """Fill the cache from a prompt [B, T] whose sequence b holds cache.host_lengths[b]
        tokens (the rest is padding that decoding overwrites)."""
        cfg, T = self.config, k.shape[1]
        cache.allocate(self.layer, "k", k, cache.max_len)[:, :T] = k
        cache.allocate(self.layer, "v", v, cache.max_len)[:, :T] = v
        if cfg.attention == "full":
            return
        if k_win is not None:
            cache.allocate(self.layer, "k_win", k_win, cache.max_len)[:, :T] = k_win
            cache.allocate(self.layer, "v_win", v_win, cache.max_len)[:, :T] = v_win
        l, d = cfg.block_len, cfg.block_stride
        n_cmp = nk.num_compressed_blocks(cache.max_len, l, d) + 1   # + a spare row (static)
        cache.allocate(self.layer, "k_cmp", k_raw, n_cmp)[:, :k_cmp.shape[1]] = k_cmp
        cache.allocate(self.layer, "v_cmp", v_raw, n_cmp)[:, :v_cmp.shape[1]] = v_cmp
        # the ring holds token s at slot s % l: the last l tokens of each sequence
        ring_k = cache.allocate(self.layer, "ring_k", k_raw, l)
        ring_v = cache.allocate(self.layer, "ring_v", v_raw, l)
        for b, n in enumerate(cache.host_lengths):
            s = torch.arange(max(0, n - l), n, device=k_raw.device)
            ring_k[b, s % l], ring_v[b, s % l] = k_raw[b, s], v_raw[b, s]

    def decode(self, cache, q, k, v, k_raw, v_raw, gates, k_win, v_win):
        """One decoding step: store the new token at position lengths[b] of each sequence,
        compress the block it completes, attend. With cache.static (CUDA graphs) nothing reads
        host values: full attention masks the whole cache, and NSA runs φ on every sequence's
        newest block and stores it only where it is complete (elsewhere into a spare row);
        otherwise φ runs on the completed blocks alone."""
        cfg, store = self.config, cache.layers[self.layer]
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)
        t = cache.lengths.long()                                              # [B] positions
        store["k"][rows, t], store["v"][rows, t] = k[:, 0], v[:, 0]
        if k_win is not None:
            store["k_win"][rows, t], store["v_win"][rows, t] = k_win[:, 0], v_win[:, 0]
        new_lengths = cache.lengths + 1
        if cfg.attention == "full":
            T = cache.max_len if cache.static else max(cache.host_lengths) + 1
            mask = None
            if cache.static or min(cache.host_lengths) + 1 < T:  # hide each row's padding
                mask = (torch.arange(T, device=q.device) < new_lengths[:, None])[:, None, None]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), store["k"][:, :T].transpose(1, 2),
                store["v"][:, :T].transpose(1, 2), attn_mask=mask, enable_gqa=True)
            return y.transpose(1, 2)
        l, d = cfg.block_len, cfg.block_stride
        store["ring_k"][rows, t % l], store["ring_v"][rows, t % l] = k_raw[:, 0], v_raw[:, 0]
        first = new_lengths.long() - l            # [B] the start of the block ending here
        if cache.static and not cache.compress:
            sel = rows[:0]   # no sequence completes a block this step (DecodeGraph knows)
        elif cache.static:   # every row; an incomplete block goes to the spare row
            complete = (first >= 0) & (first % d == 0)
            sel, block = rows, torch.where(complete, first // d, store["k_cmp"].shape[1] - 1)
        else:
            sel = torch.tensor(cache.completing(l, d), dtype=torch.long, device=q.device)
            block = first[sel] // d
        if sel.numel():
            slots = (first[sel, None] + torch.arange(l, device=q.device)) % l  # [n, l] in order
            k_cmp, v_cmp = self.compress_blocks(store["ring_k"][sel[:, None], slots],
                                                store["ring_v"][sel[:, None], slots], block)
            store["k_cmp"][sel, block], store["v_cmp"][sel, block] = k_cmp, v_cmp
        return nk.nsa_decode(q, store["k"], store["v"], store["k_cmp"], store["v_cmp"], *gates,
                             new_lengths, **self.nsa_hp(), k_win_cache=store.get("k_win"),
                             v_win_cache=store.get("v_win"))

    def compress_blocks(self, k_blocks, v_blocks, block):
        """φ on whole blocks: [n, l, H, D] raw keys/values of compression blocks `block` [n]
        -> (k_cmp, v_cmp) [n, H, D], the key rotated at its block's centre."""
        cfg = self.config
        l, d = cfg.block_len, cfg.block_stride

        def phi(x, mlp, block_pos):
            x = x.transpose(1, 2) + block_pos.to(x.dtype)                     # [n, H, l, D]
            return mlp(x.flatten(-2))                                         # [n, H, D]

        k_cmp = phi(k_blocks, self.phi_k, self.block_pos[0])
        v_cmp = phi(v_blocks, self.phi_v, self.block_pos[1])
        centre = block * d + (l - 1) / 2
        return rope(k_cmp[:, None], centre[:, None], cfg.rope_base)[:, 0], v_cmp

    @torch.no_grad()
    def selection(self, x, t):
        """The selection blocks the query at position t picks (NSA only): x [B, T, C] is this
        layer's input for positions 0 .. T-1 (T > t) -> (selected: bool [B, H, NB], the blocks'
        scores [B, H, NB]), NB = ceil((t + 1) / l')."""
        cfg = self.config
        B, H = x.shape[0], cfg.n_kv_head
        q, _, _, k_raw, v_raw, _, _ = self.project(x[:, :t + 1],
                                                   torch.arange(t + 1, device=x.device))
        k_cmp, _ = self.compress(k_raw, v_raw)
        p_cmp = nk.compressed_probs_ref(q[:, t:], k_cmp, cfg.block_len, cfg.block_stride,
                                        cfg.head_dim ** -0.5, q_start=t)     # [B, HQ, 1, Tc]
        selected, score = nk.select_blocks_ref(p_cmp.view(B, H, -1, 1, p_cmp.shape[-1]), t + 1,
                                               cfg.block_len, cfg.block_stride, cfg.select_block,
                                               cfg.n_select, q_start=t)
        return selected[:, :, 0], score[:, :, 0]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = Attention(config, layer)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


def sample_next(logits, temperature=1.0, top_k=None):
    """logits: [B, T, V] -> [B, 1] token ids drawn from softmax(logits[:, -1] / temperature),
    limited to the top_k likeliest (None or 0: all)."""
    logits = logits[:, -1, :].float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits[logits < kth] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.RMSNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the tied embedding counts once, and not at all if non_embedding
        (RoPE has no position table to subtract)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, cache=None, lengths=None):
        """idx: [B, T] token ids. With targets: (logits [B, T, V], mean cross-entropy loss,
        targets -1 ignored); without: (logits of each sequence's last position [B, 1, V], None).
        With a KVCache: a fresh cache is filled by this call (the prefill; lengths [B] gives
        each row's prompt length when rows are right-padded, default T), and every later call
        is one decoding step, idx: [B, 1] the next token of each sequence."""
        B, T = idx.shape
        if cache is not None and cache.lengths is not None:
            if T != 1:
                raise ValueError(f"after the prefill, feed one token per sequence, got {T}")
            if max(cache.host_lengths) + 1 > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} tokens and is full")
        elif T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        elif cache is not None:
            host = [T] * B if lengths is None else [int(n) for n in lengths]
            if len(host) != B or not all(1 <= n <= T for n in host):
                raise ValueError(f"lengths must be B={B} values in [1, {T}], got {host}")
            cache.host_lengths = host
        x = self.transformer.drop(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        if cache is not None and cache.lengths is None:   # prefill done
            last = torch.tensor(cache.host_lengths, device=idx.device) - 1
            cache.lengths = last.to(torch.int32) + 1
            x = x[torch.arange(B, device=idx.device), last][:, None]
        elif cache is not None:                            # one more token per sequence
            cache.lengths += 1
            cache.host_lengths = [n + 1 for n in cache.host_lengths]
        return self.lm_head(x[:, -1:, :]), None

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices (and embeddings) decay, vectors (biases, norms, gates' bias) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))

    def attention_keys_per_token(self, T):
        """Mean number of keys (and values) a query attends to per head in a length-T sequence,
        counting the work NSA really does: compressed blocks + top-n scoring (a second q·k_cmp,
        half a compressed attention) + selected tokens + window; full attention: (T + 1) / 2."""
        cfg = self.config
        if cfg.attention == "full":
            return (T + 1) / 2
        n = nsa_key_counts(T, cfg.block_len, cfg.block_stride, cfg.select_block, cfg.n_select,
                           cfg.window)
        return (1.5 * n["compressed"] + n["selected"] + n["window"]) / T

    def flops_per_token(self, T):
        """Training FLOPs per token (fwd + bwd = 3x fwd) at context T: 6 per matmul parameter
        (the tied embedding counts once, as the LM head),
        φ's parameters once per compressed block and KV head, and attention's 4*D per key per
        query head forward (q·k and p·v)."""
        cfg = self.config
        n_phi = sum(p.numel() for n, p in self.named_parameters() if ".phi_" in n)
        n_dense = self.get_num_params(non_embedding=False) - n_phi  # lm_head is a matmul
        phi = 6 * n_phi * cfg.n_kv_head / cfg.block_stride
        attn = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * self.attention_keys_per_token(T)
        return 6 * n_dense + phi + attn

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: fraction of peak_flops (the GPU's dense bf16 rate) achieved
        by fwdbwd_per_iter sequences of block_size tokens in dt seconds."""
        T = self.config.block_size
        return self.flops_per_token(T) * T * fwdbwd_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, lengths=None,
                 cuda_graph=False):
        """Sample max_new_tokens tokens after each prompt with a KV cache. idx: [B, T]; with
        lengths [B], row b's prompt is idx[b, :lengths[b]] (right-padded). The prompts are
        prefilled in one pass (NSA's training kernels), then each step feeds one token per
        sequence; NSA compresses a block the step it completes. Returns [B, T + max_new_tokens]:
        row b holds its prompt, then its new tokens, then padding (zeros). When a sequence
        reaches block_size tokens, the cache restarts from the last half of each sequence.
        cuda_graph: replay each decoding step from a CUDA graph (DecodeGraph)."""
        B, T = idx.shape
        n = [T] * B if lengths is None else [int(x) for x in lengths]
        if T > self.config.block_size:
            raise ValueError(f"prompt of {T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        out = torch.zeros(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        rows = torch.arange(B, device=idx.device)
        cache, keep = None, T
        for _ in range(max_new_tokens):
            if cache is None:  # prefill the last `keep` tokens of every sequence
                prompt = torch.stack([out[b, max(0, n[b] - keep):][:keep] for b in range(B)])
                cache = KVCache(self.config.n_layer, self.config.block_size)
                logits, _ = self(prompt, cache=cache, lengths=[min(x, keep) for x in n])
                step = DecodeGraph(self, cache) if cuda_graph else partial(self, cache=cache)
            else:
                logits = step(out[rows, torch.tensor(n, device=idx.device) - 1][:, None])[0]
            idx_next = sample_next(logits, temperature, top_k)
            out[rows, torch.tensor(n, device=idx.device)] = idx_next[:, 0]
            n = [x + 1 for x in n]
            if max(cache.host_lengths) + 1 > self.config.block_size:
                cache, keep = None, max(1, self.config.block_size // 2)  # full: restart
        return out
