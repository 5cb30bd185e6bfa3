"""Interop with Hugging Face transformers, both ways: configs and state dicts of
LlamaForCausalLM and Qwen2ForCausalLM (dense) and MixtralForCausalLM (MoE).

Our weight names are HF's with shorter prefixes, so conversion is a renaming:
  embed.weight                  <-> model.embed_tokens.weight
  layers.{i}.attn.{q,k,v,o}_proj <-> model.layers.{i}.self_attn.{q,k,v,o}_proj
  layers.{i}.attn_norm          <-> model.layers.{i}.input_layernorm
  layers.{i}.mlp_norm           <-> model.layers.{i}.post_attention_layernorm
  layers.{i}.mlp.*_proj         <-> model.layers.{i}.mlp.*_proj
  norm / lm_head                <-> model.norm / lm_head
All use the half-split ("rotate_half") RoPE layout, so no permutation of Q/K rows is needed.
Qwen2 is the exact architectural match (bias on Q/K/V only); Llama needs attention_bias=True,
which also gives o_proj a bias, exported as zero. One helper (`_hf_common`) holds the config
arguments the three share, and `config_from_hf` reads all three back (docs/method.md#interop).
"""

from __future__ import annotations

import torch

from minimoe.config import ModelConfig
from minimoe.model import Transformer

_LAYER_RENAMES = [  # (ours, theirs) inside a layer's name
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
]


def to_hf_name(name: str) -> str:
    if name.startswith("layers."):
        for ours, theirs in _LAYER_RENAMES:
            name = name.replace(ours, theirs)
    elif name.startswith("embed."):
        name = name.replace("embed.", "embed_tokens.", 1)
    elif not name.startswith("norm."):
        return name  # lm_head.weight
    return "model." + name


def from_hf_name(name: str) -> str:
    if not name.startswith("model."):
        return name  # lm_head.weight
    name = name[len("model."):]
    for ours, theirs in _LAYER_RENAMES:
        name = name.replace(theirs, ours)
    return name.replace("embed_tokens.", "embed.", 1)


