"""Analytic FLOPs of a ModelConfig, per component and per token. Matmuls only,
2 FLOPs per multiply-add, backward = 2 x forward, MoE layers the top-k experts a token visits;
the attention core counted `causal` or `full`, recomputation added to the hardware FLOPs
(conventions and sources: docs/simulator.md#flop-conventions)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from minimoe.config import ModelConfig

ATTENTION = ("causal", "full")
RECOMPUTE = ("none", "selective", "full")
UNITS = (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3), ("FLOP", 1.0))


def flop_unit(value: float) -> tuple[str, float]:
    """The largest unit in which `value` reads as at least 1 (so a toy is not 0.00 GFLOP)."""
    return next(((name, size) for name, size in UNITS if abs(value) >= size), UNITS[-1])


@dataclass(frozen=True)
class FlopRow:
    """One component of the model, summed over all layers, for one token."""

    component: str
    kind: str  # "matmul" (counted), "lookup" or "elementwise" (0 FLOPs, shown for its params)
    params: int
    active_params: int  # what one token uses (top-k experts only)
    forward: float  # FLOPs per token, forward pass
    in_layers: bool  # inside the transformer blocks, i.e. recomputed by full recompute
    note: str = ""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token of a model at one sequence length, with the breakdown behind them."""

    seq_len: int
    attention: str  # "causal" or "full": which count of the attention core the totals use
    recompute: str
    rows: list[FlopRow]
    forward: float  # per token
    backward: float
    model: float  # forward + backward: the numerator of MFU
    hardware: float  # model + recomputation: what the GPUs execute
    attention_core_causal: float  # forward, per token, both conventions for the record
    attention_core_full: float
    params_total: int
    params_active: int
    notes: list[str] = field(default_factory=list)

    @property
    def six_n_active(self) -> float:
        """The 6·N_active rule of thumb (Kaplan 2020), as a cross-check on `model`."""
        return 6.0 * self.params_active

    def to_frame(self, unit: str = "GFLOP"):
        """The breakdown as a pandas DataFrame (one row per component, plus a total), the
        FLOPs in `unit` (one of UNITS)."""
        size = dict(UNITS)[unit]
        records = [{"component": r.component, "kind": r.kind, "params": r.params,
                    "active_params": r.active_params, f"forward_{unit}": r.forward / size,
                    f"train_{unit}": 3 * r.forward / size,
                    "share_%": 100 * r.forward / self.forward, "note": r.note}
                   for r in self.rows]
        records.append({"component": "total", "kind": "", "params": self.params_total,
                        "active_params": self.params_active,
                        f"forward_{unit}": self.forward / size, f"train_{unit}": self.model / size,
                        "share_%": 100.0, "note": f"attention counted {self.attention}"})
        return pd.DataFrame(records).set_index("component")

    def summary(self) -> dict:
        """Scalars for --json and for tests (per token, FLOPs)."""
        return {"seq_len": self.seq_len, "attention": self.attention,
                "recompute": self.recompute, "forward": self.forward,
                "backward": self.backward, "model": self.model, "hardware": self.hardware,
                "attention_core_causal": self.attention_core_causal,
                "attention_core_full": self.attention_core_full,
                "six_n_active": self.six_n_active, "params_total": self.params_total,
                "params_active": self.params_active, "notes": self.notes}


