"""The TOML scenario format (sims/*.toml) read into minimoe.sim.scenario's terms; every error is
one line naming the key path, value and rule (docs/simulator.md "Scenario files")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minimoe import files
from minimoe.checks import check, from_table, known_keys
from minimoe.config import ModelConfig
from minimoe.flops import flops_per_token
from minimoe.sim.cost import SECONDS_PER_DAY, corner_speeds, simulate
from minimoe.sim.layout import Layout, Workload, check_layout, model_config
from minimoe.sim.options import Options, read_options
from minimoe.sim.hardware import TFLOPS, Device, get_device, with_devices
from minimoe.sim.scenario import PhaseResult, ScenarioResult, sweep
from minimoe.sim.search import search_layouts


TOP_KEYS = {"title", "source", "notes", "phases", "baseline", "devices", "options", "sweep"}
PHASE_KEYS = {"name", "preset", "model", "model_size_b", "seq_len", "tokens_b", "devices", "gpu",
              "peak_tflops", "tokens_per_day_b", "mfu", "simulate", "layout", "batch_tokens",
              "printed_cluster_peak", "note", "options", "measured_tokens_per_day_b"}
SWEEP_KEYS = ("phase", "tokens_b", "mfu", "mfu_phases")  # all required


def _number(table, key, where, positive=True, integer=False, required=True):
    if key not in table:
        if required:
            raise ValueError(f"{where}.{key}: missing")
        return None
    check(where, key, table[key], ("int" if integer else "") + (">0" if positive else ""))
    # bounded: products and quotients of these stay finite, so no factor prints as nan or inf
    check(where, key, table[key], "[1e-9, 1e15]" if positive else "[-1e15, 1e15]")
    return table[key]


def _model(table, where) -> tuple[ModelConfig | None, str, float | None]:
    """(config or None, label, parameter count or None) from preset / model / model_size_b."""
    size = _number(table, "model_size_b", where, required=False)
    if "preset" in table and "model" in table:
        raise ValueError(f"{where}.model: give preset or an inline model, not both")
    cfg, label = None, None
    if "preset" in table or "model" in table:
        cfg = model_config(table.get("preset"), table.get("model"), where)
        base = table["preset"] if "preset" in table else (table["model"] or {}).get("preset")
        label = table["preset"] if "preset" in table else (
            (f"{base}+" if base else "inline")
            + f"L{cfg.n_layers} d{cfg.d_model}" + (f" {cfg.n_experts}E" if cfg.is_moe else ""))
    if cfg is None and size is None:
        raise ValueError(f"{where}.model_size_b: missing (or give preset or model)")
    if size is not None:
        label = f"{size:g}B" if label is None else f"{label} ({size:g}B)"
    return cfg, label, None if size is None else size * 1e9


def _phase(table, where, catalogue, options, folder, tokens_default=None) -> tuple[PhaseResult, list]:
    known_keys(where, table, PHASE_KEYS)
    notes = []
    name = table.get("name", where)
    check(where, "name", name, "str")
    cfg, label, size = _model(table, where)
    use_default = tokens_default is not None and "tokens_b" not in table
    tokens = tokens_default if use_default else _number(table, "tokens_b", where) * 1e9
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
    if cfg is None:
        per_token, method = 6 * size, "6ND, table size"
    else:
        per_token = flops_per_token(cfg, seq_len, attention=options.attention).model
        method = f"analytic, {options.attention} attention, s={seq_len}"
    corners = None
    modes = [k for k in ("tokens_per_day_b", "mfu", "simulate") if k in table]
    if len(modes) != 1:
        raise ValueError(f"{where}: give exactly one of tokens_per_day_b, mfu, simulate "
                         f"(found {', '.join(modes) or 'none'})")
    for key in ("layout", "batch_tokens", "options", "measured_tokens_per_day_b"):
        if key in table and modes[0] != "simulate":
            raise ValueError(f"{where}.{key}: only used with simulate = true")
    if modes[0] == "tokens_per_day_b":
        per_day, source = _number(table, "tokens_per_day_b", where) * 1e9, "measured"
    elif modes[0] == "mfu":
        mfu = _number(table, "mfu", where)
        if mfu > 1:
            raise ValueError(f"{where}.mfu={mfu!r}: must be <= 1")
        per_day = mfu * devices * peak_flops * SECONDS_PER_DAY / per_token
        source = f"assumed MFU {mfu:.1%}"
    else:
        options = read_options(table.get("options", {}), f"{where}.options", options, folder)
        result, workload = _simulated(table, where, cfg, device, devices, seq_len, options)
        # wall-clock throughput (goodput applied); the phase reserves all its devices, so its
        # capacity counts them all, whether or not the layout uses them
        per_day = result.wallclock_tokens_per_day
        corners = tuple(corner_speeds(workload, result.layout, device, options)
                        * SECONDS_PER_DAY * result.goodput["goodput"])
        source = f"simulated, MFU {result.mfu:.1%}"
        notes.append(f"{name}: simulated layout {result.layout.label()} on {result.n_gpus} of "
                     f"{devices} GPUs, {result.memory['memory'] / 1e9:.1f} GB per GPU, step "
                     f"{result.time['step_time']:.2f} s, MFU {result.mfu:.1%}, goodput "
                     f"{result.goodput['goodput']:.1%}")
    if "printed_cluster_peak" in table:
        printed = _number(table, "printed_cluster_peak", where)
        computed = devices * peak_flops / TFLOPS
        if abs(printed - computed) > 1e-6 * computed:
            notes.append(f"{name}: devices x peak = {devices} x {peak_flops / TFLOPS:g} = "
                         f"{computed:,.0f}, but the source prints {printed:,.0f} (an arithmetic "
                         f"slip; the figures here use {computed:,.0f})")
    if "note" in table:
        notes.append(f"{name}: {table['note']}")
    measured = _number(table, "measured_tokens_per_day_b", where, required=False)
    return PhaseResult(name, label, tokens, devices, device.name if device else "custom",
                       peak_flops, per_day, source, per_token, method,
                       device.price_per_hour if device else None,
                       device.power_w if device else None, options.pue,
                       None if measured is None else measured * 1e9, corners), notes


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
        layout = from_table(Layout, table["layout"], f"{where}.layout")
        check_layout(layout, workload, devices, where=f"{where}.layout")
        result = simulate(workload, layout, device, options)
        if not result.fits:
            raise ValueError(f"{where}.layout: needs {result.memory['memory'] / 1e9:.1f} GB per "
                             f"GPU, more than the usable {result.memory['usable'] / 1e9:.1f} GB")
    else:
        result = search_layouts(workload, device, devices, options).fastest
        if result is None:
            raise ValueError(f"{where}: no layout of this model fits on {devices} {device.name}")
    return result, workload


def parse_scenario(data: dict, origin: str = "scenario", folder: Path = Path(".")) -> ScenarioResult:
    """Account a scenario given as a dict (what tomllib returns)."""
    known_keys("", data, TOP_KEYS)
    for key in ("title", "source", "notes"):
        if key in data:
            check("", key, data[key], "str")
    for key in ("devices", "options", "baseline", "sweep"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{key}={data[key]!r}: must be a table")
    catalogue = with_devices(data.get("devices", {}), "")
    options = read_options(data.get("options", {}), "options", Options(), folder)
    raw_phases = data.get("phases")
    if not isinstance(raw_phases, list) or not raw_phases:
        raise ValueError("phases: missing (give at least one [[phases]] table)")
    phases, notes = [], []
    for i, table in enumerate(raw_phases):
        phase, phase_notes = _phase(table, f"phases[{i}]", catalogue, options, folder)
        phases.append(phase)
        notes += phase_notes
    if "baseline" not in data:
        raise ValueError("baseline: missing (the from-scratch run the phases are compared with)")
    total = sum(p.tokens for p in phases)
    is_sum = "tokens_b" not in data["baseline"]
    baseline, base_notes = _phase(data["baseline"], "baseline", catalogue, options, folder,
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
    return parse_scenario(files.read_toml(path), origin=str(path), folder=path.parent)


def _sweep_from_table(result, table) -> list[dict]:
    known_keys("sweep", table, SWEEP_KEYS)
    for key in SWEEP_KEYS:
        if key not in table:
            raise ValueError(f"sweep.{key}: missing")
    for key in ("tokens_b", "mfu"):
        values = table[key]
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.{key}={values!r}: must be a non-empty list")
        for i, v in enumerate(values):
            check("sweep", f"{key}[{i}]", v, "(0, 1]" if key == "mfu" else ">0")
            check("sweep", f"{key}[{i}]", v, "[1e-9, 1]" if key == "mfu" else "[1e-9, 1e15]")
    return sweep(result, table["phase"], [t * 1e9 for t in table["tokens_b"]], table["mfu"],
                 list(table["mfu_phases"]))
