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
  cache and the kernels read one K/V stream.
- RoPE and compression. Compressing rotated keys would average vectors rotated at l different
  angles. We compress the un-rotated keys of a block (plus a learned intra-block position
  embedding) with the MLP φ, then rotate the compressed key at the block's centre, i*d + (l-1)/2,
  so a query at t sees the block at its relative distance. Values are not rotated.
"""
import inspect
import math
from dataclasses import dataclass

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
    block_len: int = 32          # l: tokens per compression block
    block_stride: int = 16       # d: stride between compression blocks
    select_block: int = 64       # l': tokens per selection block
    n_select: int = 16           # n: selected blocks per query, counting 1 initial + 2 local
    window: int = 512            # w: sliding-window length
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


def rope(x, pos, base):
    """Rotate x: [B, T, H, D] at the (possibly fractional) positions pos: [T] (RoFormer)."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.float()[:, None] * inv_freq[None, :]                        # [T, D/2]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Decoding state of every layer: per layer a dict of tensors preallocated for the whole
    context, filled up to `length` tokens (and the number of completed compression blocks)."""

    def __init__(self, n_layer, max_len):
        self.layers = [dict() for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def append(self, layer, name, x, start):
        """Write x: [B, n, ...] at [start, start + n) of buffer `name`; return the filled part."""
        store = self.layers[layer]
        if name not in store:
            store[name] = x.new_empty(x.shape[0], self.max_len, *x.shape[2:])
        store[name][:, start:start + x.shape[1]] = x
        return store[name][:, :start + x.shape[1]]


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
            self.block_pos = nn.Parameter(torch.zeros(2, l, D))
            self.phi_k = nn.Sequential(nn.Linear(l * D, D), nn.GELU(), nn.Linear(D, D))
            self.phi_v = nn.Sequential(nn.Linear(l * D, D), nn.GELU(), nn.Linear(D, D))
            # gates (paper Eq. 5): sigmoid of a linear map of the block input, per head and branch
            self.c_gate = nn.Linear(config.n_embd, 3 * HQ, bias=True)

    def compress(self, x, phi, block_pos):
        """x: [B, T, H, D] raw keys or values -> [B, Tc, H, D], one per complete block."""
        cfg = self.config
        B, T, H, D = x.shape
        if T < cfg.block_len:
            return x.new_zeros(B, 0, H, D)
        blocks = x.unfold(1, cfg.block_len, cfg.block_stride).transpose(-1, -2)  # [B, Tc, H, l, D]
        return phi((blocks + block_pos.to(x.dtype)).flatten(-2))

    def forward(self, x, cache=None):
        cfg = self.config
        B, T, _ = x.shape
        H, HQ, D = cfg.n_kv_head, cfg.n_head, cfg.head_dim
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + T, device=x.device)
        q = rope(self.c_q(x).view(B, T, HQ, D), pos, cfg.rope_base)
        k, v = self.c_kv(x).view(B, T, 2, H, D).unbind(2)
        k = rope(k, pos, cfg.rope_base)
        if cache is not None:
            k = cache.append(self.layer, "k", k, start)
            v = cache.append(self.layer, "v", v, start)
        if cfg.attention == "full":
            y = self.full_attention(q, k, v)
        else:
            y = self.nsa(x, q, k, v, cache, start)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, HQ * D)))

    def full_attention(self, q, k, v):
        """q: [B, Tq, HQ, D] are the last Tq of k, v: [B, T, H, D]'s positions."""
        Tq, T = q.shape[1], k.shape[1]
        mask = None
        if 1 < Tq < T:  # chunk after a cache: causal, aligned at the bottom right
            mask = torch.ones(Tq, T, dtype=torch.bool, device=q.device).tril(T - Tq)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, is_causal=(Tq == T and Tq > 1),
                                           enable_gqa=True)
        return y.transpose(1, 2)

    def nsa(self, x, q, k, v, cache, start):
        cfg = self.config
        B, T, _ = x.shape
        H, HQ, D = cfg.n_kv_head, cfg.n_head, cfg.head_dim
        l, d = cfg.block_len, cfg.block_stride
        k_raw, v_raw = self.c_kv_cmp(x).view(B, T, 2, H, D).unbind(2)
        done = nk.num_compressed_blocks(start, l, d)         # blocks already compressed
        if cache is not None:  # compress only the blocks this step completes
            k_raw = cache.append(self.layer, "k_raw", k_raw, start)[:, done * d:]
            v_raw = cache.append(self.layer, "v_raw", v_raw, start)[:, done * d:]
        k_cmp = self.compress(k_raw, self.phi_k, self.block_pos[0])
        v_cmp = self.compress(v_raw, self.phi_v, self.block_pos[1])
        centre = (torch.arange(done, done + k_cmp.shape[1], device=x.device) * d + (l - 1) / 2)
        k_cmp = rope(k_cmp, centre, cfg.rope_base)
        if cache is not None:
            k_cmp = cache.append(self.layer, "k_cmp", k_cmp, done)
            v_cmp = cache.append(self.layer, "v_cmp", v_cmp, done)
        g_cmp, g_slc, g_win = torch.sigmoid(self.c_gate(x)).to(q.dtype).view(B, T, 3, HQ).unbind(2)
        kwargs = dict(block_len=l, block_stride=d, select_block=cfg.select_block,
                      n_select=cfg.n_select, window=cfg.window)
        args = (q, k.contiguous(), v.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(),
                g_cmp.contiguous(), g_slc.contiguous(), g_win.contiguous())
        if start == 0:  # training and prefill: the Triton kernels on a GPU
            return nk.nsa_attention(*args, **kwargs)
        return nk.nsa_attention_ref(*args, **kwargs)  # decoding after a cache: queries at the end


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

    def forward(self, idx, targets=None, cache=None):
        """idx: [B, T] token ids. With targets: (logits [B, T, V], mean cross-entropy loss);
        without: (logits of the last position [B, 1, V], None). A KVCache makes idx the next T
        tokens after the cached ones and extends the cache."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None

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
        counting the work NSA really does: compressed blocks + top-n scoring (a second q·k_cmp)
        + selected tokens + window; full attention: causal, (T + 1) / 2."""
        cfg = self.config
        t = torch.arange(T, dtype=torch.float64)
        if cfg.attention == "full":
            return float((t + 1).mean())
        visible_blocks = ((t + 1 - cfg.block_len) // cfg.block_stride + 1).clamp(min=0)
        selected = torch.minimum(t + 1, torch.full_like(t, cfg.n_select * cfg.select_block))
        window = torch.minimum(t + 1, torch.full_like(t, cfg.window))
        # scoring recomputes only q·k_cmp (half of a compressed attention's matmul work)
        return float((1.5 * visible_blocks + selected + window).mean())

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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens tokens after idx: [B, T] with a KV cache: the prompt is
        prefilled once, then each step feeds one token; NSA appends a compressed key/value as
        soon as a compression block completes. When the context fills up, the cache restarts
        from the last half of it."""
        if max_new_tokens <= 0:
            return idx
        block_size = self.config.block_size
        cache = KVCache(self.config.n_layer, block_size)
        feed = idx[:, -block_size:]
        for _ in range(max_new_tokens):
            if cache.length + feed.size(1) > block_size:  # context full: restart from its last half
                cache = KVCache(self.config.n_layer, block_size)
                feed = idx[:, -max(1, block_size // 2):]
            logits, _ = self(feed, cache=cache)
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
            feed = idx_next
        return idx
