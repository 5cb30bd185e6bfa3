"""Numbers and tables people read: sizes in K/M/B/T, table cells, `minimoe info`."""

from __future__ import annotations

import json

import pandas as pd

from minimoe.config import get_preset


def human(n: float) -> str:
    """1234567 -> '1.23M' (parameters, FLOPs, tokens)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def param_table(presets: list[str]) -> pd.DataFrame:
    """Parameters per component (millions) of each preset, one row each, with total and active."""
    table = pd.DataFrame({name: get_preset(name).param_counts() for name in presets}).T / 1e6
    return table.loc[:, (table != 0).any()]  # drop components no preset has


def info_table(preset: str, as_json: bool = False) -> str:
    cfg = get_preset(preset)
    counts = cfg.param_counts()
    if as_json:
        return json.dumps({"preset": preset, "config": cfg.to_dict(), "params": counts}, indent=2)
    rows = [("layers", cfg.n_layers), ("d_model", cfg.d_model),
            ("heads / kv heads / head dim", f"{cfg.n_heads} / {cfg.n_kv_heads} / {cfg.head_dim}"),
            ("ffn width", cfg.d_ffn), ("vocab", cfg.vocab_size), ("context", cfg.max_seq_len),
            ("qkv bias", cfg.qkv_bias), ("tied embeddings", cfg.tie_embeddings),
            ("rope theta", cfg.rope_theta)]
    if cfg.is_moe:
        rows += [("experts / top-k", f"{cfg.n_experts} / {cfg.top_k}"),
                 ("expert ffn width", cfg.expert_d_ffn), ("MoE layers", cfg.n_moe_layers),
                 ("gate", cfg.gate)]
    shapes = pd.DataFrame([(k, str(v)) for k, v in rows], columns=["shape", "value"]).set_index("shape")
    params = pd.DataFrame(
        [(k, f"{v:,}", human(v), f"{100 * v / counts['total']:.1f}%") for k, v in counts.items()
         if v or k in ("total", "active")],
        columns=["component", "parameters", "", "share"]).set_index("component")
    return f"{preset}\n\n{shapes.to_string()}\n\n{params.to_string()}"


def fmt_value(value) -> str:
    """A table cell people read: thousands separated, about four significant digits."""
    if value is None or value != value:  # None or NaN: not known for this row
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.2f}" if abs(value) < 1e4 \
            else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
