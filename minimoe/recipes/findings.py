"""The report of a recipe run over several seeds (`--seeds`): every figure as mean +- sd with
each seed's value, the paper's claims judged by recipes/seeds.py's RULE, and for the claims
about training dynamics the paired difference at every evaluation."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import pandas as pd

from minimoe import files
from minimoe.evaluate import metric_label
from minimoe.recipes.report import plot_curves
from minimoe.recipes.seeds import (
    RULE,
    claims_markdown,
    figures_over_seeds,
    judge,
    mean_curves,
    show,
    spread,
)

EQUAL_COMPUTE = "val loss, from scratch at the chain's FLOPs"
# (claim, figure a, "<" or ">", figure b or a number); a name may hold a * (fnmatch)
CLAIMS = {
    "pipeline": [
        ("EfficientScale ends lower than the MoE from scratch after the same tokens",
         "val loss, scale-out end", "<", "val loss, from scratch end"),
        ("EfficientScale ends lower than the MoE from scratch after the same compute",
         "val loss, scale-out end", "<", EQUAL_COMPUTE),
        ("EfficientScale needs less compute to reach its final loss (iso-loss factor > 1)",
         "compute_savings_iso_loss", ">", 1.0),
        ("EfficientScale needs less time to reach its final loss (iso-loss factor > 1)",
         "time_savings_iso_loss", ">", 1.0),
        ("Growth raises the loss (AquilaMoE Table 1: AKI-Pro 7.81 at 7B)",
         "{scale_up_method} growth (2-grown): val loss after", ">",
         "{scale_up_method} growth (2-grown): val loss before"),
        ("The MoE improves on the dense model it was upcycled from", "val loss, scale-out end",
         "<", "val loss, scale-up end"),
        ("Bits per byte: the scaled-out MoE below the MoE from scratch, equal tokens",
         "scaled-out MoE (5-scale-out): ppl bpb", "<", "MoE from scratch, equal tokens (6-scratch): ppl bpb"),
        ("Bits per byte: the scaled-out MoE below the MoE from scratch, equal compute",
         "scaled-out MoE (5-scale-out): ppl bpb", "<", "MoE from scratch, equal compute *: ppl bpb"),
        ("Routing grows more domain-specific over scale-out (mean Jensen-Shannon)",
         "upcycled, end of scale-out (5-scale-out): mean JS", ">",
         "upcycled, start of scale-out (4-upcycled): mean JS"),
    ],
    "scale-up": [
        ("Every grown model starts below random initialisation (worst: AKI stacking)",
         "AKI (Stacking): at init", "<", "Random: at init"),
        ("AKI starts higher than FPI (stacking)", "AKI (Stacking): at init", ">", "FPI (Stacking): at init"),
        ("AKI-Pro starts higher than FPI (interpolation)", "AKI-Pro (Interpolation): at init", ">",
         "FPI (Interpolation): at init"),
        ("For AKI, interpolation starts lower than stacking (paper 7.81 vs 9.56)",
         "AKI-Pro (Interpolation): at init", "<", "AKI (Stacking): at init"),
        ("For FPI, interpolation starts lower than stacking (paper 3.31 vs 4.30)",
         "FPI (Interpolation): at init", "<", "FPI (Stacking): at init"),
        ("AKI-Pro ends lower than FPI, both interpolated (Figure 3)",
         "AKI-Pro (Interpolation): final", "<", "FPI (Interpolation): final"),
        ("AKI ends lower than FPI, both stacked (Figure 3)", "AKI (Stacking): final", "<",
         "FPI (Stacking): final"),
    ],
    "scale-out": [
        ("The upcycled MoE ends lower than the dense model it came from (AquilaMoE §3.2.2)",
         "upcycled: final", "<", "dense (continued): final"),
        ("The upcycled MoE ends lower than the same MoE from scratch", "upcycled: final", "<",
         "MoE from scratch: final"),
        ("Upcycling ends lower than LLaMA-MoE's random split", "upcycled: final", "<",
         "split-random: final"),
        ("The random split ends lower than the cluster split (LLaMA-MoE's choice)",
         "split-random: final", "<", "split-cluster: final"),
        ("The random split ends lower than the importance split", "split-random: final", "<",
         "split-importance: final"),
    ],
}
# claims about dynamics: the paired difference a - b at every evaluation (curves by run name)
TRAJECTORIES = {"scale-up": [("AKI-Pro (Interpolation)", "FPI (Interpolation)"),
                             ("AKI (Stacking)", "FPI (Stacking)")],
                "scale-out": [("upcycled", "dense (continued)")]}


def _values(per_seed: dict[int, dict], name, settings: dict) -> list[float]:
    if not isinstance(name, str):
        return [float(name)] * len(per_seed)
    name = name.format(**settings)
    out = []
    for figures in per_seed.values():
        keys = fnmatch.filter(figures, name)
        assert len(keys) == 1, (name, keys)
        out.append(figures[keys[0]])
    return out


def trajectory(curves: list[dict], a: str, b: str) -> list[dict]:
    """The paired difference a - b over seeds at every evaluation both runs logged."""
    n = min(len(c[a]) for c in curves)
    return [{"tokens": curves[0][a][i]["tokens"],
             **judge(f"{a} below {b}", [c[a][i]["val_loss"] for c in curves],
                     [c[b][i]["val_loss"] for c in curves])} for i in range(n)]


MAX_DOUBLINGS = 10  # an extrapolation past 1,024x the measured budget is not stated


def decided_after(points: list[dict]) -> str:
    """In words: from which evaluation on the claim holds, or at what budget it might."""
    for i, p in enumerate(points):
        if all(q["verdict"] == "holds" for q in points[i:]):
            return f"holds from {p['tokens']:,.0f} tokens on, to the end"
    last, tail = points[-1], points[len(points) // 2:]
    if len(tail) < 2 or last["interval"][0] is None or tail[0]["tokens"] <= 0:
        return f"{last['verdict']} at the end ({last['tokens']:,.0f} tokens)"
    half = (last["interval"][1] - last["interval"][0]) / 2
    # the mean difference's trend per doubling of tokens over the second half of training
    rate = ((tail[-1]["difference"]["mean"] - tail[0]["difference"]["mean"])
            / math.log2(tail[-1]["tokens"] / tail[0]["tokens"]))
    words = f"{last['verdict']} at the end ({last['tokens']:,.0f} tokens; interval half-width {half:.3f})"
    if rate < 0 and last["difference"]["mean"] + half > 0:
        doublings = (last["difference"]["mean"] + half) / -rate
        if doublings > MAX_DOUBLINGS:  # a flat trend: its extrapolation is a number of no use
            return (words + f"; the difference falls only {-rate:.4f} per doubling of tokens: at "
                    f"that rate no budget up to {2 ** MAX_DOUBLINGS:,}x this one decides it")
        return (words + f"; the difference falls {-rate:.3f} per doubling of tokens, so at that "
                f"rate it would hold after about {last['tokens'] * 2 ** doublings:,.0f} tokens "
                "(an extrapolation, not a measurement)")
    return words + f"; the difference moves {rate:+.3f} per doubling of tokens, not towards the claim"


def _cell(values: list):
    """One table cell over seeds: the value if every seed has it, else mean +- sd."""
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return values[0] if values[0] is not None else "-"
    s = spread(values)
    digits = 3 if abs(s["mean"]) < 10 else 1 if abs(s["mean"]) < 1000 else 0
    return f"{s['mean']:.{digits}f}" + (f" +- {s['sd']:.{digits}f}" if len(set(values)) > 1 else "")


def table_over_seeds(tables: list[list[dict]]) -> pd.DataFrame:
    """Seeds' tables of the same rows and columns -> one table of `_cell`s."""
    return pd.DataFrame([{k: _cell([row[k] for row in rows]) for k in rows[0]}
                         for rows in zip(*tables)])