# --- configs -----------------------------------------------------------------------------------
def _hf_common(cfg: ModelConfig) -> dict:
    """The arguments every transformers decoder config (Llama, Qwen2, Mixtral) shares with ours."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        attn_implementation="sdpa",
    )


def _check_dense(cfg: ModelConfig, architecture: str):
    if cfg.is_moe:
        raise ValueError(f"ModelConfig.n_experts={cfg.n_experts}: a {architecture} config is "
                         "dense; use the Mixtral export")


def hf_llama_config(cfg: ModelConfig):
    """The transformers LlamaConfig with the same shape as a dense ModelConfig. QKV bias
    needs attention_bias=True, which gives o_proj a bias too (exported as zero)."""
    from transformers import LlamaConfig  # optional dependency, heavy to import

    _check_dense(cfg, "Llama")
    return LlamaConfig(intermediate_size=cfg.d_ffn, attention_bias=cfg.qkv_bias, mlp_bias=False,
                       **_hf_common(cfg))


def hf_qwen2_config(cfg: ModelConfig):
    """The transformers Qwen2Config with the same shape as a dense ModelConfig: Aquila's
    exact match (bias on Q, K and V, none on o_proj; modeling_qwen2.py, Qwen2Attention)."""
    from transformers import Qwen2Config  # optional dependency, heavy to import

    _check_dense(cfg, "Qwen2")
    return Qwen2Config(intermediate_size=cfg.d_ffn, use_sliding_window=False, **_hf_common(cfg))


def config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig from a transformers Llama, Qwen2 or Mixtral config.

    What minimoe can represent is imported exactly; anything else (scaled RoPE, another
    activation, a head_dim other than hidden_size/num_attention_heads, MLP biases, sliding
    windows, router jitter) raises ValueError naming the field, rather than loading a model
    whose logits would silently differ.
    """
    kind = getattr(hf_config, "model_type", "llama")
    if kind not in ("llama", "qwen2", "mixtral"):
        raise ValueError(f"model_type={kind!r}: must be one of llama, qwen2, mixtral")
    d_model, n_heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None)
    # Qwen2 keeps a sliding_window that only use_sliding_window switches on
    window = getattr(hf_config, "sliding_window", None) if kind == "mixtral" else None
    rules = [
        (getattr(hf_config, "hidden_act", "silu") in ("silu", "swish"), "hidden_act",
         "must be 'silu' (minimoe's MLP is SwiGLU)"),
        (head_dim in (None, d_model // n_heads) and d_model % n_heads == 0, "head_dim",
         f"must equal hidden_size/num_attention_heads = {d_model}/{n_heads}"),
        (not getattr(hf_config, "mlp_bias", False), "mlp_bias",
         "unsupported: minimoe's MLP has no bias"),
        (not getattr(hf_config, "use_sliding_window", False), "use_sliding_window",
         "must be False: minimoe attends to the whole context"),
        (window is None or window >= hf_config.max_position_embeddings, "sliding_window",
         "must be None: minimoe attends to the whole context"),
        (not getattr(hf_config, "router_jitter_noise", 0.0), "router_jitter_noise",
         "must be 0: minimoe's router has no jitter"),
    ]
    for ok, field, rule in rules:
        if not ok:
            raise ValueError(f"{field}={getattr(hf_config, field)!r}: {rule}")
    common = dict(
        vocab_size=hf_config.vocab_size, n_layers=hf_config.num_hidden_layers, d_model=d_model,
        n_heads=n_heads, n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or n_heads,
        d_ffn=hf_config.intermediate_size, rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps, max_seq_len=hf_config.max_position_embeddings,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
    )
    if kind == "mixtral":  # no attention biases; every layer an MoE of intermediate_size experts
        return ModelConfig(**common, qkv_bias=False, n_experts=hf_config.num_local_experts,
                           top_k=hf_config.num_experts_per_tok)
    return ModelConfig(**common, qkv_bias=kind == "qwen2" or bool(hf_config.attention_bias))


def _rope_theta(hf_config) -> float:
    """rope_theta, refusing scaled RoPE. transformers 5 keeps both in `rope_parameters`;
    transformers 4 has `rope_theta` and `rope_scaling` (None, or {"rope_type" or "type": ...})."""
    params = getattr(hf_config, "rope_parameters", None)
    field, rope = ("rope_parameters", params) if params is not None else \
        ("rope_scaling", getattr(hf_config, "rope_scaling", None))
    rope = rope or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{field}.rope_type={rope_type!r}: not supported; minimoe's RoPE is "
                         "unscaled ('default')")
    theta = getattr(hf_config, "rope_theta", None)
    return float(theta if theta is not None else rope.get("rope_theta", 1e4))


# --- dense state dicts ----------------------------------------------------------------------------
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
        if k.endswith("self_attn.o_proj.bias"):
            if v.abs().max() > 0:
                raise ValueError(f"{k}: nonzero o_proj bias; minimoe's attention has bias on Q/K/V only")
            continue
        out[k] = v
    return import_qwen2_state_dict(out)


def export_qwen2_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our dense state dict -> Qwen2ForCausalLM's. Qwen2 always has QKV biases: a model
    without them gets zero ones, which change nothing."""
    out = {to_hf_name(k): v for k, v in state_dict.items()}
    for k, weight in state_dict.items():
        if k.endswith(_QKV_WEIGHTS) and k.replace(".weight", ".bias") not in state_dict:
            out[to_hf_name(k.replace(".weight", ".bias"))] = weight.new_zeros(weight.shape[0])
    return out


def import_qwen2_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2ForCausalLM's state dict -> ours (a model with qkv_bias=True, as config_from_hf
    reads it); rotary caches HF may store are dropped."""
    return {from_hf_name(k): v for k, v in hf_state_dict.items() if "rotary_emb" not in k}


# --- Hugging Face Mixtral ---------------------------------------------------------------------
def _check_mixtral(cfg: ModelConfig):
    rules = [
        (cfg.is_moe, "n_experts", "must be > 0 (Mixtral is an MoE)"),
        (cfg.moe_layer_freq == 1, "moe_layer_freq", "must be 1 (every Mixtral layer is MoE)"),
        (cfg.gate == "softmax-topk", "gate", "must be 'softmax-topk' (Mixtral's routing)"),
        (cfg.shared_d_ffn == 0, "shared_d_ffn", "must be 0 (Mixtral has no shared expert)"),
        (cfg.capacity_factor == 0, "capacity_factor", "must be 0 (Mixtral is dropless)"),
        (not cfg.router_noise, "router_noise", "must be False (Mixtral has no noisy gating)"),
    ]
    for ok, field, rule in rules:
        if not ok:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r}: {rule}")


