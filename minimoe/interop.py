"""Interop with Hugging Face transformers: LlamaForCausalLM (dense) state dicts, both ways.

Our weight names are HF's with shorter prefixes, so conversion is a renaming:
  embed.weight                  <-> model.embed_tokens.weight
  layers.{i}.attn.{q,k,v,o}_proj <-> model.layers.{i}.self_attn.{q,k,v,o}_proj
  layers.{i}.attn_norm          <-> model.layers.{i}.input_layernorm
  layers.{i}.mlp_norm           <-> model.layers.{i}.post_attention_layernorm
  layers.{i}.mlp.*_proj         <-> model.layers.{i}.mlp.*_proj
  norm / lm_head                <-> model.norm / lm_head
Both use the half-split ("rotate_half") RoPE layout, so no permutation of Q/K rows is needed.
The MoE (Mixtral) side of interop lives in minimoe/upcycle.py next to the MoE conversions.
"""

from __future__ import annotations

import torch

from minimoe.config import ModelConfig

_RENAMES = [  # (ours, theirs), applied as prefix/infix substitutions
    ("embed.", "model.embed_tokens."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    ("layers.", "model.layers."),
    ("norm.", "model.norm."),
]


def to_hf_name(name: str) -> str:
    if name.startswith("layers."):
        for ours, theirs in _RENAMES[1:4]:
            name = name.replace(ours, theirs)
        return "model." + name
    if name.startswith("embed."):
        return name.replace("embed.", "model.embed_tokens.", 1)
    if name.startswith("norm."):
        return "model." + name
    return name  # lm_head.weight


def from_hf_name(name: str) -> str:
    if name.startswith("model.layers."):
        name = name[len("model."):]
        for ours, theirs in _RENAMES[1:4]:
            name = name.replace(theirs, ours)
        return name
    if name.startswith("model.embed_tokens."):
        return name.replace("model.embed_tokens.", "embed.", 1)
    if name.startswith("model.norm."):
        return name[len("model."):]
    return name


def hf_llama_config(cfg: ModelConfig):
    """The transformers LlamaConfig with the same shape as a dense ModelConfig."""
    from transformers import LlamaConfig

    if cfg.is_moe:
        raise ValueError(f"n_experts={cfg.n_experts}: a Llama config is dense; use the Mixtral export")
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias, mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        attn_implementation="sdpa",
    )


def config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig from a transformers LlamaConfig (dense)."""
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it under rope_parameters
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 1e4)
    return ModelConfig(
        vocab_size=hf_config.vocab_size, n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size, n_heads=hf_config.num_attention_heads,
        n_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        d_ffn=hf_config.intermediate_size, qkv_bias=bool(hf_config.attention_bias),
        rope_theta=float(theta), norm_eps=hf_config.rms_norm_eps,
        max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
    )


def export_llama_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our dense state dict -> LlamaForCausalLM's (tensors shared, not copied).

    Llama's `attention_bias` puts a bias on o_proj as well as on Q/K/V; Aquila (like Qwen2)
    has none there, so with QKV bias we export a zero o_proj bias, which changes nothing.
    """
    out = {to_hf_name(k): v for k, v in state_dict.items()}
    for k, v in state_dict.items():
        if k.endswith("attn.q_proj.bias"):
            o_weight = state_dict[k.replace("q_proj.bias", "o_proj.weight")]
            out[to_hf_name(k.replace("q_proj", "o_proj"))] = o_weight.new_zeros(o_weight.shape[0])
    return out


def import_llama_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> ours; rotary caches HF may store are dropped."""
    out = {}
    for k, v in hf_state_dict.items():
        if "rotary_emb" in k:
            continue
        if k.endswith("self_attn.o_proj.bias"):
            if v.abs().max() > 0:
                raise ValueError(f"{k}: nonzero o_proj bias; minimoe's attention has bias on Q/K/V only")
            continue
        out[from_hf_name(k)] = v
    return out
