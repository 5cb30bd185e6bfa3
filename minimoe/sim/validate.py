"""The simulator against published training runs (`minimoe validate`; sims/validation/, one file
per source): measured figures back to tokens/s by the source's FLOP formula, two constants fitted,
each source predicted from the others with `cv` (docs/simulator.md "Validation")."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from minimoe import files
from minimoe.checks import check, from_table, known_keys
from minimoe.config import ModelConfig
from minimoe.flops import flops_per_token
from minimoe.sim.cost import TIME_PARTS, SimResult, WorkloadStats, corner_speeds, price, simulate
from minimoe.sim.hardware import Device, get_device, with_devices
from minimoe.sim.layout import Layout, Workload, check_layout, model_config
from minimoe.sim.options import Options, read_options
from minimoe.sim.search import search_layouts

FAMILIES = {"a100": "ampere", "a800": "ampere", "h100": "hopper", "h800": "hopper",
            "h200": "hopper", "b200": "blackwell"}
RUN_KEYS = {"name", "kind", "set", "model", "preset", "gpu", "devices", "seq_len", "global_batch",
            "batch_tokens", "layout", "virtual_stages", "measured", "measured_unit", "flops",
            "peak_tflops_source", "wallclock", "options", "variant_of"}
FILE_KEYS = RUN_KEYS - {"name", "measured"} | {"title", "source", "runs", "devices"}
UNITS = ("tflops_per_gpu", "mfu", "tokens_per_day_b")
EFFICIENCY_GRID = np.round(np.arange(0.30, 1.201, 0.005), 3)
SIGMA_GRID = np.round(np.arange(0.0, 0.0801, 0.002), 3)


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
    set: str  # "published" (calibration) or "aquilamoe" (predicted, never fitted)
    kind: str  # "dense" or "moe"
    cfg: ModelConfig
    device: Device
    workload: Workload
    layout: Layout | None  # None: the fastest layout the search finds
    options: Options
    devices: int
    measured_tokens_per_s: float
    wallclock: bool
    variant_of: str = ""  # the run this one changes (a layout): its speed-up is compared too


def load_runs(folder: str | Path) -> list[Run]:
    paths = sorted(Path(folder).glob("*.toml"))
    if not paths:
        raise ValueError(f"{folder}: no validation files (*.toml)")
    runs = []
    for path in paths:  # a file's run keys are defaults for its runs
        data = known_keys(f"{path}: ", files.read_toml(path), FILE_KEYS)
        catalogue = with_devices(data.get("devices", {}), f"{path}: ")
        defaults = {k: v for k, v in data.items() if k in RUN_KEYS}
        for i, table in enumerate(data.get("runs", [])):
            where = f"{path.name}: runs[{i}]"
            known_keys(where, table, RUN_KEYS)
            merged = {**defaults, **table,
                      "layout": {**defaults.get("layout", {}), **table.get("layout", {})},
                      "options": {**defaults.get("options", {}), **table.get("options", {})}}
            runs.append(_run(merged, where, catalogue, data.get("source", str(path)), path.parent))
    return runs


def _run(t: dict, where: str, catalogue: dict, source: str, folder: Path) -> Run:
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
    cfg = model_config(t.get("preset"), t.get("model"), where, seq)
    device = get_device(need("gpu"), catalogue)
    options = read_options({**t["options"], "virtual_stages": t.get("virtual_stages", 1)},
                           f"{where}.options", folder=folder)
    workload = Workload(cfg, seq, t.get("global_batch") or need("batch_tokens") // seq)
    layout = from_table(Layout, t["layout"], f"{where}.layout") if {"tp", "dp"} & set(t["layout"]) else None
    devices = need("devices")
    if layout is not None:
        check_layout(layout, workload, devices, where=f"{where}.layout")
    unit, definition, value = need("measured_unit"), need("flops"), need("measured")
    check(where, "measured_unit", unit, UNITS)
    check(where, "flops", definition, tuple(SOURCE_FLOPS))
    if unit == "tokens_per_day_b":
        tokens_per_s = value * 1e9 / 86400
    else:
        per_gpu = value * 1e12 if unit == "tflops_per_gpu" else value * need("peak_tflops_source") * 1e12
        tokens_per_s = per_gpu * devices / SOURCE_FLOPS[definition](cfg, seq)
    return Run(name=need("name"), source=source, set=t.get("set", "published"), kind=need("kind"),
               cfg=cfg, device=device, workload=workload, layout=layout, options=options,
               devices=devices, measured_tokens_per_s=tokens_per_s,
               wallclock=bool(t.get("wallclock", False)), variant_of=str(t.get("variant_of", "")))


# --- fitting: two constants, and where a new source's efficiency may fall -------------------
@dataclass(frozen=True)
class Calibration:
    """Each published run's log error over the grids of gemm_efficiency x straggler_sigma, and
    the constants taken from them (docs/simulator.md "What is fitted")."""

    errors: dict  # source -> (runs, efficiencies, sigmas) array of log(predicted / measured)
    node_span: dict  # source -> most nodes / fewest nodes among its runs

    def constants(self, leave_out: str | None = None) -> dict:
        """{name: (central, low, high)} from the sources but `leave_out`: the efficiency, the
        sources' median and the runs' 10th-90th percentile (sources weighing equally); sigma, its
        pooled fit and its range leaving each source out."""
        sources = [s for s in self.errors if s != leave_out]
        sigma = self._sigma(sources)
        spread = [self._sigma([s for s in sources if s != out]) for out in sources] \
            if len(sources) > 1 else []
        j = int(np.argmin(np.abs(SIGMA_GRID - sigma)))
        own = [EFFICIENCY_GRID[np.argmin(np.abs(self.errors[s][:, :, j]), axis=1)] for s in sources]
        runs, weights = np.concatenate(own), np.concatenate([np.full(len(e), 1 / len(e)) for e in own])
        order = np.argsort(runs)
        cumulative = (np.cumsum(weights[order]) - weights[order] / 2) / weights.sum()
        low, high = np.interp([0.1, 0.9], cumulative, runs[order])
        central = statistics.median(self.efficiency(s, sigma) for s in sources)
        return {"gemm_efficiency": (central, round(float(low), 3), round(float(high), 3)),
                "straggler_sigma": (sigma, min([sigma] + spread), max([sigma] + spread))}

    def _sigma(self, sources) -> float:
        spanning = [s for s in sources if self.node_span[s] >= 10]
        if not spanning:
            return 0.0
        scores = sum(np.abs(self.errors[s]).mean(axis=0).min(axis=0) for s in spanning)
        return float(SIGMA_GRID[int(np.argmin(scores))])

    def efficiency(self, source: str, sigma: float) -> float:
        """The efficiency `source`'s own runs imply at straggler sigma `sigma`."""
        j = int(np.argmin(np.abs(SIGMA_GRID - sigma)))
        return float(EFFICIENCY_GRID[int(np.argmin(np.abs(self.errors[source][:, :, j]).mean(axis=0)))])

    def options(self, base: Options, leave_out: str | None = None) -> Options:
        """`base` with the constants: central values, and their ranges as uncertain inputs."""
        c = self.constants(leave_out)
        return base.replace(**{k: v[0] for k, v in c.items()},
                            uncertain={k: [v[1], v[2]] for k, v in c.items()})