def hf_mixtral_config(cfg: ModelConfig):
    """The transformers MixtralConfig with the same shape as an MoE ModelConfig."""
    from transformers import MixtralConfig  # optional dependency, heavy to import

    _check_mixtral(cfg)
    return MixtralConfig(intermediate_size=cfg.expert_d_ffn, num_local_experts=cfg.n_experts,
                         num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0,
                         sliding_window=None, **_hf_common(cfg))


def export_mixtral_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our MoE state dict -> MixtralForCausalLM's.

    transformers 5 stores Mixtral's experts fused, in nn.Linear's (out, in) layout:
      layers.{i}.mlp.router.weight (E, D)      -> model.layers.{i}.mlp.gate.weight (E, D)
      w_gate_EDF, w_up_EDF (E, D, F)           -> mlp.experts.gate_up_proj (E, 2F, D) = [gate; up]
      w_down_EFD (E, F, D)                     -> mlp.experts.down_proj (E, D, F)
    expert_scale is folded into down_proj (exact). Mixtral's attention has no biases: zero
    QKV biases are dropped, nonzero ones refused.
    """
    _check_mixtral(cfg)
    out = {}
    for name, tensor in sd.items():
        layer, leaf = _split_moe_name(name)
        hf = f"model.layers.{layer}.mlp."
        if leaf == "router.weight":
            out[hf + "gate.weight"] = tensor
        elif leaf == "w_gate_EDF":
            w_up_EDF = sd[f"layers.{layer}.mlp.w_up_EDF"]
            out[hf + "experts.gate_up_proj"] = torch.cat([tensor, w_up_EDF], dim=2).transpose(1, 2)
        elif leaf == "w_up_EDF":
            continue  # fused into gate_up_proj above
        elif leaf == "w_down_EFD":
            out[hf + "experts.down_proj"] = tensor.transpose(1, 2) * cfg.expert_scale
        elif name.endswith(_QKV_BIASES):
            if tensor.abs().max() > 0:
                raise ValueError(f"{name}: nonzero QKV bias; Mixtral's attention has no biases")
        else:
            out[to_hf_name(name)] = tensor
    return out


def import_mixtral_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MixtralForCausalLM's state dict -> ours (with zero QKV biases when cfg.qkv_bias)."""
    _check_mixtral(cfg)
    out = {}
    for name, tensor in hf_sd.items():
        if "rotary_emb" in name:
            continue
        layer, leaf = _split_moe_name(name.removeprefix("model."))
        ours = f"layers.{layer}.mlp."
        if leaf == "gate.weight":
            out[ours + "router.weight"] = tensor
        elif leaf == "experts.gate_up_proj":
            w_gate_up_ED2F = tensor.transpose(1, 2)
            out[ours + "w_gate_EDF"], out[ours + "w_up_EDF"] = w_gate_up_ED2F.chunk(2, dim=2)
        elif leaf == "experts.down_proj":
            out[ours + "w_down_EFD"] = tensor.transpose(1, 2) / cfg.expert_scale
        else:
            out[from_hf_name(name)] = tensor
    if cfg.qkv_bias:
        for i in range(cfg.n_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = out[f"layers.{i}.attn.{proj}.weight"]
                out[f"layers.{i}.attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
    return out


_QKV_BIASES = ("attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias")
_QKV_WEIGHTS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")


def _split_moe_name(name: str) -> tuple[str, str]:
    """'layers.3.mlp.router.weight' -> ('3', 'router.weight'); other names -> ('', '')."""
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "mlp":
        return parts[1], parts[3]
    return "", ""


def mixtral_from_moe(model: Transformer):
    """A MixtralForCausalLM holding the same weights as our MoE model (for checks and export)."""
    from transformers import MixtralForCausalLM  # optional dependency, heavy to import

    hf = MixtralForCausalLM(hf_mixtral_config(model.cfg))
    hf.load_state_dict(export_mixtral_state_dict(model.state_dict(), model.cfg), strict=True)
    return hf.to(next(model.parameters()).dtype)