def evaluation_over_seeds(per_seed: dict[int, dict]) -> pd.DataFrame | None:
    """The tasks x models table (accuracies in %) with mean +- sd cells."""
    tables = []
    for summary in per_seed.values():
        if not summary.get("evaluation"):
            return None
        rows = {}
        for model, results in summary["evaluation"].items():
            for task, r in results.items():
                for metric, value in r.get("metrics", r).items():
                    scale = 1 if metric.startswith("bpb") or metric == "ppl" else 100
                    rows.setdefault(metric_label(task, metric), {})[model] = value * scale
        tables.append([{"task": label, **row} for label, row in rows.items()])
    return table_over_seeds(tables)


def _savings_lines(f: dict[str, dict]) -> list[str]:
    """The pipeline's savings over seeds, iso-loss first (lower bounds said so)."""
    if "compute_savings_iso_loss" not in f:
        return []
    reached = round(f["iso_loss_reached"]["mean"] * f["iso_loss_reached"]["n"])
    bound = "" if reached == f["iso_loss_reached"]["n"] else (
        f" (the MoE from scratch reached the chain's loss in {reached} of "
        f"{f['iso_loss_reached']['n']} seeds; where it did not, the figure is a lower bound)")
    return ["## Savings", "",
            f"- at equal loss: compute **{show(f['compute_savings_iso_loss'], 2)}**, time "
            f"**{show(f['time_savings_iso_loss'], 2)}**{bound}",
            f"- at equal tokens (Table 6's definition): compute {show(f['compute_savings_model_flops'], 2)}, "
            f"time {show(f['time_savings'], 2)} (from the wall time of training: "
            f"{show(f['time_savings_wall'], 2)})",
            f"- final loss: EfficientScale {show(f['val loss, scale-out end'])}; from scratch after the "
            f"same tokens {show(f['val loss, from scratch end'])}, after the same compute "
            f"{show(f[EQUAL_COMPUTE])}", ""]