def calibrate(runs: list[Run]) -> Calibration:
    """Every published run's log error at every (efficiency, sigma) pair (stragglers scale a step
    by 1 + sigma sqrt(2 ln nodes), so the speeds at the efficiencies alone suffice)."""
    errors, span = {}, {}
    for source in sorted({r.source for r in runs if r.set == "published"}):
        chosen = [r for r in runs if r.source == source and r.set == "published" and r.layout]
        speeds = []  # tokens/s at every efficiency of the grid, one call of `price` a run
        for r in chosen:
            opt = r.options.replace(straggler_sigma=0.0)
            speeds.append(price(WorkloadStats(r.workload, opt), r.device, opt, r.layout.columns(),
                                efficiency=EFFICIENCY_GRID)["tokens_per_s"])
        speeds = np.array(speeds)  # (runs, efficiencies)
        nodes = np.array([math.ceil(r.devices / r.device.gpus_per_node) for r in chosen])
        spread = np.sqrt(2 * np.log(np.maximum(nodes, 1)))[:, None, None] * SIGMA_GRID
        measured = np.array([r.measured_tokens_per_s for r in chosen])[:, None, None]
        errors[source] = np.log(speeds[:, :, None] / (1 + spread) / measured)
        span[source] = nodes.max() / nodes.min()
    return Calibration(errors, span)


def predict(run: Run, options: Options) -> SimResult:
    """With its interval: the run's layout, or the fastest one found on its devices."""
    if run.layout is not None:
        return simulate(run.workload, run.layout, run.device, options)
    best = search_layouts(run.workload, run.device, run.devices, options).fastest
    if best is None:
        raise ValueError(f"{run.name}: no layout fits on {run.devices} {run.device.name}")
    return best


def _row(run: Run, result: SimResult, opt: Options) -> dict:
    share = result.goodput["goodput"] if run.wallclock else 1.0
    low, high = (x * share / run.devices for x in result.interval)
    measured = run.measured_tokens_per_s / run.devices
    predicted = result.tokens_per_s * share / run.devices
    cfg = run.cfg
    mfu = flops_per_token(cfg, run.workload.seq_len, attention="causal").model / run.device.peak_flops
    # runs of one model on one cluster, which `minimoe plan` must rank
    group = f"{cfg.n_layers}x{cfg.d_model}/{cfg.n_experts}E on {run.devices} {run.device.name}"
    return {"run": run.name, "set": run.set, "kind": run.kind, "source": run.source,
            "group": group, "device": run.device.name, "GPUs": run.devices,
            "layout": result.layout.label(), "measured tok/s/GPU": measured,
            "predicted tok/s/GPU": predicted, "low": low, "high": high,
            "measured MFU": measured * mfu, "predicted MFU": predicted * mfu,
            "error": predicted / measured - 1, "inside": bool(low <= measured <= high),
            "fits": result.fits, "gemm_efficiency": opt.gemm_efficiency}


