"""The simulator against published, measured training runs (`minimoe validate`, sims/validation/).

Each file of sims/validation/ holds `[[runs]]` of one source: the model, the devices, the layout,
the measured figure, and how the source counts FLOPs (`flops`). Keys at the top of a file are
defaults for its runs (a top-level `layout` table is merged into each run's). A measured figure
is turned back into tokens per second with the source's own FLOP formula (`SOURCE_FLOPS`), so
every run is compared in one unit, and shown as MFU under one definition (minimoe.flops, causal).

Fitting: at most one constant per device family, `gemm_efficiency`, fitted on the dense runs of
published sources only (the median |log error| minimised over a grid). MoE runs and the
AquilaMoE phases (`set = "aquilamoe"`) are predicted with it, never fitted; a family with no
dense run (the paper's unnamed chip) uses the median of the fitted constants.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from minimoe import files
from minimoe.checks import check, known_keys
from minimoe.config import ModelConfig, get_preset
from minimoe.flops import RECOMPUTE, flops_per_token
from minimoe.sim.cost import TIME_PARTS, SimResult, WorkloadStats, price, simulate
from minimoe.sim.hardware import CATALOGUE, Device, device_from_table, get_device
from minimoe.sim.layout import Layout, Workload, check_layout
from minimoe.sim.options import Options
from minimoe.sim.search import search_layouts
from minimoe.tables import fmt_value


FAMILIES = {"a100": "ampere", "a800": "ampere", "h100": "hopper", "h800": "hopper",
            "h200": "hopper", "b200": "blackwell"}
RUN_KEYS = {"name", "kind", "set", "model", "preset", "gpu", "devices", "seq_len", "global_batch",
            "batch_tokens", "layout", "virtual_stages", "measured", "measured_unit", "flops",
            "peak_tflops_source", "wallclock", "options", "variant_of"}
FILE_KEYS = RUN_KEYS - {"name", "measured"} | {"title", "source", "runs", "devices"}
UNITS = ("tflops_per_gpu", "mfu", "tokens_per_day_b")
EFFICIENCY_GRID = np.round(np.arange(0.30, 0.951, 0.01), 2)


def _narayanan_eq3(cfg: ModelConfig, s: int) -> float:
    """Narayanan et al. 2021 eq. 3 per token: 96 l h^2 (1 + s/6h + V/16lh) (recompute, full square)."""
    L, h, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    return 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))


def _megatron_2024(cfg: ModelConfig, s: int) -> float:
    """megatron/training/training.py num_floating_point_operations (r0.8.0) per token:
    12 L h^2 [(1 + G/H + s/h) q/h + (f/h) k 3/2 + (f_shared/h) 3/2 + V / (2 L h)] (SwiGLU)."""
    L, h, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    q = cfg.n_heads * cfg.head_dim
    ffn, k = ((cfg.expert_d_ffn or cfg.d_ffn), cfg.top_k) if cfg.is_moe else (cfg.d_ffn, 1)
    return 12 * L * h * h * ((1 + cfg.n_kv_heads / cfg.n_heads + s / h) * q / h
                             + ffn / h * k * 1.5 + cfg.shared_d_ffn / h * 1.5 + V / (2 * L * h))


SOURCE_FLOPS = {  # how a source counts FLOPs per token
    "narayanan-eq3": _narayanan_eq3,
    "megatron-2024": _megatron_2024,
    "megatron-2025": lambda cfg, s: flops_per_token(cfg, s, attention="causal").model,
    "tokens": None,  # the source gives tokens, no FLOPs
}


@dataclass(frozen=True)
class Run:
    name: str
    source: str
    set: str  # "published" or "aquilamoe"
    kind: str  # "dense" or "moe"
    cfg: ModelConfig
    device: Device
    family: str
    workload: Workload
    layout: Layout | None  # None: the fastest layout the search finds
    options: Options
    devices: int
    measured_tokens_per_s: float
    wallclock: bool
    variant_of: str = ""  # the run this one changes (a layout): its speed-up is compared too


def load_runs(folder: str | Path) -> list[Run]:
    """Every run of every *.toml in `folder`, validated (one-line ValueErrors)."""
    folder = Path(folder)
    paths = sorted(folder.glob("*.toml"))
    if not paths:
        raise ValueError(f"{folder}: no validation files (*.toml)")
    runs = []
    for path in paths:
        runs += _file_runs(files.read_toml(path), path)
    return runs


def _file_runs(data: dict, path: Path) -> list[Run]:
    known_keys(f"{path}: ", data, FILE_KEYS)
    catalogue = dict(CATALOGUE)
    for name, table in data.get("devices", {}).items():
        catalogue[name.lower()] = device_from_table(name.lower(), table, f"{path}: devices.{name}")
    defaults = {k: v for k, v in data.items() if k in RUN_KEYS}
    runs = []
    for i, table in enumerate(data.get("runs", [])):
        where = f"{path.name}: runs[{i}]"
        known_keys(where, table, RUN_KEYS)
        merged = {**defaults, **table,
                  "layout": {**defaults.get("layout", {}), **table.get("layout", {})},
                  "options": {**defaults.get("options", {}), **table.get("options", {})}}
        if merged["options"].get("imbalance_log"):  # a run's routing, next to this file
            merged["options"]["imbalance_log"] = str(path.parent / merged["options"]["imbalance_log"])
        runs.append(_run(merged, where, catalogue, data.get("source", str(path))))
    return runs


def _run(t: dict, where: str, catalogue: dict, source: str) -> Run:
    def need(key):
        if key not in t:
            raise ValueError(f"{where}.{key}: missing")
        return t[key]

    seq = t.get("seq_len", 4096)
    for key, rule in (("seq_len", "int[1, 16777216]"), ("global_batch", "int[1, 1073741824]"),
                      ("batch_tokens", "int[1, 1099511627776]"), ("devices", "int[1, 1048576]"),
                      ("measured", "[1e-9, 1e15]")):
        if key in t:
            check(where, key, t[key], rule)
    if "preset" in t:
        cfg = get_preset(t["preset"])
    else:
        try:
            cfg = ModelConfig.from_dict({"max_seq_len": seq, **need("model")})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}.model: {err}") from None
    device = get_device(need("gpu"), catalogue)
    try:
        options = Options().replace(**t["options"], virtual_stages=t.get("virtual_stages", 1))
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None
    batch = t.get("global_batch") or need("batch_tokens") // seq
    workload = Workload(cfg, seq, batch)
    layout = Layout(**t["layout"]) if {"tp", "dp"} & set(t["layout"]) else None
    devices = need("devices")
    if layout is not None:
        check_layout(layout, workload, devices, where=f"{where}.layout")
    unit, definition, value = need("measured_unit"), need("flops"), need("measured")
    if unit not in UNITS or definition not in SOURCE_FLOPS:
        raise ValueError(f"{where}: measured_unit={unit!r} / flops={definition!r}: must be one "
                         f"of {', '.join(UNITS)} / {', '.join(SOURCE_FLOPS)}")
    check(where, "measured", value, ">0")
    if unit == "tokens_per_day_b":
        tokens_per_s = value * 1e9 / 86400
    else:
        per_gpu = value * 1e12 if unit == "tflops_per_gpu" else value * need("peak_tflops_source") * 1e12
        tokens_per_s = per_gpu * devices / SOURCE_FLOPS[definition](cfg, seq)
    kind = need("kind")
    return Run(name=need("name"), source=source, set=t.get("set", "published"), kind=kind,
               cfg=cfg, device=device, family=FAMILIES.get(device.name, device.name),
               workload=workload, layout=layout, options=options,
               devices=devices, measured_tokens_per_s=tokens_per_s,
               wallclock=bool(t.get("wallclock", False)), variant_of=str(t.get("variant_of", "")))


def predict(run: Run, gemm_efficiency: float | None = None) -> SimResult:
    """The simulator's result for a run: its layout, or the fastest one found on its devices."""
    opt = run.options if gemm_efficiency is None else run.options.replace(gemm_efficiency=gemm_efficiency)
    if run.layout is not None:
        return simulate(run.workload, run.layout, run.device, opt)
    best = search_layouts(run.workload, run.device, run.devices, opt).fastest
    if best is None:
        raise ValueError(f"{run.name}: no layout fits on {run.devices} {run.device.name}")
    return best


