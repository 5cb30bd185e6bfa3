"""AquilaMoE's phases under the plausible range of their unknowns: the 8x16B phase's throughput,
its slowdown against the 16B and the savings factors of Table 6 (arXiv 2408.06567 §4.3), each
with its interval, for every combination of routing and layout (docs/simulator.md "AquilaMoE"),
so a reader sees how much of the measured 2.80x any one assumption carries.
"""

from __future__ import annotations

import numpy as np

from minimoe.sim.scenario import savings_factors
from minimoe.sim.search import search_layouts
from minimoe.sim.cost import corner_speeds

TOKENS_B = {"dense 7B": 3600, "dense 16B": 1200, "moe": 545, "baseline": 5345}  # Table 6
ROUTING = {  # label -> options: the toy run's measured routing, balanced, and an assumption
    "measured on minimoe's upcycled toy": {},
    "balanced (or capacity-dropped)": {"imbalance_log": "", "imbalance": 1.0},
    "1.25 (an assumed aux-loss router)": {"imbalance_log": "", "imbalance": 1.25},
}


def aquilamoe_table(predicted: dict) -> list[dict] | None:
    """One row per (routing, layout) of the 8x16B phase: its tokens/day, its slowdown against the
    16B dense phase on the same chips and the savings factors TSF and CPSF, each with its range
    over the corners of the uncertain inputs (the fitted constants), which every phase shares.
    `predicted` is `Validation.predicted`; None when the AquilaMoE runs are not among them."""
    aquila = [v for v in predicted.values() if v[0].set == "aquilamoe"]
    dense = {v[0].device.name: v for v in aquila if v[0].kind == "dense"}
    moe = next((v for v in aquila if v[0].kind == "moe"), None)
    if moe is None or len(dense) != 2 or moe[0].device.name not in dense:
        return None
    (prep_run, prep, prep_opt), = [v for k, v in dense.items() if k != moe[0].device.name]
    up_run, up, up_opt = dense[moe[0].device.name]
    speed = {name: corner_speeds(r.workload, res.layout, r.device, o) * res.goodput["goodput"]
             for name, (r, res, o) in (("dense 7B", (prep_run, prep, prep_opt)),
                                       ("dense 16B", (up_run, up, up_opt)))}
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
            peak = {k: (prep_run if k == "dense 7B" else moe_run) for k in TOKENS_B}
            capacity = {k: days[k] * peak[k].devices * peak[k].device.peak_flops for k in TOKENS_B}
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
