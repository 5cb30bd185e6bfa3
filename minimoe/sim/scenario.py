"""The planner's accounting: training phases -> days, capacity, MFU, and AquilaMoE's savings
factors TSF and CPSF (arXiv 2408.06567 §4.3, Table 6; docs/simulator.md "Units")."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from minimoe.sim.cost import PF_DAY, SECONDS_PER_DAY
from minimoe.sim.hardware import TFLOPS
from minimoe.sim.plots import plot_scenario
from minimoe.sim.savings import decomposition_lines, scenario_decomposition
from minimoe.tables import fmt_value


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
    flops_per_token: float  # model FLOPs per training token (analytic, or 6N)
    flops_method: str
    price_per_hour: float | None = None
    power_w: float | None = None
    pue: float = 1.0  # data-centre overhead on the GPUs' board power
    measured_tokens_per_day: float | None = None  # a source's figure shown beside a prediction
    # a prediction's tokens/day at its options, then at each corner of their uncertain ranges
    corners: tuple | None = None

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
    def model_pf_days(self) -> float:
        return self.tokens * self.flops_per_token / PF_DAY

    @property
    def implied_mfu(self) -> float:
        return self.model_pf_days * 1000 / self.capacity_tflops_days

    @property
    def cost_usd(self) -> float | None:
        return None if self.price_per_hour is None else self.gpu_days * 24 * self.price_per_hour

    @property
    def energy_kwh(self) -> float | None:
        return None if self.power_w is None else self.gpu_days * 24 * self.power_w * self.pue / 1000

    def row(self) -> dict:
        return {"phase": self.name, "model": self.model, "tokens (B)": self.tokens / 1e9,
                "GPUs": self.gpus, "device": self.device,
                "peak/device (TFLOPS)": self.peak_flops / TFLOPS,
                "tokens/day (B)": self.tokens_per_day / 1e9, "throughput": self.throughput,
                **({} if self.corners is None else {
                    "tokens/day range (B)": f"{min(self.corners) / 1e9:,.1f}-{max(self.corners) / 1e9:,.1f}"}),
                **({} if self.measured_tokens_per_day is None else {
                    "measured tokens/day (B)": self.measured_tokens_per_day / 1e9,
                    "prediction error": self.tokens_per_day / self.measured_tokens_per_day - 1}),
                "days": self.days, "GPU-days": self.gpu_days,
                "capacity (TFLOPS-days)": self.capacity_tflops_days,
                "capacity (PF-days)": self.capacity_tflops_days / 1000,
                "model FLOPs (PF-days)": self.model_pf_days, "FLOPs from": self.flops_method,
                "implied MFU": self.implied_mfu, "energy (MWh)":
                    None if self.energy_kwh is None else self.energy_kwh / 1000,
                "cost ($M)": None if self.cost_usd is None else self.cost_usd / 1e6}


def savings_factors(phase_times: list[float], phase_capacities: list[float], baseline_time: float,
                    baseline_capacity: float) -> tuple[float, float]:
    """AquilaMoE's savings factors, the baseline over the chain: TSF = baseline time / sum of the
    phases' times, CPSF = the same of capacities (devices x peak x time), in any one unit."""
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

    def _factors_at(self, speed) -> tuple[float, float]:
        """(TSF, CPSF) with each phase's tokens per day replaced by speed(phase)."""
        phases = [dataclasses.replace(p, tokens_per_day=speed(p)) for p in self.phases]
        return savings(phases, dataclasses.replace(self.baseline, tokens_per_day=speed(self.baseline)))

    @property
    def factor_ranges(self) -> tuple[tuple, tuple] | None:
        """((TSF low, high), (CPSF low, high)) over the corners of the uncertain inputs, taken
        corner by corner where every prediction has the same corners; None with no prediction."""
        counts = {len(p.corners) for p in self.phases + [self.baseline] if p.corners}
        if len(counts) != 1:
            return None
        factors = [self._factors_at(lambda p: p.corners[i] if p.corners else p.tokens_per_day)
                   for i in range(counts.pop())]
        return tuple((min(f[j] for f in factors), max(f[j] for f in factors)) for j in (0, 1))

    @property
    def measured_factors(self) -> tuple[float, float] | None:
        """(TSF, CPSF) from the measured throughputs beside the predictions, when every phase and
        the baseline has one (sims/aquilamoe_predicted.toml); otherwise None."""
        if any(p.measured_tokens_per_day is None for p in self.phases + [self.baseline]):
            return None
        return self._factors_at(lambda p: p.measured_tokens_per_day)

    def to_frame(self):
        rows = [p.row() for p in self.phases]
        total = {"phase": "EfficientScale total"}
        for key in ("tokens (B)", "days", "GPU-days", "capacity (TFLOPS-days)", "capacity (PF-days)",
                    "model FLOPs (PF-days)", "energy (MWh)", "cost ($M)"):
            if all(r[key] is not None for r in rows):  # energy and cost need every phase's
                total[key] = sum(r[key] for r in rows)
        return pd.DataFrame(rows + [total, self.baseline.row()], dtype=object).set_index("phase")

    def to_dict(self) -> dict:
        measured, ranges = self.measured_factors, self.factor_ranges
        return {"title": self.title, "tsf": self.tsf, "cpsf": self.cpsf,
                "ranges": None if ranges is None else dict(zip(("tsf", "cpsf"), ranges)),
                "measured": None if measured is None else dict(zip(("tsf", "cpsf"), measured)),
                "phases": [p.row() for p in self.phases], "baseline": self.baseline.row(),
                "notes": self.notes, "sweep": self.sweep,
                "decomposition": scenario_decomposition(self)}

    def text(self) -> str:
        days = sum(p.days for p in self.phases)
        cap = sum(p.capacity_tflops_days for p in self.phases)
        with pd.option_context("display.width", 250, "display.max_columns", 30):
            table = self.to_frame().T.map(fmt_value).to_string()
        lines = [self.title, "", table, "",
                 f"time savings factor    TSF  = {self.baseline.days:,.2f} / {days:,.2f} days"
                 f" = {self.tsf:.3f}",
                 f"compute savings factor CPSF = {self.baseline.capacity_tflops_days:,.0f} / "
                 f"{cap:,.0f} TFLOPS-days = {self.cpsf:.3f}", ""]
        if self.factor_ranges is not None:
            (tsf_lo, tsf_hi), (cpsf_lo, cpsf_hi) = self.factor_ranges
            lines[-1:-1] = [f"over the uncertain inputs (docs/simulator.md \"Intervals\"): TSF "
                            f"{tsf_lo:.3f}-{tsf_hi:.3f}, CPSF {cpsf_lo:.3f}-{cpsf_hi:.3f}"]
        if self.measured_factors is not None:
            tsf, cpsf = self.measured_factors
            lines[-1:-1] = [f"from the measured throughputs instead: TSF = {tsf:.3f}, "
                            f"CPSF = {cpsf:.3f}"]
        lines += decomposition_lines(scenario_decomposition(self)) + [""]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """PNG plots into out_dir: days and GPU-days per phase; the sweep if there is one."""
        return plot_scenario(self, Path(out_dir))


# --- sensitivity ------------------------------------------------------------------------------
def sweep(result: ScenarioResult, phase: str, tokens: list[float], mfus: list[float],
          mfu_phases: list[str]) -> list[dict]:
    """TSF and CPSF as `phase`'s token budget and the MFU of `mfu_phases` vary (one row each);
    the baseline's tokens follow the phases' sum when the scenario left them out."""
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


def dumps(result: ScenarioResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
