"""Model configuration: one validated dataclass, `ModelConfig` (dense when n_experts == 0, else
a top-k router over SwiGLU experts in each MoE layer), and the named presets: the paper's
Table 3 shapes (where sources disagree: docs/method.md, "Model shapes") and toy shapes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from minimoe.checks import check_fields, from_table

GATES = ("softmax-topk", "topk-softmax")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU), optionally MoE."""

    vocab_size: int = 2048
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ffn: int = 352
    qkv_bias: bool = True
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    tie_embeddings: bool = False
    init_std: float = 0.02  # N(0, init_std) for every matrix; HF initializer_range
    # --- Mixture of Experts (dense when n_experts == 0) ---
    n_experts: int = 0
    top_k: int = 2
    expert_d_ffn: int = 0  # width of one routed expert; 0 on an MoE means d_ffn (upcycling)
    moe_layer_freq: int = 1  # layer i is MoE when i % moe_layer_freq == 0 (Megatron's rule)
    shared_d_ffn: int = 0  # an always-on dense expert beside the routed ones (LLaMA-MoE residual)
    gate: str = "softmax-topk"  # Mixtral/AquilaMoE; "topk-softmax" is LLaMA-MoE's
    router_noise: bool = False  # noisy top-k gating (Shazeer 2017), training only
    capacity_factor: float = 0.0  # 0 = dropless; else tokens over capacity are dropped
    expert_scale: float = 1.0  # expert outputs are multiplied by this (LLaMA-MoE uses N/k)
    # --- shapes published models use (the simulator reads them; the model builds them) ---
    d_head: int = 0  # width of one attention head; 0 means d_model // n_heads
    first_k_dense: int = 0  # layers before this one keep a dense MLP (DeepSeek's first_k_dense_replace)

    def __post_init__(self):
        check_fields("ModelConfig", self, RULES)
        check_fields("ModelConfig", self, BOUNDS)
        if self.d_model % self.n_heads and not self.d_head:
            raise ValueError(f"ModelConfig.d_model={self.d_model}: must be divisible by "
                             f"n_heads={self.n_heads} (or give d_head)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads}: must be divisible by "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"ModelConfig.top_k={self.top_k}: must be <= n_experts={self.n_experts}")
        if self.n_experts and not self.expert_d_ffn:  # upcycling: every expert is the MLP
            object.__setattr__(self, "expert_d_ffn", self.d_ffn)

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense and layer % self.moe_layer_freq == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def param_counts(self) -> dict[str, int]:
        """Parameters per component, with `total` and `active` (what one token uses); analytic,
        checked against the built model by a test."""
        d, hd = self.d_model, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attention = d * (q + 2 * kv) + q * d + (q + 2 * kv) * self.qkv_bias
        expert = 3 * d * self.expert_d_ffn  # SwiGLU: gate, up and down
        n_moe = self.n_moe_layers
        counts = {
            "embedding": self.vocab_size * d,
            "attention": self.n_layers * attention,
            "norms": self.n_layers * 2 * d + d,
            "mlp": (self.n_layers - n_moe) * 3 * d * self.d_ffn,
            "experts": n_moe * self.n_experts * expert,
            "shared_experts": n_moe * 3 * d * self.shared_d_ffn,
            "router": n_moe * d * self.n_experts * (1 + self.router_noise),  # W_noise too
            "lm_head": 0 if self.tie_embeddings else self.vocab_size * d,
        }
        counts["total"] = sum(counts.values())
        counts["active"] = counts["total"] - n_moe * (self.n_experts - self.top_k) * expert
        return counts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return from_table(cls, d, "ModelConfig")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


RULES = {  # ModelConfig's field rules (minimoe/checks.py); capacity_factor 0 means dropless
    **dict.fromkeys(("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ffn",
                     "max_seq_len", "top_k", "moe_layer_freq"), "int>0"),
    **dict.fromkeys(("n_experts", "expert_d_ffn", "shared_d_ffn", "d_head", "first_k_dense"),
                    "int>=0"),
    **dict.fromkeys(("rope_theta", "norm_eps", "init_std", "expert_scale"), ">0"),
    "capacity_factor": ">=0", "gate": GATES, "qkv_bias": "bool", "tie_embeddings": "bool",
    "router_noise": "bool",
}
BOUNDS = {  # far above any published model: a size from a file cannot overflow memory arithmetic
    **dict.fromkeys(("vocab_size", "max_seq_len"), "[0, 16777216]"),
    **dict.fromkeys(("n_layers", "n_heads", "n_kv_heads", "n_experts", "top_k", "first_k_dense"),
                    "[0, 4096]"),
    **dict.fromkeys(("d_model", "d_ffn", "expert_d_ffn", "shared_d_ffn", "d_head"), "[0, 1048576]"),
}


# --- presets: toy shapes, and the paper's Table 3 (where sources disagree each value has its
# own preset: docs/method.md#model-shapes; vocab, rope_theta, norm_eps: BAAI/AquilaMoE's config.json)
_AQUILA = dict(vocab_size=151851, qkv_bias=True, rope_theta=1e6, norm_eps=1e-5,
               tie_embeddings=False)
_MOE_8x2 = dict(n_experts=8, top_k=2)


def _shape(n_layers, d_model, n_heads, n_kv_heads, d_ffn, max_seq_len, **rest) -> ModelConfig:
    return ModelConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       d_ffn=d_ffn, max_seq_len=max_seq_len, **rest)


PRESETS: dict[str, ModelConfig] = {  # layers, d_model, heads, KV heads, FFN width, context
    "tiny": _shape(2, 64, 4, 2, 176, 128, vocab_size=512),
    "tiny-large": _shape(3, 128, 8, 2, 352, 128, vocab_size=512),
    # the toy Scale-Up: width x2 (exact for FPI), heads x2 in the same 2 KV groups, depth 4 -> 6
    "toy-small": _shape(4, 128, 4, 2, 352, 256, vocab_size=2048),
    "toy-large": _shape(6, 256, 8, 2, 704, 256, vocab_size=2048),
    "toy-moe": _shape(6, 256, 8, 2, 704, 256, vocab_size=2048, **_MOE_8x2),
    # §3.2.1's Scale-Up source M(24, 2048); the rest from the 1.8B, heads of 128 to grow into the 7B
    "aquila-1.3b": _shape(24, 2048, 16, 16, 5504, 2048, **_AQUILA),
    "aquila-1.8b": _shape(24, 2048, 32, 32, 5504, 2048, **_AQUILA),
    "aquila-8x1.8b": _shape(24, 2048, 32, 32, 5504, 2048, **_AQUILA, **_MOE_8x2),
    "aquila-7b": _shape(32, 4096, 32, 32, 14336, 4096, **_AQUILA),
    # the project README (github.com/FlagAI-Open/Aquila-MoE) gives the 7B 8 KV groups
    "aquila-7b-kv8": _shape(32, 4096, 32, 8, 14336, 4096, **_AQUILA),
    "aquila-16b": _shape(40, 5120, 40, 8, 20480, 4096, **_AQUILA),
    # BAAI/AquilaDense-16B's config.json says intermediate_size 17920
    "aquila-16b-hf": _shape(40, 5120, 40, 8, 17920, 4096, **_AQUILA),
    "aquilamoe-8x16b": _shape(40, 5120, 40, 8, 20480, 4096, **_AQUILA, **_MOE_8x2),
}


def get_preset(name: str) -> ModelConfig:
    if not isinstance(name, str) or name not in PRESETS:  # a file may hold any value
        raise ValueError(f"preset={name!r}: unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
