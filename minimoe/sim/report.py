"""What `minimoe validate` prints (text or JSON); and AquilaMoE's 8x16B phase under every
combination of its unknowns (routing, layout), with its slowdown and Table 6's savings factors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from minimoe.sim.cost import corner_speeds
from minimoe.sim.scenario import savings_factors
from minimoe.sim.search import search_layouts
from minimoe.sim.validate import Validation
from minimoe.tables import fmt_value

TOKENS_B = {"dense 7B": 3600, "dense 16B": 1200, "moe": 545, "baseline": 5345}  # Table 6
ROUTING = {  # label -> options: the toy run's measured routing, balanced, and an assumption
    "measured on minimoe's upcycled toy": {},
    "balanced (or capacity-dropped)": {"imbalance_log": "", "imbalance": 1.0},
    "1.25 (an assumed aux-loss router)": {"imbalance_log": "", "imbalance": 1.25},
}


def aquilamoe_table(predicted: dict) -> list[dict] | None:
    """One row per (routing, layout) of the 8x16B phase: tokens/day, slowdown against the 16B on
    the same chips, TSF and CPSF, each over the corners every phase shares (`predicted` is
    Validation.predicted; None without the AquilaMoE runs)."""
    aquila = [v for v in predicted.values() if v[0].set == "aquilamoe"]
    dense = {v[0].device.name: v for v in aquila if v[0].kind == "dense"}
    moe = next((v for v in aquila if v[0].kind == "moe"), None)
    if moe is None or len(dense) != 2 or moe[0].device.name not in dense:
        return None
    (prep_run, prep, prep_opt), = [v for k, v in dense.items() if k != moe[0].device.name]
    speed = {name: corner_speeds(r.workload, res.layout, r.device, o) * res.goodput["goodput"]
             for name, (r, res, o) in (("dense 7B", (prep_run, prep, prep_opt)),
                                       ("dense 16B", dense[moe[0].device.name]))}
    moe_run, moe_result, moe_opt = moe
    rows = []
    for label, routing in ROUTING.items():
        opt = moe_opt.replace(**routing) if routing else moe_opt
        # the fastest layout on exactly the paper's cluster (its capacity counts every device)
        fastest = search_layouts(moe_run.workload, moe_run.device, moe_run.devices, opt,
                                 fixed_gpus=True).fastest
        for layout_name, layout in (("BAAI's FlagScale recipe", moe_run.layout),
                                    ("fastest found", fastest.layout)):
            speed["moe"] = (corner_speeds(moe_run.workload, layout, moe_run.device, opt)
                            * moe_result.goodput["goodput"])
            days = {k: TOKENS_B[k] * 1e9 / (speed["moe" if k == "baseline" else k] * 86400)
                    for k in TOKENS_B}
            capacity = {k: days[k] * (r := prep_run if k == "dense 7B" else moe_run).devices
                        * r.device.peak_flops for k in TOKENS_B}
            phases = ("dense 7B", "dense 16B", "moe")
            tsf, cpsf = savings_factors([days[k] for k in phases], [capacity[k] for k in phases],
                                        days["baseline"], capacity["baseline"])
            rows.append({"routing": label, "layout": layout_name, "layout used": layout.label(),
                         "tokens/day (B)": _span(speed["moe"] * 86400 / 1e9),
                         "slowdown 16B -> 8x16B": _span(speed["dense 16B"] / speed["moe"]),
                         "TSF": _span(tsf), "CPSF": _span(cpsf)})
    return rows


def _span(values) -> tuple:
    """(prediction, low, high) of a figure evaluated at the options and at their corners."""
    values = np.asarray(values, dtype=float)
    return float(values[0]), float(values.min()), float(values.max())


SHOWN = ("set", "kind", "device", "GPUs", "layout", "measured tok/s/GPU", "predicted tok/s/GPU",
         "low", "high", "error", "inside")


def _summary_lines(v: Validation) -> list[str]:
    lines = [f"{'':16s} {'in-sample':>38s}   {'leave one source out':>38s}",
             f"{'runs':16s}" + f"{'n':>4s} {'median':>8s} {'max':>8s} {'<=10%':>6s} {'cover':>6s}   " * 2]
    for key, s in v.summary.items():
        cells = [f"{x['n']:4d} {x['median_abs_error']:8.1%} {x['max_abs_error']:8.1%} "
                 f"{x['within_10']:6d} {x['coverage']:6.0%}"
                 for x in (s, (v.cv_summary or {}).get(key)) if x]
        if key[0] != "published":
            cells.append("(predicted, never fitted)")
        lines.append(f"{key[0] + ' ' + key[1]:16s}" + "   ".join(cells))
    return lines


def _wide(frame) -> str:
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        return frame.to_string()


def validation_text(v: Validation, aquila: list[dict] | None = None) -> str:
    """The per-run table, the constants, the summaries, ranks, speed-ups and the AquilaMoE table."""
    frame = pd.DataFrame(v.rows).set_index("run")[list(SHOWN)]
    frame["inside"] = frame["inside"].map({True: "in", False: "out"})
    table = _wide(frame.map(fmt_value))
    c = v.calibration.constants()
    sigma = c["straggler_sigma"][0]
    lines = ["Predicted against measured, per run: tokens/s per GPU, the interval [low, high] over "
             "the ends of the uncertain inputs, error = predicted / measured - 1", table, "",
             "Fitted on the published runs (mean |log error| of a source's runs), each source "
             f"alone, at straggler_sigma {sigma:.3f}:"]
    lines += [f"  gemm_efficiency {v.calibration.efficiency(s, sigma):.2f}  ({len(e)} runs) {s}"
              for s, e in v.calibration.errors.items()]
    lines += [f"the simulator takes gemm_efficiency {c['gemm_efficiency'][0]:.3f} "
              f"[{c['gemm_efficiency'][1]:.2f}, {c['gemm_efficiency'][2]:.2f}] (the sources' median; "
              f"10th-90th percentile of the runs' own, sources weighing equally), straggler_sigma {sigma:.3f} [{c['straggler_sigma'][1]:.3f}, "
              f"{c['straggler_sigma'][2]:.3f}] (pooled over the sources whose runs span 10x in "
              "nodes; range leaving each out)", ""] + _summary_lines(v)
    not_fitting = [r["run"] for r in v.rows if not r["fits"]]
    if not_fitting:
        lines.append(f"over the memory model's budget (time still predicted): {', '.join(not_fitting)}")
    if v.ranks:
        lines += ["", "rank correlation (Spearman) of predicted and measured, runs of one model on "
                      "one cluster:"]
        lines += [f"  {g:34s} {n} runs  in-sample {rho:+.2f}"
                  + (f"  leave-one-out {v.cv_ranks[g][1]:+.2f}" if v.cv_ranks else "")
                  for g, (n, rho) in v.ranks.items()]
    if v.variants:
        lines += ["", "speed-up of a run over the run it varies:"]
        lines += [f"  {r['run']} over {r['of']}: measured {r['measured']:.3f}x, predicted "
                  f"{r['predicted']:.3f}x [{r['low']:.3f}, {r['high']:.3f}]" for r in v.variants]
    if aquila:
        lines += ["", "AquilaMoE under the range of its unknowns (prediction [low, high]); measured "
                      "(Table 6): 25B tokens/day, slowdown 2.80x, TSF 4.12, CPSF 3.35"]
        shown = pd.DataFrame([{k: (f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]" if isinstance(x, tuple)
                                   else x) for k, x in row.items()} for row in aquila])
        lines.append(_wide(shown.set_index(["routing", "layout"])))
    breakdown = v.breakdown
    if breakdown:
        lines += ["", "AquilaMoE phases, seconds per step by term:",
                  pd.DataFrame(breakdown).drop(index="tokens_per_step").T.map(fmt_value).to_string()]
    return "\n".join(lines)


def validation_json(v: Validation, aquila: list[dict] | None = None) -> str:
    def summary(s):  # JSON keys are strings
        return None if s is None else {f"{group} {kind}": x for (group, kind), x in s.items()}

    return json.dumps({"runs": v.rows, "constants": v.calibration.constants(),
                       "summary": summary(v.summary), "cv_runs": v.cv_rows,
                       "cv_summary": summary(v.cv_summary), "ranks": v.ranks,
                       "cv_ranks": v.cv_ranks, "variants": v.variants, "aquilamoe": aquila,
                       "breakdown": v.breakdown}, indent=2)
