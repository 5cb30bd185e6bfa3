"""The pipeline planner: a TOML scenario of training phases -> days, capacity, MFU and savings factors.

A scenario (see sims/*.toml) lists `[[phases]]` (preparation, scale-up, scale-out, or any chain)
and a `[baseline]` (training the final model from scratch). Each names a model (`preset`, an
inline `[phases.model]` table, or only `model_size_b` as the paper's table gives), the tokens it
trains on, a cluster (`devices` plus a catalogue `gpu` and/or a per-device `peak_tflops`), and a
throughput: measured (`tokens_per_day_b`), assumed (`mfu`), or predicted by minimoe.sim
(`simulate = true`, optionally with a `layout`).

The savings factors are the AquilaMoE paper's (arXiv 2408.06567 §4.3, METHOD.md §2.2):
  TSF  = baseline days / sum of phase days, days = tokens / (tokens per day)
  CPSF = baseline capacity / sum of phase capacities, capacity = devices x per-device peak x days
The paper calls capacity "GFLOPS-days", but its "GFLOPS/Device" figures are TFLOPS (989.5 is the
H100's dense BF16 peak, COSTSIM.md §5), so capacity is shown in TFLOPS-days (= the paper's
numbers) and in PF-days. It measures reserved peak, not executed FLOPs: the model FLOPs and the
implied MFU beside it show how much of that peak the training used.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from minimoe.config import ModelConfig, get_preset
from minimoe.flops import flops_per_token
from minimoe.sim.hardware import CATALOGUE, TFLOPS, Device, device_from_table, get_device
from minimoe.sim.cost import (PF_DAY, SECONDS_PER_DAY, Layout, Options, Workload, check_layout,
                              simulate)
from minimoe.sim.search import search_layouts
from minimoe.tables import fmt_value

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TOP_KEYS = {"title", "source", "notes", "phases", "baseline", "devices", "options", "sweep"}
PHASE_KEYS = {"name", "preset", "model", "model_size_b", "seq_len", "tokens_b", "devices", "gpu",
              "peak_tflops", "tokens_per_day_b", "mfu", "simulate", "layout", "batch_tokens",
              "printed_cluster_peak", "note", "options"}
SWEEP_KEYS = {"phase", "tokens_b", "mfu", "mfu_phases"}


@dataclass(frozen=True)
class PhaseResult:
    """One phase (or the baseline), fully accounted."""

    name: str
    model: str
    tokens: float
    gpus: int
    device: str
    peak_flops: float  # per device, FLOP/s
    tokens_per_day: float
    throughput: str  # where tokens_per_day came from
    flops_per_token: float | None  # model FLOPs per training token
    flops_method: str
    price_per_hour: float | None = None
    power_w: float | None = None

    @property
    def days(self) -> float:
        return self.tokens / self.tokens_per_day

    @property
    def gpu_days(self) -> float:
        return self.gpus * self.days

    @property
    def capacity_tflops_days(self) -> float:
        """devices x per-device peak x days: the paper's "GFLOPS-days" (in TFLOPS-days)."""
        return self.gpus * self.peak_flops / TFLOPS * self.days

    @property
    def capacity_pf_days(self) -> float:
        return self.capacity_tflops_days / 1000

    @property
    def model_pf_days(self) -> float | None:
        return None if self.flops_per_token is None else self.tokens * self.flops_per_token / PF_DAY

    @property
    def implied_mfu(self) -> float | None:
        return None if self.model_pf_days is None else self.model_pf_days / self.capacity_pf_days

    @property
    def cost_usd(self) -> float | None:
        return None if self.price_per_hour is None else self.gpu_days * 24 * self.price_per_hour

    @property
    def energy_kwh(self) -> float | None:
        return None if self.power_w is None else self.gpu_days * 24 * self.power_w / 1000

    def row(self) -> dict:
        return {"phase": self.name, "model": self.model, "tokens (B)": self.tokens / 1e9,
                "GPUs": self.gpus, "device": self.device,
                "peak/device (TFLOPS)": self.peak_flops / TFLOPS,
                "tokens/day (B)": self.tokens_per_day / 1e9, "throughput": self.throughput,
                "days": self.days, "GPU-days": self.gpu_days,
                "capacity (TFLOPS-days)": self.capacity_tflops_days,
                "capacity (PF-days)": self.capacity_pf_days,
                "model FLOPs (PF-days)": self.model_pf_days, "FLOPs from": self.flops_method,
                "implied MFU": self.implied_mfu, "energy (MWh)":
                    None if self.energy_kwh is None else self.energy_kwh / 1000,
                "cost ($M)": None if self.cost_usd is None else self.cost_usd / 1e6}


