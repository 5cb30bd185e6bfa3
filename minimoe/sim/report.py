"""What `minimoe validate` prints (text or JSON): each run against its measurement with its
interval, the fitted constants source by source, the errors in-sample and leaving each source
out, the rank correlations, the speed-ups of runs that vary one another, and AquilaMoE's phases
under the range of their unknowns (minimoe.sim.aquilamoe)."""

from __future__ import annotations

import json

import pandas as pd

from minimoe.sim.cost import TIME_PARTS
from minimoe.sim.validate import Validation
from minimoe.tables import fmt_value

SHOWN = ("set", "kind", "device", "GPUs", "layout", "measured tok/s/GPU", "predicted tok/s/GPU",
         "low", "high", "error", "inside")


def _summary_lines(v: Validation) -> list[str]:
    lines = [f"{'':16s} {'in-sample':>38s}   {'leave one source out':>38s}",
             f"{'runs':16s}" + f"{'n':>4s} {'median':>8s} {'max':>8s} {'<=10%':>6s} {'cover':>6s}   " * 2]
    for key, s in v.summary.items():
        cv = (v.cv_summary or {}).get(key)
        cells = [f"{s['n']:4d} {s['median_abs_error']:8.1%} {s['max_abs_error']:8.1%} "
                 f"{s['within_10']:6d} {s['coverage']:6.0%}"]
        if cv:
            cells.append(f"{cv['n']:4d} {cv['median_abs_error']:8.1%} {cv['max_abs_error']:8.1%} "
                         f"{cv['within_10']:6d} {cv['coverage']:6.0%}")
        elif key[0] != "published":
            cells.append("(predicted, never fitted)")
        lines.append(f"{key[0] + ' ' + key[1]:16s}" + "   ".join(cells))
    return lines


def validation_text(v: Validation, aquila: list[dict] | None = None) -> str:
    """The per-run table, the constants, the summaries, ranks, speed-ups and the AquilaMoE table."""
    frame = pd.DataFrame(v.rows).set_index("run")[list(SHOWN)]
    frame["inside"] = frame["inside"].map({True: "in", False: "out"})
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        table = frame.map(fmt_value).to_string()
    c = v.calibration.constants()
    sigma = c["straggler_sigma"][0]
    lines = ["Predicted against measured, per run: tokens/s per GPU, the interval [low, high] over "
             "the ends of the uncertain inputs, error = predicted / measured - 1", table, "",
             "Fitted on the published runs (mean |log error| of a source's runs), each source "
             f"alone, at straggler_sigma {sigma:.3f}:"]
    lines += [f"  gemm_efficiency {v.calibration.efficiency(s, sigma):.2f}  ({n} runs) {s}"
              for s, n in v.calibration.runs.items()]
    lines += [f"the simulator takes gemm_efficiency {c['gemm_efficiency'][0]:.3f} "
              f"[{c['gemm_efficiency'][1]:.2f}, {c['gemm_efficiency'][2]:.2f}] (median, range over "
              f"the sources), straggler_sigma {sigma:.3f} [{c['straggler_sigma'][1]:.3f}, "
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
        with pd.option_context("display.width", 250, "display.max_columns", 30):
            lines.append(shown.set_index(["routing", "layout"]).to_string())
    breakdown = aquilamoe_breakdown(v)
    if breakdown:
        lines += ["", "AquilaMoE phases, seconds per step by term:",
                  pd.DataFrame(breakdown).drop(index="tokens_per_step").T.map(fmt_value).to_string()]
    return "\n".join(lines)


def aquilamoe_breakdown(v: Validation) -> dict:
    """AquilaMoE phase -> its time parts (seconds per step) and tokens per step."""
    return {name: {k: result.time[k] for k in TIME_PARTS} | {"tokens_per_step": result.tokens_per_step}
            for name, (run, result, _) in v.predicted.items() if run.set == "aquilamoe"}


def validation_json(v: Validation, aquila: list[dict] | None = None) -> str:
    def summary(s):
        return None if s is None else {f"{group} {kind}": x for (group, kind), x in s.items()}

    return json.dumps({"runs": v.rows, "constants": v.calibration.constants(),
                       "summary": summary(v.summary), "cv_runs": v.cv_rows,
                       "cv_summary": summary(v.cv_summary), "ranks": v.ranks,
                       "cv_ranks": v.cv_ranks, "variants": v.variants, "aquilamoe": aquila,
                       "breakdown": aquilamoe_breakdown(v)}, indent=2)