def summarise(rows: list[dict]) -> dict:
    """(set, kind) -> n, median and max |error|, within 10%, and the interval's coverage."""
    out = {}
    for key in sorted({(r["set"], r["kind"]) for r in rows}):
        chosen = [r for r in rows if (r["set"], r["kind"]) == key]
        errors = [abs(r["error"]) for r in chosen]
        out[key] = {"n": len(errors), "median_abs_error": statistics.median(errors),
                    "max_abs_error": max(errors), "within_10": sum(e <= 0.1 for e in errors),
                    "coverage": sum(r["inside"] for r in chosen) / len(chosen)}
    return out


def rank_correlations(rows: list[dict]) -> dict:
    """Spearman's rank correlation of predicted and measured speed in each group of runs of one
    model on one cluster (what `minimoe plan` must get right)."""
    speeds = pd.DataFrame(rows).groupby("group")[["measured tok/s/GPU", "predicted tok/s/GPU"]]
    return {group: (len(part), float(part.corr(method="spearman").iloc[0, 1]))
            for group, part in speeds if len(part) > 1}


def _variants(predicted: dict) -> list[dict]:
    """Each run's speed-up over the run it varies: measured, predicted and its range."""
    out = []
    for run, result, opt in predicted.values():
        if not run.variant_of:
            continue
        if run.variant_of not in predicted:
            raise ValueError(f"{run.name}: variant_of={run.variant_of!r}: no run of that name")
        base, base_result, base_opt = predicted[run.variant_of]
        ratio = (corner_speeds(run.workload, result.layout, run.device, opt)
                 / corner_speeds(base.workload, base_result.layout, base.device, base_opt))
        out.append({"run": run.name, "of": base.name,
                    "measured": run.measured_tokens_per_s / base.measured_tokens_per_s,
                    "predicted": float(ratio[0]), "low": float(ratio.min()),
                    "high": float(ratio.max())})
    return out


@dataclass(frozen=True)
class Validation:
    rows: list[dict]  # in-sample: the constants fitted on every published source
    calibration: Calibration
    summary: dict  # (set, kind) -> summarise's figures
    ranks: dict  # group -> (runs, Spearman)
    variants: list[dict]  # a run's speed-up over the run it varies, measured and predicted
    predicted: dict  # run name -> (Run, SimResult, Options)
    cv_rows: list[dict] | None = None  # each published source predicted from the others
    cv_summary: dict | None = None
    cv_ranks: dict | None = None

    @property
    def breakdown(self) -> dict:
        """AquilaMoE phase -> its time parts (seconds per step) and tokens per step."""
        return {name: {k: result.time[k] for k in TIME_PARTS} | {"tokens_per_step": result.tokens_per_step}
                for name, (run, result, _) in self.predicted.items() if run.set == "aquilamoe"}

    @property
    def fitted(self) -> dict:
        """The central gemm_efficiency, for each device family of the published runs."""
        eff = self.calibration.constants()["gemm_efficiency"][0]
        return {FAMILIES.get(r["device"], r["device"]): eff for r in self.rows
                if r["set"] == "published"}

    @property
    def slowdown(self) -> dict | None:
        """AquilaMoE's 16B -> 8x16B on the same chips: tokens/s measured and predicted, and the
        ratio of their FLOPs per token alone."""
        aquila = [x for x in self.predicted.values() if x[0].set == "aquilamoe"]
        moe = next((x for x in aquila if x[0].kind == "moe"), None)
        dense = next((x for x in aquila if moe and x[0].kind == "dense"
                      and x[0].device == moe[0].device), None)
        if dense is None:
            return None
        (d, d_result, _), (m, m_result, _) = dense, moe
        return {"dense": d.name, "moe": m.name,
                "measured": d.measured_tokens_per_s / m.measured_tokens_per_s,
                "predicted": d_result.tokens_per_s / m_result.tokens_per_s,
                "flop_ratio": m_result.model_flops_per_token / d_result.model_flops_per_token}


def validate(folder: str | Path, cv: bool = False) -> Validation:
    """Fit on the published runs, predict every run; with `cv`, predict each published source
    again with the constants of the others (leave one source out)."""
    runs = load_runs(folder)
    calibration = calibrate(runs)
    predicted = {}
    for run in runs:
        opt = calibration.options(run.options)
        predicted[run.name] = (run, predict(run, opt), opt)
    rows = [_row(*v) for v in predicted.values()]
    result = Validation(rows, calibration, summarise(rows), rank_correlations(rows),
                        _variants(predicted), predicted)
    if not cv:
        return result
    cv_rows = [_row(r, predict(r, o), o) for r in runs if r.set == "published"
               for o in [calibration.options(r.options, leave_out=r.source)]]
    return dataclasses.replace(result, cv_rows=cv_rows, cv_summary=summarise(cv_rows),
                               cv_ranks=rank_correlations(cv_rows))
