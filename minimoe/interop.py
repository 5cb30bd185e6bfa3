"""Interop with transformers' Llama, Qwen2, Mixtral and Qwen2-MoE (Mistral reads as Llama), both
ways: one table (`_pairs`) says which of our tensors make which of theirs, a group at a time, so
checkpoints stream (minimoe/hub.py). What each format holds, and why: docs/method.md#interop."""

from __future__ import annotations

from typing import Callable

import torch

from minimoe.config import ModelConfig

FORMATS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
READS = (*FORMATS, "mistral")  # model types config_from_hf reads (Mistral's tensors are Llama's)


# --- configs -----------------------------------------------------------------------------------
def check_format(cfg: ModelConfig, fmt: str):
    """Refuse, naming the field, what the format cannot hold exactly."""
    assert fmt in FORMATS, fmt  # the command's choices
    moe = fmt in ("mixtral", "qwen2_moe")
    rules = [
        (cfg.is_moe == moe, "n_experts", f"must be {'> 0' if moe else '0'} ({fmt} is "
                                         f"{'an MoE' if moe else 'dense'})"),
        (not moe or cfg.shared_d_ffn == 0, "shared_d_ffn", f"must be 0 ({fmt} has no ungated "
                                                           "shared expert)"),
        (not moe or cfg.capacity_factor == 0, "capacity_factor", f"must be 0 ({fmt} is dropless)"),
        (not moe or not cfg.router_noise, "router_noise", f"must be False ({fmt} has no noisy gating)"),
        (fmt != "mixtral" or cfg.moe_layer_freq == 1, "moe_layer_freq",
         "must be 1 (every Mixtral layer is MoE; Qwen2-MoE holds dense layers)"),
    ]
    for ok, field, rule in rules:
        if not ok:
            raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r}: {rule}")


def hf_config(cfg: ModelConfig, fmt: str):
    from transformers import AutoConfig  # optional dependency, heavy to import

    check_format(cfg, fmt)
    d = dict(model_type=fmt, architectures=[FORMATS[fmt]], vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
             max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
             initializer_range=cfg.init_std, intermediate_size=cfg.d_ffn)
    if fmt == "llama":  # attention_bias also gives o_proj a bias, exported as zero
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    elif fmt == "qwen2":  # always QKV bias (zero where ours has none)
        d.update(use_sliding_window=False)
    elif fmt == "mixtral":
        d.update(intermediate_size=cfg.expert_d_ffn, num_local_experts=cfg.n_experts,
                 num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, sliding_window=None)
    else:  # qwen2_moe: the top-k renormalised (both our gates), the shared expert empty
        d.update(moe_intermediate_size=cfg.expert_d_ffn, num_experts=cfg.n_experts,
                 num_experts_per_tok=cfg.top_k, norm_topk_prob=True, qkv_bias=cfg.qkv_bias,
                 shared_expert_intermediate_size=0, decoder_sparse_step=1, use_sliding_window=False,
                 mlp_only_layers=[i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)])
    return AutoConfig.for_model(d.pop("model_type"), **d)


