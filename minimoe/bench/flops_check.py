"""The analytic FLOP count (minimoe.flops) against fvcore's count of a real forward
(`minimoe flops --check`, tests/test_flops.py). It runs torch and fvcore, so it sits beside the
library: minimoe.flops and the simulator stay arithmetic that imports neither."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fvcore.nn import FlopCountAnalysis

from minimoe.config import ModelConfig
from minimoe.flops import flop_rows, flop_unit
from minimoe.model import Transformer
from minimoe.moe import MoE

CHECK_MAX_PARAMS = 50_000_000  # above this, fvcore runs a shallow copy (see fvcore_check)
CHECK_VOCAB = 1024  # the shallow copy's vocabulary
GROUPS = {"attention": ("attn_qkv", "attn_core", "attn_out"),
          "mlp / experts": ("mlp", "router", "experts", "shared_experts"),
          "lm_head": ("lm_head",)}


def sdpa_macs(inputs, outputs) -> float:
    """fvcore handle: multiply-adds of QK^T and AV, halved when is_causal (our convention).
    fvcore has no rule of its own for scaled_dot_product_attention."""
    q, k, v = (inputs[i].type().sizes() for i in range(3))
    batch, heads, t_q, d_qk = q
    macs = batch * heads * t_q * k[2] * d_qk + batch * heads * t_q * k[2] * v[3]
    is_causal = inputs[5].toIValue()
    return macs / 2 if is_causal else macs


def grouped_mm_macs(inputs, outputs) -> float:
    """fvcore handle for torch's grouped matmul (S, D) x (E, D, F): each row meets one expert."""
    rows, inner = inputs[0].type().sizes()
    return rows * inner * inputs[1].type().sizes()[-1]


def fvcore_analysis(model, idx) -> FlopCountAnalysis:
    """fvcore's count of one forward of `model` on `idx`, with our two handles installed."""
    analysis = FlopCountAnalysis(model, (idx,))
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
    analysis.set_op_handle("aten::_grouped_mm", grouped_mm_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


@dataclass(frozen=True)
class FlopCheck:
    """Analytic forward FLOPs per token against fvcore's count of a real forward (x 2)."""

    seq_len: int
    tokens: int  # batch x seq_len tokens in the traced forward
    copy: ModelConfig  # the model that ran (the preset itself when small enough)
    analytic: dict[str, float]  # per token, by GROUPS and "total"
    fvcore: dict[str, float]  # per token, 2 x multiply-adds, extrapolated to the preset
    routed_pairs: list[int]  # token-expert pairs that reached an expert, per MoE layer run
    notes: list[str]

    def ratio(self, group: str = "total") -> float:
        return self.fvcore[group] / self.analytic[group] if self.analytic[group] else float("nan")


def shallow_copy(cfg: ModelConfig) -> ModelConfig:
    """The layers of one period of the MoE pattern (one layer when uniform) and a small
    vocabulary: every per-layer count and the LM head's count per vocabulary entry stay the same."""
    period = cfg.moe_layer_freq if cfg.is_moe else 1
    return cfg.replace(n_layers=min(cfg.n_layers, period),
                       vocab_size=min(cfg.vocab_size, CHECK_VOCAB))


def _unwritten_model(cfg: ModelConfig) -> Transformer:
    """A model whose large matrices are allocated but never written: fresh pages that read as
    zero cost no memory, so one layer of aquilamoe-8x16b (2.6B parameters) runs on a laptop.
    The rest (router, attention, norms) is initialised from a fixed seed, so the routing is a
    real one; the values of the large matrices change no shape, so no count."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.numel() <= 2**26:
                p.normal_(0.0, cfg.init_std, generator=generator)
    return model


def fvcore_check(cfg: ModelConfig, seq_len: int = 64, batch: int = 1) -> FlopCheck:
    """Count a real forward with fvcore and compare it with `flops_per_token` at `seq_len`.

    A preset above CHECK_MAX_PARAMS runs as `shallow_copy`: fvcore's count of each copied
    layer is multiplied by the number of layers of its kind, and the LM head's by
    vocab / copy vocab. Dense layers agree exactly; an MoE layer's experts count what the
    router actually sent them (with dropless routing, tokens x top_k pairs: exact too).
    """
    if not isinstance(seq_len, int) or not 0 < seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive integer <= max_seq_len="
                         f"{cfg.max_seq_len}")
    small = cfg.param_counts()["total"] <= CHECK_MAX_PARAMS
    copy = cfg if small else shallow_copy(cfg)
    model = _unwritten_model(copy).eval()
    idx = torch.randint(0, copy.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(0))
    by_module = fvcore_analysis(model, idx).by_module()
    tokens = batch * seq_len
    fv = {"attention": 0.0, "mlp / experts": 0.0}
    for layer in range(cfg.n_layers):  # layer i behaves as the copy's layer i mod period
        source = layer % copy.n_layers
        fv["attention"] += by_module[f"layers.{source}.attn"]
        fv["mlp / experts"] += by_module[f"layers.{source}.mlp"]
    fv["lm_head"] = by_module["lm_head"] * cfg.vocab_size / copy.vocab_size
    fv = {group: 2 * macs / tokens for group, macs in fv.items()}  # multiply-add = 2 FLOPs
    fv["total"] = sum(fv.values())
    rows = {r.component: r.forward for r in flop_rows(cfg, seq_len)}
    analytic = {group: sum(rows.get(c, 0.0) for c in parts) for group, parts in GROUPS.items()}
    analytic["total"] = sum(analytic.values())
    routed = [int(m.load_E.sum() - m.dropped_E.sum())
              for m in model.modules() if isinstance(m, MoE)]
    notes = [f"fvcore traced one forward of {batch} x {seq_len} tokens; it counts "
             "multiply-adds, shown here x 2"]
    if not small:
        notes.append(f"ran a shallow copy ({copy.n_layers} layer(s), vocabulary "
                     f"{copy.vocab_size}; matrices above 2^26 entries left unwritten): each of "
                     f"the {cfg.n_layers} layers counted as the copy's layer of its kind, the "
                     f"LM head x {cfg.vocab_size}/{copy.vocab_size}")
    if cfg.is_moe:
        notes.append(f"experts counted as routed: {routed} token-expert pairs reached an "
                     f"expert (of {tokens * cfg.top_k} asked) in the MoE layer(s) that ran")
    return FlopCheck(seq_len, tokens, copy, analytic, fv, routed, notes)


def check_report(cfg: ModelConfig, name: str, seq_len: int = 64) -> str:
    """The text `minimoe flops --check` prints: analytic vs fvcore per group, with ratios."""
    check = fvcore_check(cfg, seq_len)
    unit, size = flop_unit(check.analytic["total"])
    lines = [f"{name}: forward FLOPs per token at seq_len {seq_len}, analytic vs fvcore "
             f"({unit})", f"  {'':15s} {'analytic':>14s} {'fvcore x 2':>14s} {'ratio':>9s}"]
    for group in (*GROUPS, "total"):
        lines.append(f"  {group:15s} {check.analytic[group] / size:14,.4f} "
                     f"{check.fvcore[group] / size:14,.4f} {check.ratio(group):9.6f}")
    return "\n".join(lines + [f"  ({note})" for note in check.notes])