def savings_factors(phase_times: list[float], phase_capacities: list[float], baseline_time: float,
                    baseline_capacity: float) -> tuple[float, float]:
    """AquilaMoE's savings factors (arXiv 2408.06567 §4.3, Table 6), the baseline over the chain:

    TSF  = baseline time / sum of the phases' times
    CPSF = baseline capacity / sum of the phases' capacities, capacity = devices x peak x time
    Any unit of time and capacity, the same for both sides. The scenario planner and the
    pipeline report (which measures each stage's time) both call this.
    """
    return (baseline_time / sum(phase_times), baseline_capacity / sum(phase_capacities))


def savings(phases: list[PhaseResult], baseline: PhaseResult) -> tuple[float, float]:
    """(TSF, CPSF) of accounted phases against the accounted baseline."""
    return savings_factors([p.days for p in phases], [p.capacity_tflops_days for p in phases],
                           baseline.days, baseline.capacity_tflops_days)


@dataclass(frozen=True)
class ScenarioResult:
    title: str
    phases: list[PhaseResult]
    baseline: PhaseResult
    baseline_tokens_is_sum: bool
    notes: list[str]
    sweep: list[dict] | None = None

    @property
    def tsf(self) -> float:
        return savings(self.phases, self.baseline)[0]

    @property
    def cpsf(self) -> float:
        return savings(self.phases, self.baseline)[1]

    def to_frame(self):
        import pandas as pd

        rows = [p.row() for p in self.phases]
        total = {"phase": "EfficientScale total", "tokens (B)": sum(r["tokens (B)"] for r in rows)}
        for key in ("days", "GPU-days", "capacity (TFLOPS-days)", "capacity (PF-days)"):
            total[key] = sum(r[key] for r in rows)
        for key in ("model FLOPs (PF-days)", "energy (MWh)", "cost ($M)"):
            if all(r[key] is not None for r in rows):
                total[key] = sum(r[key] for r in rows)
        return pd.DataFrame(rows + [total, self.baseline.row()], dtype=object).set_index("phase")

    def to_dict(self) -> dict:
        return {"title": self.title, "tsf": self.tsf, "cpsf": self.cpsf,
                "phases": [p.row() for p in self.phases], "baseline": self.baseline.row(),
                "notes": self.notes, "sweep": self.sweep}

    def text(self) -> str:
        import pandas as pd

        days = sum(p.days for p in self.phases)
        cap = sum(p.capacity_tflops_days for p in self.phases)
        frame = self.to_frame().T.map(fmt_value)
        with pd.option_context("display.width", 250, "display.max_columns", 30):
            table = frame.to_string()
        lines = [self.title, "", table, "",
                 f"time savings factor    TSF  = {self.baseline.days:,.2f} / {days:,.2f} days"
                 f" = {self.tsf:.3f}",
                 f"compute savings factor CPSF = {self.baseline.capacity_tflops_days:,.0f} / "
                 f"{cap:,.0f} TFLOPS-days = {self.cpsf:.3f}", ""]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNG plots into out_dir: days and GPU-days per phase; the sweep if there is one."""
        from minimoe.sim.plots import plot_scenario

        return plot_scenario(self, Path(out_dir))


# --- parsing ----------------------------------------------------------------------------------
def _number(table, key, where, positive=True, integer=False, required=True):
    if key not in table:
        if required:
            raise ValueError(f"{where}.{key}: missing")
        return None
    value = table[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}.{key}={value!r}: must be {'an integer' if integer else 'a number'}")
    if positive and not value > 0:
        raise ValueError(f"{where}.{key}={value!r}: must be positive")
    return value


def _model(table, where) -> tuple[ModelConfig | None, str, float | None]:
    """(config or None, label, parameter count or None) from preset / model / model_size_b."""
    size = _number(table, "model_size_b", where, required=False)
    if "preset" in table and "model" in table:
        raise ValueError(f"{where}.model: give preset or an inline model, not both")
    cfg, label = None, None
    if "preset" in table:
        try:
            cfg = get_preset(str(table["preset"]))
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None
        label = table["preset"]
    elif "model" in table:
        if not isinstance(table["model"], dict):
            raise ValueError(f"{where}.model: must be a table of ModelConfig fields")
        fields = dict(table["model"])
        base = fields.pop("preset", None)
        try:
            cfg = (get_preset(base).replace(**fields) if base else ModelConfig.from_dict(fields))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}.model: {err}") from None
        label = f"{base}+" if base else "inline"
        label += f"L{cfg.n_layers} d{cfg.d_model}" + (f" {cfg.n_experts}E" if cfg.is_moe else "")
    if cfg is None and size is None:
        raise ValueError(f"{where}.model_size_b: missing (or give preset or model)")
    if size is not None:
        label = f"{size:g}B" if label is None else f"{label} ({size:g}B)"
    return cfg, label, None if size is None else size * 1e9


def _phase(table, where, catalogue, options, tokens_default=None) -> tuple[PhaseResult, list]:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table")
    for key in table:
        if key not in PHASE_KEYS:
            raise ValueError(f"{where}.{key}: unknown key; allowed: {', '.join(sorted(PHASE_KEYS))}")
    notes = []
    name = table.get("name", where)
    if not isinstance(name, str):
        raise ValueError(f"{where}.name={name!r}: must be a string")
    cfg, label, size = _model(table, where)
    if tokens_default is not None and "tokens_b" not in table:
        tokens = tokens_default
    else:
        tokens = _number(table, "tokens_b", where) * 1e9
    devices = _number(table, "devices", where, integer=True)
    device: Device | None = None
    if "gpu" in table:
        try:
            device = get_device(str(table["gpu"]), catalogue)
        except ValueError as err:
            raise ValueError(f"{where}.{err}") from None
    peak = _number(table, "peak_tflops", where, required=device is None)
    if peak is not None:
        device = device.replace(peak_flops=peak * TFLOPS) if device else None
    peak_flops = device.peak_flops if device else peak * TFLOPS
    seq_len = _number(table, "seq_len", where, integer=True, required=False)
    seq_len = seq_len or (cfg.max_seq_len if cfg else 4096)
    if cfg is not None:
        per_token, method = flops_per_token(cfg, seq_len, attention=options.attention).model, \
            f"analytic, {options.attention} attention, s={seq_len}"
    else:
        per_token, method = 6 * size, "6ND, table size"
    modes = [k for k in ("tokens_per_day_b", "mfu", "simulate") if k in table]
    if len(modes) != 1:
        raise ValueError(f"{where}: give exactly one of tokens_per_day_b, mfu, simulate "
                         f"(found {', '.join(modes) or 'none'})")
    for key in ("layout", "batch_tokens", "options"):
        if key in table and modes[0] != "simulate":
            raise ValueError(f"{where}.{key}: only used with simulate = true")
    gpus = devices
    if modes[0] == "tokens_per_day_b":
        per_day, source = _number(table, "tokens_per_day_b", where) * 1e9, "measured"
    elif modes[0] == "mfu":
        mfu = _number(table, "mfu", where)
        if mfu > 1:
            raise ValueError(f"{where}.mfu={mfu!r}: must be <= 1")
        per_day = mfu * devices * peak_flops * SECONDS_PER_DAY / per_token
        source = f"assumed MFU {mfu:.1%}"
    else:
        options = _options(table.get("options", {}), f"{where}.options", options)
        result = _simulated(table, where, cfg, device, devices, seq_len, options)
        per_day, gpus = result.tokens_per_day, result.n_gpus
        source = f"simulated, MFU {result.mfu:.1%}"
        notes.append(f"{name}: simulated layout {result.layout.label()} on {gpus} of {devices} "
                     f"GPUs, {result.memory['memory'] / 1e9:.1f} GB per GPU, step "
                     f"{result.time['step_time']:.2f} s, MFU {result.mfu:.1%}")
    if "printed_cluster_peak" in table:
        printed = _number(table, "printed_cluster_peak", where)
        computed = devices * peak_flops / TFLOPS
        if abs(printed - computed) > 1e-6 * computed:
            notes.append(f"{name}: devices x peak = {devices} x {peak_flops / TFLOPS:g} = "
                         f"{computed:,.0f}, but the source prints {printed:,.0f} (an arithmetic "
                         f"slip; the figures here use {computed:,.0f})")
    if "note" in table:
        notes.append(f"{name}: {table['note']}")
    result = PhaseResult(name=name, model=label, tokens=tokens, gpus=gpus,
                         device=device.name if device else "custom", peak_flops=peak_flops,
                         tokens_per_day=per_day, throughput=source, flops_per_token=per_token,
                         flops_method=method,
                         price_per_hour=device.price_per_hour if device else None,
                         power_w=device.power_w if device else None)
    return result, notes


def _simulated(table, where, cfg, device, devices, seq_len, options):
    """Tokens per day predicted by minimoe.sim: a given layout, or the fastest one found."""
    if table["simulate"] is not True:
        raise ValueError(f"{where}.simulate={table['simulate']!r}: must be true")
    if cfg is None:
        raise ValueError(f"{where}.preset: missing (simulate needs a model shape)")
    if device is None:
        raise ValueError(f"{where}.gpu: missing (simulate needs a catalogue or [devices] GPU)")
    batch = _number(table, "batch_tokens", where, integer=True)
    try:
        workload = Workload.from_tokens(cfg, batch, seq_len)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None
    if "layout" in table:
        if not isinstance(table["layout"], dict):
            raise ValueError(f"{where}.layout: must be a table (tp, pp, dp, ep, zero, ...)")
        fields = dict(table["layout"])
        known = {f.name for f in dataclasses.fields(Layout)}
        for key in fields:
            if key not in known:
                raise ValueError(f"{where}.layout.{key}: unknown key; allowed: {', '.join(sorted(known))}")
        layout = Layout(**fields)
        check_layout(layout, workload, devices, where=f"{where}.layout")
        result = simulate(workload, layout, device, options)
        if not result.fits:
            raise ValueError(f"{where}.layout: needs {result.memory['memory'] / 1e9:.1f} GB per "
                             f"GPU, more than the usable {result.memory['usable'] / 1e9:.1f} GB")
    else:
        result = search_layouts(workload, device, devices, options).fastest
        if result is None:
            raise ValueError(f"{where}: no layout of this model fits on {devices} {device.name}")
    return result


def _options(table: dict, where: str, base: Options) -> Options:
    """minimoe.sim.Options from a scenario table, on top of `base`."""
    known = {f.name for f in dataclasses.fields(Options)}
    for key in table:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown key; allowed: {', '.join(sorted(known))}")
    if not isinstance(table, dict):
        raise ValueError(f"{where}: must be a table")
    try:
        return dataclasses.replace(base, **table)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def parse_scenario(data: dict, origin: str = "scenario") -> ScenarioResult:
    """Account a scenario given as a dict (what tomllib returns)."""
    for key in data:
        if key not in TOP_KEYS:
            raise ValueError(f"{key}: unknown key; allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("devices", "options", "baseline", "sweep"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{key}: must be a table")
    catalogue = dict(CATALOGUE)
    for name, table in data.get("devices", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"devices.{name}: must be a table")
        catalogue[name.lower()] = device_from_table(name.lower(), table, f"devices.{name}", CATALOGUE)
    options = _options(data.get("options", {}), "options", Options())
    raw_phases = data.get("phases")
    if not isinstance(raw_phases, list) or not raw_phases:
        raise ValueError("phases: missing (give at least one [[phases]] table)")
    phases, notes = [], []
    for i, table in enumerate(raw_phases):
        phase, phase_notes = _phase(table, f"phases[{i}]", catalogue, options)
        phases.append(phase)
        notes += phase_notes
    if "baseline" not in data:
        raise ValueError("baseline: missing (the from-scratch run the phases are compared with)")
    total = sum(p.tokens for p in phases)
    is_sum = "tokens_b" not in data["baseline"]
    baseline, base_notes = _phase(data["baseline"], "baseline", catalogue, options,
                                  tokens_default=total)
    notes += base_notes
    if is_sum:
        notes.append(f"baseline tokens = the sum of the phases' tokens = "
                     f"{' + '.join(f'{p.tokens / 1e9:g}' for p in phases)} = {total / 1e9:g}B")
    notes.append("capacity = devices x per-device peak x days: reserved peak, not executed "
                 "FLOPs (the paper's 'GFLOPS-days'; its per-device figures are TFLOPS)")
    result = ScenarioResult(title=data.get("title", origin), phases=phases, baseline=baseline,
                            baseline_tokens_is_sum=is_sum, notes=notes)
    if "sweep" in data:
        result = dataclasses.replace(result, sweep=_sweep_from_table(result, data["sweep"]))
    return result


def load_scenario(path: str | Path) -> ScenarioResult:
    """Read a TOML scenario file and account it; errors are one-line ValueErrors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scenario file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    return parse_scenario(data, origin=str(path))