def write_seeds_report(out: Path, kind: str, per_seed: dict[int, dict], settings: dict) -> dict:
    """report.md, summary.json and the mean curves (loss_vs_tokens.png) of `kind` over seeds."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {s: r["figures"] for s, r in per_seed.items()}
    claims = [judge(text, _values(figures, a, settings), _values(figures, b, settings), rel)
              for text, a, rel, b in CLAIMS[kind]]
    curves = [r["curves"] for r in per_seed.values()]
    dynamics = {f"{a} below {b}": trajectory(curves, a, b) for a, b in TRAJECTORIES.get(kind, [])}
    mean = mean_curves(curves)
    plot_curves(mean, out / "loss_vs_tokens.png", "tokens",
                f"{kind}: mean validation loss over {len(per_seed)} seeds (band: +- sd)")
    aggregated = figures_over_seeds(figures)
    md = [f"# {kind} over seeds {', '.join(map(str, per_seed))}", "",
          "Every figure: mean +- standard deviation over the seeds, then each seed's value. Each "
          "seed's own report: `seed-N/`.", "", *_savings_lines(aggregated),
          "## Claims", "", *claims_markdown(claims)]
    for name, points in dynamics.items():
        md += [f"## Over training: {name}", "", decided_after(points), "",
               "| tokens | a - b (mean) | 95% interval | verdict |", "|--:|--:|--:|:--|"]
        md += [f"| {p['tokens']:,.0f} | {p['difference']['mean']:+.3f} | "
               + ("-" if p["interval"][0] is None else
                  f"[{p['interval'][0]:+.3f}, {p['interval'][1]:+.3f}]") + f" | {p['verdict']} |"
               for p in points] + [""]
    rows = table_over_seeds([r.get("rows") or r["stages"] for r in per_seed.values()])
    md += ["## The table, over seeds", "", rows.to_markdown(index=False, disable_numparse=True), ""]
    evaluation = evaluation_over_seeds(per_seed)
    if evaluation is not None:
        md += ["## Evaluation, over seeds", "",
               evaluation.to_markdown(index=False, disable_numparse=True), ""]
    others = [f"| {name} | {show(s)} |" for name, s in aggregated.items()
              if evaluation is None or ": " not in name or "JS" in name or "val loss" in name]
    if others:  # with an evaluation table, every figure may already be in it
        md += ["## Every other figure", "", "| figure | over seeds |", "|:--|--:|", *others]
    md += ["", "![mean loss](loss_vs_tokens.png)", ""]
    files.write_text(out / "report.md", "\n".join(md))
    summary = {"kind": kind, "seeds": list(per_seed), "settings": settings, "rule": RULE,
               "table": rows.to_dict("records"),
               "figures": aggregated, "claims": claims, "curves": mean,
               "dynamics": {k: [{"tokens": p["tokens"], "difference": p["difference"],
                                 "interval": p["interval"], "verdict": p["verdict"]} for p in v]
                            for k, v in dynamics.items()},
               "decided": {k: decided_after(v) for k, v in dynamics.items()}}
    files.write_json(out / "summary.json", summary)
    files.write_text(out / "figures.csv", pd.DataFrame(
        [{"figure": k, "mean": s["mean"], "sd": s["sd"], **{f"seed {seed}": v for seed, v in
                                                            zip(per_seed, s["values"])}}
         for k, s in aggregated.items()]).to_csv(index=False))
    return summary