def predicted_tokens_per_s(run: Run, result: SimResult) -> float:
    return result.tokens_per_s * (result.goodput["goodput"] if run.wallclock else 1.0)


def fit_efficiency(runs: list[Run]) -> dict[str, float]:
    """One gemm_efficiency per device family, from its published dense runs (median |log error|)."""
    fitted = {}
    for family in sorted({r.family for r in runs}):
        chosen = [r for r in runs if r.family == family and r.kind == "dense"
                  and r.set == "published" and r.layout is not None]
        if not chosen:
            continue
        cols = [(r, WorkloadStats(r.workload, r.options)) for r in chosen]
        scores = []
        for eff in EFFICIENCY_GRID:
            errors = []
            for r, st in cols:
                opt = r.options.replace(gemm_efficiency=float(eff))
                lay = r.layout
                out = price(st, r.device, opt, lay.tp, lay.pp, lay.dp, lay.ep, lay.zero,
                            lay.micro_batch, RECOMPUTE.index(lay.recompute), lay.expert_tp)
                errors.append(abs(math.log(float(out["tokens_per_s"]) / r.measured_tokens_per_s)))
            scores.append(statistics.median(errors))
        fitted[family] = float(EFFICIENCY_GRID[int(np.argmin(scores))])
    return fitted


