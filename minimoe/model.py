"""The Aquila decoder: the LLaMA architecture with QKV bias (AquilaMoE Table 3, arXiv 2408.06567).

RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU MLP, repeated, then a final
RMSNorm and the LM head. The MLP is a slot: Scale-Out puts an `MoE` (minimoe/moe.py) there.
Architecture only; weight names follow transformers' LlamaForCausalLM: interop is a renaming."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minimoe.config import ModelConfig
from minimoe.moe import MLP, MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even under bf16 autocast, as LLaMA does, for a stable variance
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(cfg: ModelConfig, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (T, head_dim), in LLaMA's half-split layout."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle. x: (B, nh, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of every position so far, per layer, for `max_len` positions (as
    gpt-fast's). Left-padded prompts: row b begins with pad_B[b] positions no real token sees,
    and its real tokens take rotary positions 0, 1, ... as they would alone."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, pad_B=None,
                 device=None, dtype=torch.float32):
        assert max_len <= cfg.max_seq_len, (max_len, cfg.max_seq_len)  # generate() checks it
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.cos, self.sin = rope_tables(cfg, max_len, device)
        self.pad_B = torch.zeros(batch_size, dtype=torch.long, device=device) if pad_B is None \
            else torch.as_tensor(pad_B, device=device)
        self.padded = bool(self.pad_B.any())
        self.max_len, self.length = max_len, 0  # positions allocated, positions filled
        self.attn_mask, self.is_causal = None, False  # what the current step's queries see

    def start_step(self, T: int):
        """Prepare a forward of T new positions: their rotary tables, and which keys they see."""
        assert self.length + T <= self.max_len, (self.length + T, self.max_len)
        start, L, device = self.length, self.length + T, self.cos.device
        if not self.padded and (start == 0 or T == 1):
            # an empty cache sees the plain causal square; one new token, every key so far
            self.attn_mask, self.is_causal = None, start == 0 and T > 1
            return self.cos[start:L], self.sin[start:L]
        causal_TL = torch.arange(L, device=device) <= torch.arange(start, L, device=device)[:, None]
        if not self.padded:
            self.attn_mask, self.is_causal = causal_TL, False
            return self.cos[start:L], self.sin[start:L]
        real_BL = torch.arange(L, device=device) >= self.pad_B[:, None]
        # a padding query sees itself, so no row of the softmax is empty (that would be NaN)
        itself_TL = torch.arange(L, device=device) == torch.arange(start, L, device=device)[:, None]
        self.attn_mask = (causal_TL & (real_BL[:, None] | itself_TL))[:, None]  # (B, 1, T, L)
        self.is_causal = False
        pos_BT = (torch.arange(start, L, device=device) - self.pad_B[:, None]).clamp(min=0)
        return self.cos[pos_BT][:, None], self.sin[pos_BT][:, None]  # (B, 1, T, hd)

    def update(self, layer: int, k, v):
        """Store the new positions' keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        # heads counted from the projections' width: under tensor parallelism (minimoe/
        # tensor_parallel.py) a rank holds n_heads / tp of them
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:  # attend over every position so far, not only the new ones
            k, v = cache.update(self.layer, k, v)  # (B, nkv, L, hd)
            mask, causal = cache.attn_mask, cache.is_causal
        # each KV head serves n_heads / n_kv_heads consecutive query heads (its group);
        # enable_gqa lets the kernel broadcast K and V instead of copying them per query head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # the MLP slot: a SwiGLU MLP, or on Scale-Out a Mixture of them
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.d_model, cfg.d_ffn)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


LOSS_CHUNK_LOGITS = 2**27  # logits per chunk of the loss: 2 GB of fp32 logits and their gradient


class LMHead(nn.Linear):
    """The output projection (d_model -> vocab). Given targets, the mean cross-entropy, a chunk of
    tokens at a time, each chunk's logits recomputed in backward: all (tokens, vocab) logits at
    once cost 14 bytes each (bf16, fp32, log-softmax, gradients), 35 GB for 8x1.8B's micro-batch.
    Logits past `vocab` (tensor parallelism's padding) are never seen."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__(d_model, vocab, bias=False)
        self.vocab = vocab
        self.pad_V = None  # True on padded rows (minimoe/tensor_parallel.py)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return super().forward(h)[..., :self.vocab]
        h_ND, y_N = h.flatten(0, -2), targets.flatten()
        chunk = max(1, LOSS_CHUNK_LOGITS // self.weight.shape[0])
        if len(y_N) <= chunk:  # one chunk: nothing to recompute
            return self._chunk_loss(h_ND, y_N, "mean")
        total = sum(checkpoint(self._chunk_loss, h_ND[i:i + chunk], y_N[i:i + chunk], "sum",
                               use_reentrant=False) for i in range(0, len(y_N), chunk))
        return total / len(y_N)

    def _chunk_loss(self, h_ND, y_N, reduction: str):
        logits_NV = super().forward(h_ND).float()
        if self.pad_V is not None:
            logits_NV = logits_NV.masked_fill(self.pad_V, float("-inf"))
        return F.cross_entropy(logits_NV, y_N, reduction=reduction)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, a tied LM head kept tied (else it gets memory of its own)."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.embed.weight:
            self.lm_head.weight = self.embed.weight
        return self

    @torch.no_grad()
    def reset_parameters(self, fill=None):
        """N(0, init_std) for matrices, zero biases, unit norms, in module order from the global
        RNG. fill(param, draw, rows) applies each rule (stream.fill_block: a rank's block of the
        whole tensor's draw, so a sharded model starts bit-identical to one process's)."""
        fill = fill or (lambda param, draw, rows=None: draw(param))
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # a vocabulary padded for tensor parallelism: its real rows are drawn
                rows = self.cfg.vocab_size if module in (self.embed, self.lm_head) else None
                fill(module.weight, lambda t: t.normal_(0.0, std), rows)
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, torch.Tensor.zero_)
            elif isinstance(module, RMSNorm):
                fill(module.weight, lambda t: t.fill_(1.0))
        for module in self.modules():
            if hasattr(module, "init_weights"):  # modules with their own rule (the MoE's)
                module.init_weights(fill)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or with targets (B, T) the mean
        cross-entropy. With a cache, idx holds the positions after those already in it."""
        T = idx.shape[1]
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length={T}: must be <= max_seq_len={self.cfg.max_seq_len}")
            cos, sin = rope_tables(self.cfg, T, idx.device)
        else:
            cos, sin = cache.start_step(T)
        x = self.embed(idx)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.norm(x), targets=targets)

    def num_params(self) -> int:
        """Parameters counted from the tensors (tied weights once); cfg.param_counts() by part."""
        return sum(p.numel() for p in self.parameters())


def draw_as_built(cfg: ModelConfig) -> None:
    """Advance the global RNG as building Transformer(cfg) on the CPU does, keeping nothing: a
    meta-built model given this and reset_parameters equals build_model(cfg) (train.py)."""
    with torch.device("cpu"):  # the order of Transformer.__init__
        nn.Embedding(cfg.vocab_size, cfg.d_model)
        for i in range(cfg.n_layers):
            Block(cfg, i)
        LMHead(cfg.d_model, cfg.vocab_size)


def build_model(cfg: ModelConfig, device=None, dtype=None) -> Transformer:
    """Build on any device; device="meta" allocates nothing (shapes and counts only)."""
    with torch.device(device or "cpu"):
        model = Transformer(cfg)
    return model.to(dtype) if dtype is not None else model