# --- sensitivity ------------------------------------------------------------------------------
def sweep(result: ScenarioResult, phase: str, tokens: list[float], mfus: list[float],
          mfu_phases: list[str]) -> list[dict]:
    """TSF and CPSF as `phase`'s token budget and the MFU of `mfu_phases` vary (one row each).

    A phase given an MFU runs at mfu x devices x peak / (model FLOPs per token) tokens per day;
    the baseline's tokens follow the phases' sum when the scenario left them out.
    """
    names = [p.name for p in result.phases]
    if phase not in names:
        raise ValueError(f"sweep.phase={phase!r}: not a phase; choose one of {', '.join(names)}")
    for name in mfu_phases:
        if name not in names + [result.baseline.name, "baseline"]:
            raise ValueError(f"sweep.mfu_phases: {name!r} is not a phase or the baseline")
    rows = []
    for mfu in mfus:
        def at_mfu(p: PhaseResult, is_baseline=False) -> PhaseResult:
            if p.name in mfu_phases or (is_baseline and "baseline" in mfu_phases):
                per_day = mfu * p.gpus * p.peak_flops * SECONDS_PER_DAY / p.flops_per_token
                return dataclasses.replace(p, tokens_per_day=per_day)
            return p

        for budget in tokens:
            phases = [at_mfu(dataclasses.replace(p, tokens=budget) if p.name == phase else p)
                      for p in result.phases]
            base = at_mfu(result.baseline, is_baseline=True)
            if result.baseline_tokens_is_sum:
                base = dataclasses.replace(base, tokens=sum(p.tokens for p in phases))
            tsf, cpsf = savings(phases, base)
            rows.append({"phase": phase, "tokens (B)": budget / 1e9, "mfu": mfu,
                         "mfu_phases": ",".join(mfu_phases), "tsf": tsf, "cpsf": cpsf,
                         "days": sum(p.days for p in phases), "baseline days": base.days})
    return rows


def _sweep_from_table(result, table) -> list[dict]:
    for key in table:
        if key not in SWEEP_KEYS:
            raise ValueError(f"sweep.{key}: unknown key; allowed: {', '.join(sorted(SWEEP_KEYS))}")
    for key in ("phase", "tokens_b", "mfu", "mfu_phases"):
        if key not in table:
            raise ValueError(f"sweep.{key}: missing")
    for key in ("tokens_b", "mfu"):
        values = table[key]
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.{key}={values!r}: must be a non-empty list")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"sweep.{key}[{i}]={v!r}: must be positive")
            if key == "mfu" and v > 1:
                raise ValueError(f"sweep.{key}[{i}]={v!r}: must be <= 1")
    return sweep(result, table["phase"], [t * 1e9 for t in table["tokens_b"]], table["mfu"],
                 list(table["mfu_phases"]))


def dumps(result: ScenarioResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