@dataclass(frozen=True)
class Validation:
    rows: list[dict]
    fitted: dict[str, float]
    summary: dict  # (set, kind) -> {"n", "median_abs_error", "max_abs_error"}
    slowdown: dict | None  # AquilaMoE 16B -> 8x16B, predicted against measured
    breakdown: dict  # AquilaMoE phase -> time parts in seconds per step
    sensitivity: list[dict]
    variants: list[dict]  # a run's speed-up over the run it varies, measured and predicted


def validate(folder: str | Path) -> Validation:
    """Fit on the published dense runs, predict everything, and summarise the errors."""
    runs = load_runs(folder)
    fitted = fit_efficiency(runs)
    default = statistics.median(fitted.values()) if fitted else None
    rows, results = [], {}
    for run in runs:
        eff = fitted.get(run.family, default)
        result = predict(run, eff)
        results[run.name] = (run, result, eff)
        predicted = predicted_tokens_per_s(run, result)
        per_token = flops_per_token(run.cfg, run.workload.seq_len, attention="causal").model
        mfu = lambda tps: tps * per_token / (run.devices * run.device.peak_flops)  # noqa: E731
        rows.append({"run": run.name, "set": run.set, "kind": run.kind, "device": run.device.name,
                     "GPUs": run.devices, "layout": result.layout.label(),
                     "gemm_efficiency": eff, "fitted on": "yes" if run.family in fitted and
                     run.kind == "dense" and run.set == "published" else "no",
                     "measured tok/s/GPU": run.measured_tokens_per_s / run.devices,
                     "predicted tok/s/GPU": predicted / run.devices,
                     "measured MFU": mfu(run.measured_tokens_per_s), "predicted MFU": mfu(predicted),
                     "error": predicted / run.measured_tokens_per_s - 1,
                     "fits": result.fits})
    summary = {}
    for key in sorted({(r["set"], r["kind"]) for r in rows}):
        errors = [abs(r["error"]) for r in rows if (r["set"], r["kind"]) == key]
        summary[key] = {"n": len(errors), "median_abs_error": statistics.median(errors),
                        "max_abs_error": max(errors)}
    aquila = {n: v for n, v in results.items() if v[0].set == "aquilamoe"}
    breakdown = {n: {k: r.time[k] for k in TIME_PARTS} | {"tokens_per_step": r.tokens_per_step}
                 for n, (_, r, _) in aquila.items()}
    slowdown, sensitivity = _slowdown(aquila)
    variants = []
    for run, result, _ in (v for v in results.values() if v[0].variant_of):
        if run.variant_of not in results:
            raise ValueError(f"{run.name}: variant_of={run.variant_of!r}: no run of that name")
        base, base_result, _ = results[run.variant_of]
        variants.append({"run": run.name, "of": base.name,
                         "measured": run.measured_tokens_per_s / base.measured_tokens_per_s,
                         "predicted": predicted_tokens_per_s(run, result)
                         / predicted_tokens_per_s(base, base_result)})
    return Validation(rows, fitted, summary, slowdown, breakdown, sensitivity, variants)