def config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig from a transformers config of a READS model type; what minimoe cannot
    represent exactly (scaled RoPE, sliding windows, ...) is a ValueError naming the field."""
    kind = getattr(hf, "model_type", "llama")
    if kind not in READS:
        raise ValueError(f"model_type={kind!r}: must be one of {', '.join(READS)}")
    d_model, n_heads = hf.hidden_size, hf.num_attention_heads
    window = getattr(hf, "sliding_window", None) if kind in ("mixtral", "mistral") else None
    moe_layers = [i for i in range(hf.num_hidden_layers)
                  if i not in getattr(hf, "mlp_only_layers", [])]
    freq = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else 1
    rules = [
        (getattr(hf, "hidden_act", "silu") in ("silu", "swish"), "hidden_act",
         "must be 'silu' (minimoe's MLP is SwiGLU)"),
        (getattr(hf, "head_dim", None) in (None, d_model // n_heads) and d_model % n_heads == 0,
         "head_dim", f"must equal hidden_size/num_attention_heads = {d_model}/{n_heads}"),
        (not getattr(hf, "mlp_bias", False), "mlp_bias", "unsupported: minimoe's MLP has no bias"),
        (not getattr(hf, "use_sliding_window", False), "use_sliding_window",
         "must be False: minimoe attends to the whole context"),
        (window is None or window >= hf.max_position_embeddings, "sliding_window",
         "must be None: minimoe attends to the whole context"),
        (not getattr(hf, "router_jitter_noise", 0.0), "router_jitter_noise",
         "must be 0: minimoe's router has no jitter"),
        (not getattr(hf, "shared_expert_intermediate_size", 0), "shared_expert_intermediate_size",
         "must be 0: minimoe's shared expert has no gate"),
        (getattr(hf, "norm_topk_prob", True), "norm_topk_prob",
         "must be True: minimoe renormalises the top-k weights"),
        (getattr(hf, "decoder_sparse_step", 1) == 1 and moe_layers == list(range(0, hf.num_hidden_layers, freq)),
         "mlp_only_layers", "must leave MoE every n-th layer from layer 0 (moe_layer_freq)"),
    ]
    for ok, field, rule in rules:
        if not ok:
            raise ValueError(f"{field}={getattr(hf, field, None)!r}: {rule}")
    common = dict(
        vocab_size=hf.vocab_size, n_layers=hf.num_hidden_layers, d_model=d_model, n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads, d_ffn=hf.intermediate_size,
        rope_theta=_rope_theta(hf), norm_eps=hf.rms_norm_eps, max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=getattr(hf, "initializer_range", 0.02))
    if kind == "mixtral":  # every layer an MoE of intermediate_size experts, no attention bias
        return ModelConfig(**common, qkv_bias=False, n_experts=hf.num_local_experts,
                           top_k=hf.num_experts_per_tok)
    if kind == "qwen2_moe":
        return ModelConfig(**common, qkv_bias=hf.qkv_bias, n_experts=hf.num_experts,
                           top_k=hf.num_experts_per_tok, expert_d_ffn=hf.moe_intermediate_size,
                           moe_layer_freq=freq)
    return ModelConfig(**common, qkv_bias=kind == "qwen2" or bool(getattr(hf, "attention_bias", False)))


def _rope_theta(hf) -> float:
    """rope_theta, refusing scaled RoPE. transformers 5 keeps both in `rope_parameters`;
    transformers 4 has `rope_theta` and `rope_scaling` (None, or {"rope_type" or "type": ...})."""
    field = "rope_parameters" if getattr(hf, "rope_parameters", None) is not None else "rope_scaling"
    rope = getattr(hf, field, None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{field}.rope_type={rope_type!r}: not supported; minimoe's RoPE is "
                         "unscaled ('default')")
    theta = getattr(hf, "rope_theta", None)
    return float(theta if theta is not None else rope.get("rope_theta", 1e4))


# --- tensors: one table, both ways ---------------------------------------------------------------
def _same(*tensors):
    return tensors


def _pairs(cfg: ModelConfig, fmt: str):
    """(our names, their names, ours -> theirs, theirs -> ours, names that must be zero) per group
    of tensors. A tensor one side lacks is zero: made beside a weight, dropped once checked."""
    fmt = "llama" if fmt == "mistral" else fmt
    yield ("embed.weight",), ("model.embed_tokens.weight",), _same, _same, ()
    yield ("norm.weight",), ("model.norm.weight",), _same, _same, ()
    if not cfg.tie_embeddings:
        yield ("lm_head.weight",), ("lm_head.weight",), _same, _same, ()
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for a, b in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                     ("attn.o_proj", "self_attn.o_proj")):
            if a == "attn.o_proj" and fmt == "llama" and cfg.qkv_bias:  # Llama's o_proj bias
                yield ((ours + a + ".weight",), (hf + b + ".weight", hf + b + ".bias"),
                       lambda w: (w, w.new_zeros(w.shape[0])), lambda w, bias: (w,),
                       (hf + b + ".bias",))
            else:
                yield (ours + a + ".weight",), (hf + b + ".weight",), _same, _same, ()
        for p in ("q_proj", "k_proj", "v_proj"):
            w, b = f"attn.{p}.weight", f"attn.{p}.bias"
            theirs = (hf + "self_attn." + p + ".weight", hf + "self_attn." + p + ".bias")
            if cfg.qkv_bias and fmt == "mixtral":  # no attention bias
                yield ((ours + w, ours + b), theirs[:1], lambda w, b: (w,),
                       lambda w: (w, w.new_zeros(w.shape[0])), (ours + b,))
            elif not cfg.qkv_bias and fmt == "qwen2":  # always a bias
                yield ((ours + w,), theirs, lambda w: (w, w.new_zeros(w.shape[0])),
                       lambda w, b: (w,), theirs[1:])
            else:
                n = 1 + cfg.qkv_bias
                yield (ours + w, ours + b)[:n], theirs[:n], _same, _same, ()
        if cfg.is_moe_layer(i):
            yield from _moe_pairs(cfg, fmt, ours + "mlp.", hf + "mlp.")
        else:
            for p in ("gate_proj", "up_proj", "down_proj"):
                yield (f"{ours}mlp.{p}.weight",), (f"{hf}mlp.{p}.weight",), _same, _same, ()


def _moe_pairs(cfg: ModelConfig, fmt: str, ours: str, hf: str):
    """transformers 5 stores experts fused, in nn.Linear's (out, in) layout: w_gate_EDF, w_up_EDF
    (E, D, F) -> experts.gate_up_proj (E, 2F, D); w_down_EFD (E, F, D) -> experts.down_proj
    (E, D, F), with our expert_scale folded in (exact). Qwen2-MoE's shared expert is empty."""
    shared = [hf + f"shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    if fmt == "qwen2_moe":
        yield ((ours + "router.weight",), (hf + "gate.weight", *shared, hf + "shared_expert_gate.weight"),
               lambda r: (r, r.new_zeros(0, r.shape[1]), r.new_zeros(0, r.shape[1]),
                          r.new_zeros(r.shape[1], 0), r.new_zeros(1, r.shape[1])),
               lambda r, *empty: (r,), (*shared, hf + "shared_expert_gate.weight"))
    else:
        yield (ours + "router.weight",), (hf + "gate.weight",), _same, _same, ()
    scale = cfg.expert_scale
    yield ((ours + "w_gate_EDF", ours + "w_up_EDF"), (hf + "experts.gate_up_proj",),
           lambda g, u: (torch.cat([g, u], dim=2).transpose(1, 2),),
           lambda gate_up: gate_up.transpose(1, 2).chunk(2, dim=2), ())
    yield ((ours + "w_down_EFD",), (hf + "experts.down_proj",),
           lambda d: (d.transpose(1, 2) * scale if scale != 1 else d.transpose(1, 2),),
           lambda d: (d.transpose(1, 2) / scale if scale != 1 else d.transpose(1, 2),), ())


def plan(cfg: ModelConfig, fmt: str, to_hf: bool) -> dict[str, tuple[tuple[str, ...], Callable, int]]:
    """Each tensor to write -> (the tensors it is made from, how, which output): our model as
    `fmt` (to_hf) or `fmt` as ours. A tied LM head is not a tensor of its own on either side."""
    out = {}
    for ours, theirs, forward, back, _ in _pairs(cfg, fmt):
        src, dst, fn = (ours, theirs, forward) if to_hf else (theirs, ours, back)
        for index, name in enumerate(dst):
            out[name] = (src, fn, index)
    return out


def check_dropped(tensors, cfg: ModelConfig, fmt: str, to_hf: bool):
    """Refuse, naming it, a nonzero tensor the conversion would leave out (exact only where
    zero); `tensors`: a state dict, or a file read one tensor at a time."""
    for name in (n for ours, theirs, _, _, zeros in _pairs(cfg, fmt) for n in zeros
                 if n in (ours if to_hf else theirs)):
        if name in tensors and tensors[name].any():
            lacking = f"{fmt} has" if to_hf else "minimoe's model has"
            raise ValueError(f"{name}: nonzero, and {lacking} no such tensor")


def convert(tensors: dict[str, torch.Tensor], cfg: ModelConfig, fmt: str, to_hf: bool) -> dict:
    """A state dict converted in memory; a tied LM head passes through where present."""
    check_dropped(tensors, cfg, fmt, to_hf)
    out = {name: fn(*(tensors[s] for s in srcs))[i]
           for name, (srcs, fn, i) in plan(cfg, fmt, to_hf).items()}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    return out


def hf_model(model, fmt: str):
    """A transformers model holding the same weights as ours (for checks and notebooks)."""
    from transformers import AutoModelForCausalLM  # optional dependency, heavy to import

    hf = AutoModelForCausalLM.from_config(hf_config(model.cfg, fmt))
    hf.load_state_dict(convert(model.state_dict(), model.cfg, fmt, to_hf=True), strict=True)
    return hf.to(next(model.parameters()).dtype)