def flop_rows(cfg: ModelConfig, seq_len: int, attention: str = "causal",
              include_router: bool = True) -> list[FlopRow]:
    """Per-component forward FLOPs per token (summed over layers) and parameters."""
    assert attention in ATTENTION and seq_len > 0, (attention, seq_len)  # the CLI's and sim's rules
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    q = cfg.n_heads * cfg.head_dim  # query width
    kv = cfg.n_kv_heads * cfg.head_dim  # key (= value) width: GQA shrinks K and V only
    n_moe = cfg.n_moe_layers
    n_dense = L - n_moe
    E, k = cfg.n_experts, cfg.top_k
    counts = cfg.param_counts()

    # QK^T and AV: each 2·s·q FLOPs per query token over the full square; causal keeps half
    # (Megatron's "/2 causal mask"; the exact count would be (s+1)/(2s) of the square)
    core_full = 2 * (2 * seq_len * q)
    core = core_full / 2 if attention == "causal" else core_full
    expert = 3 * d * cfg.expert_d_ffn
    qkv_params = L * (d * (q + 2 * kv) + (q + 2 * kv) * cfg.qkv_bias)
    rows = [
        FlopRow("embedding", "lookup", counts["embedding"], counts["embedding"], 0.0, False,
                "table lookup: 0 FLOPs"),
        FlopRow("attn_qkv", "matmul", qkv_params, qkv_params, L * 2.0 * d * (q + 2 * kv), True,
                "GQA: K,V are n_kv_heads wide" + ("; bias add not counted" if cfg.qkv_bias else "")),
        FlopRow("attn_core", "matmul", 0, 0, L * core, True,
                f"QK^T + AV, {attention} ({'s/2' if attention == 'causal' else 's'} keys/query)"),
        FlopRow("attn_out", "matmul", L * q * d, L * q * d, L * 2.0 * q * d, True),
        FlopRow("mlp", "matmul", counts["mlp"], counts["mlp"],
                n_dense * 2.0 * 3 * d * cfg.d_ffn, True, "SwiGLU: gate, up, down"),
        FlopRow("router", "matmul" if include_router else "elementwise", counts["router"],
                counts["router"], n_moe * 2.0 * d * E if include_router else 0.0, True,
                "2·d·E per token" if include_router else "not counted (Megatron convention)"),
        FlopRow("experts", "matmul", counts["experts"], n_moe * k * expert,
                n_moe * k * 2.0 * expert, True, f"top-{k} of {E} experts" if E else ""),
        FlopRow("shared_experts", "matmul", counts["shared_experts"], counts["shared_experts"],
                n_moe * 2.0 * 3 * d * cfg.shared_d_ffn, True),
        FlopRow("norms", "elementwise", counts["norms"], counts["norms"], 0.0, True,
                "RMSNorm: elementwise, not counted"),
        FlopRow("lm_head", "matmul", counts["lm_head"], counts["lm_head"], 2.0 * d * V, False,
                "tied to embedding" if cfg.tie_embeddings else ""),
    ]
    return [r for r in rows if r.params or r.forward or r.component in ("attn_core", "lm_head")]


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, attention: str = "causal",
                    recompute: str = "none", include_router: bool = True,
                    pad_to_capacity: bool = False) -> FlopCount:
    """Training FLOPs per token of `cfg` at `seq_len` (default: cfg.max_seq_len). pad_to_capacity:
    the expert GEMMs run on buffers of capacity tokens, filled or not (GShard, Lepikhin et al.
    2020, §2.2), so the hardware runs capacity_factor x the expert FLOPs; dropless (minimoe) not."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: must be one of {', '.join(RECOMPUTE)}")
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    rows = flop_rows(cfg, seq_len, attention, include_router)
    by_name = {r.component: r for r in rows}
    forward = sum(r.forward for r in rows)
    model = 3 * forward  # forward + 2x forward backward
    extra = 0.0
    if recompute == "selective":
        extra = by_name["attn_core"].forward
    elif recompute == "full":
        extra = sum(r.forward for r in rows if r.in_layers)
    notes = [f"attention core counted {attention}",
             "one multiply-add = 2 FLOPs; fvcore reports multiply-adds",
             "embedding lookup and elementwise ops (norms, RoPE, softmax, SiLU, bias) not counted"]
    hardware = model + extra
    if pad_to_capacity and cfg.capacity_factor > 0 and "experts" in by_name:
        runs = 3 + (1 if recompute == "full" else 0)  # fwd, 2x bwd, recomputed fwd
        hardware += (cfg.capacity_factor - 1) * runs * by_name["experts"].forward
        notes.append(f"expert GEMMs padded to capacity factor {cfg.capacity_factor}")
    L = cfg.n_layers
    q = cfg.n_heads * cfg.head_dim
    counts = cfg.param_counts()
    return FlopCount(seq_len=seq_len, attention=attention, recompute=recompute, rows=rows,
                     forward=forward, backward=2 * forward, model=model, hardware=hardware,
                     attention_core_causal=L * 2.0 * seq_len * q,
                     attention_core_full=L * 4.0 * seq_len * q,
                     params_total=counts["total"], params_active=counts["active"], notes=notes)


def flops_report(cfg: ModelConfig, name: str, seq_len: int | None = None,
                 attention: str = "causal", recompute: str = "none",
                 as_json: bool = False) -> str:
    """The text `minimoe flops` prints: the component table and the totals per token, in the
    unit that suits the model's size."""
    count = flops_per_token(cfg, seq_len, attention=attention, recompute=recompute)
    if as_json:
        rows = [r.__dict__ for r in count.rows]
        return json.dumps({"preset": name, **count.summary(), "rows": rows}, indent=2)
    unit, size = flop_unit(count.forward)
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:,.3f}".format):
        table = count.to_frame(unit).to_string(
            formatters={"params": "{:,}".format, "active_params": "{:,}".format})
    lines = [f"{name}: FLOPs per token at seq_len {count.seq_len} "
             f"(attention core counted {attention}; multiply-add = 2 FLOPs)", "", table, "",
             f"forward {count.forward / size:,.2f} {unit}, backward {count.backward / size:,.2f}, "
             f"model (fwd+bwd) {count.model / size:,.2f}, hardware with recompute={recompute} "
             f"{count.hardware / size:,.2f}",
             f"attention core forward: causal {count.attention_core_causal / size:,.3f}, "
             f"full {count.attention_core_full / size:,.3f} {unit}",
             f"6 x N_active = {count.six_n_active / size:,.2f} {unit} "
             f"(N_active {count.params_active:,} of {count.params_total:,})"]
    return "\n".join(lines)