def _slowdown(aquila: dict) -> tuple[dict | None, list[dict]]:
    """Tokens/s of the dense 16B over the 8x16B on the same devices, and what moves it."""
    dense = [v for v in aquila.values() if v[0].kind == "dense" and v[0].device.name != "h800"]
    moe = [v for v in aquila.values() if v[0].kind == "moe"]
    if not dense or not moe:
        return None, []
    (d_run, d_res, eff), (m_run, m_res, _) = dense[-1], moe[-1]
    measured = d_run.measured_tokens_per_s / m_run.measured_tokens_per_s
    predicted = predicted_tokens_per_s(d_run, d_res) / predicted_tokens_per_s(m_run, m_res)
    slowdown = {"dense": d_run.name, "moe": m_run.name, "measured": measured,
                "predicted": predicted, "error": predicted / measured - 1,
                "flop_ratio": m_res.model_flops_per_token / d_res.model_flops_per_token}
    rows = []
    balanced = {"imbalance_log": "", "imbalance": 1.0}
    same = "the run's layout"
    for label, change, dev_change, layout in (
            ("routing balanced (imbalance 1.0)", balanced, {}, same),
            ("imbalance 1.25", {**balanced, "imbalance": 1.25}, {}, same),
            ("imbalance 2.0", {**balanced, "imbalance": 2.0}, {}, same),
            ("the fastest layout found instead", {}, {}, None),
            ("fastest layout, balanced routing", balanced, {}, None),
            ("all-to-all fully hidden", {"overlap_ep": 1.0}, {}, same),
            ("network bandwidth x 0.5", {}, {"inter_node_bw": 0.5}, same),
            ("network bandwidth x 2", {}, {"inter_node_bw": 2.0}, same),
            ("node links (NVLink) x 0.25", {}, {"intra_node_bw": 0.25}, same),
            ("HBM 64 GB instead of 80", {}, {"hbm_bytes": 0.8}, same),
            ("gemm_efficiency - 0.1", {"gemm_efficiency": eff - 0.1}, {}, same),
            ("no memory-bound work", {"memory_bound_work": False}, {}, same)):
        ratio = []
        for run in (d_run, m_run):
            device = run.device.replace(**{k: getattr(run.device, k) * v for k, v in dev_change.items()})
            opt = run.options.replace(**{"gemm_efficiency": eff, **change})
            res = predict(dataclasses.replace(run, device=device, options=opt,
                                              layout=run.layout if layout == same else layout))
            ratio.append(predicted_tokens_per_s(run, res))
        rows.append({"change": label, "slowdown": ratio[0] / ratio[1]})
    return slowdown, rows


def validation_text(v: Validation) -> str:
    """What `minimoe validate` prints: per run, the summary, the AquilaMoE slowdown and breakdown."""
    frame = pd.DataFrame(v.rows).set_index("run")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        table = frame.drop(columns=["fits"]).map(fmt_value).to_string()
    lines = ["Predicted against measured, per run (tokens/s per GPU; MFU = minimoe.flops causal "
             "model FLOPs / peak, one definition for every source):", table, "",
             "fitted gemm_efficiency per device family (dense published runs only): "
             + ", ".join(f"{k} {x:.2f}" for k, x in v.fitted.items()), ""]
    for (group, kind), s in v.summary.items():
        lines.append(f"{group:9s} {kind:5s} runs: {s['n']:2d}  median |error| "
                     f"{s['median_abs_error']:6.1%}   max |error| {s['max_abs_error']:6.1%}")
    not_fitting = [r["run"] for r in v.rows if not r["fits"]]
    if not_fitting:
        lines.append(f"over the memory model's budget (time still predicted): {', '.join(not_fitting)}")
    if v.variants:
        lines += ["", "speed-up of a run over the run it varies:"]
        lines += [f"  {r['run']} over {r['of']}: measured {r['measured']:.3f}x, predicted "
                  f"{r['predicted']:.3f}x" for r in v.variants]
    if v.slowdown:
        s = v.slowdown
        lines += ["", f"AquilaMoE {s['dense']} -> {s['moe']} on the same devices: measured "
                  f"{s['measured']:.2f}x slower, predicted {s['predicted']:.2f}x "
                  f"(error {s['error']:+.1%}; the FLOP ratio alone is {s['flop_ratio']:.2f}x)",
                  "what moves the predicted slowdown (one input changed at a time):"]
        lines += [f"  {r['change']:34s} {r['slowdown']:.2f}x" for r in v.sensitivity]
    if v.breakdown:
        lines += ["", "AquilaMoE phases, seconds per step by term:"]
        parts = pd.DataFrame(v.breakdown).drop(index="tokens_per_step").T
        lines.append(parts.map(fmt_value).to_string())
    return "\n".join(lines)


def validation_json(v: Validation) -> str:
    summary = {f"{group} {kind}": s for (group, kind), s in v.summary.items()}
    return json.dumps({"runs": v.rows, "fitted": v.fitted, "summary": summary,
                       "slowdown": v.slowdown, "sensitivity": v.sensitivity,
                       "breakdown": v.breakdown, "variants": v.variants}, indent=2)
