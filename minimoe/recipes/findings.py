"""A recipe over several seeds (`--seeds`): every figure as mean +- sd with each seed's value, the
paper's claims judged by one stated rule (RULE) on the paired difference over seeds, and for the
claims about training dynamics that difference at every evaluation (docs/method.md)."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import statistics
from pathlib import Path

import pandas as pd

from minimoe import files
from minimoe.evaluate import metric_label
from minimoe.recipes.report import plot_curves

# two-sided 97.5% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}

RULE = ("A claim compares two figures seed by seed (the same seed gives both runs the same data "
        "order and, where they share one, the same parent model). Over n seeds the paired "
        "difference has mean d and standard error se = sd / sqrt(n); its 95% interval is "
        "d +- t(n-1) se (Student's t). The claim **holds** when the interval lies wholly on "
        "the claimed side of zero, **does not hold** when it lies wholly on the other side, "
        "and is **within noise** when it contains zero (always, with one seed).")

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


def over_seeds(run, recipe, out, seeds: list[int]) -> dict[int, dict]:
    """run(recipe with seed s, out/seed-s) for every seed: {seed: what run returned}."""
    return {s: run(dataclasses.replace(recipe, seed=s), Path(out) / f"seed-{s}") for s in seeds}


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and every value."""
    values = [float(v) for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values), "values": values}


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def judge(claim: str, a: list[float], b: list[float], expect: str = "<") -> dict:
    """Claim `a expect b` ("<" or ">") judged on the paired differences a_i - b_i (RULE)."""
    assert expect in ("<", ">") and len(a) == len(b) > 0
    d = spread([x - y for x, y in zip(a, b)])
    interval, verdict = [None, None], "within noise"  # one seed: no spread to judge by
    if d["n"] > 1:
        half = t975(d["n"] - 1) * d["sd"] / math.sqrt(d["n"])
        interval = [d["mean"] - half, d["mean"] + half]
        if interval[0] > 0 or interval[1] < 0:  # the interval excludes zero
            verdict = "holds" if (d["mean"] < 0) == (expect == "<") else "does not hold"
    return {"claim": claim, "expect": expect, "a": spread(a), "b": spread(b), "difference": d,
            "interval": interval, "verdict": verdict}


def show(s: dict, digits: int = 3) -> str:
    """'5.399 +- 0.012 (5.387, 5.401, 5.410)': mean +- sd and every seed's value."""
    each = ", ".join(f"{v:.{digits}f}" for v in s["values"])
    return f"{s['mean']:.{digits}f} +- {s['sd']:.{digits}f} ({each})" if s["n"] > 1 else each


def _values(figures: list[dict], name, settings: dict) -> list[float]:
    """One side of a claim in every seed: a figure or a number."""
    if not isinstance(name, str):
        return [float(name)] * len(figures)
    keys = [fnmatch.filter(f, name.format(**settings)) for f in figures]
    assert all(len(k) == 1 for k in keys), (name, keys)
    return [f[k[0]] for f, k in zip(figures, keys)]


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


def evaluation_over_seeds(summaries: list[dict]) -> pd.DataFrame:
    """The tasks x models table (accuracies in %) with mean +- sd cells."""
    tables = []
    for summary in summaries:
        rows = {}
        for model, results in summary["evaluation"].items():
            for task, r in results.items():  # a pipeline's results hold metrics, chance and n
                for metric, value in r.get("metrics", r).items():
                    scale = 1 if metric.startswith("bpb") or metric == "ppl" else 100
                    rows.setdefault(metric_label(task, metric), {})[model] = value * scale
        tables.append([{"task": label, **row} for label, row in rows.items()])
    return table_over_seeds(tables)


def _savings_lines(f: dict[str, dict]) -> list[str]:
    """The pipeline's savings over seeds, iso-loss first (lower bounds said so)."""
    if "compute_savings_iso_loss" not in f:
        return []
    n = f["iso_loss_reached"]["n"]
    reached = round(f["iso_loss_reached"]["mean"] * n)
    bound = "" if reached == n else (f" (the MoE from scratch reached the chain's loss in {reached} "
                                     f"of {n} seeds; where it did not, the figure is a lower bound)")
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
    """report.md, summary.json, figures.csv and the mean curves (loss_vs_tokens.png) of `kind`
    over seeds, from each seed's summary."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = list(per_seed.values())
    figures = [r["figures"] for r in summaries]
    claims = [judge(text, _values(figures, a, settings), _values(figures, b, settings), rel)
              for text, a, rel, b in CLAIMS[kind]]
    curves = [r["curves"] for r in summaries]
    dynamics = {f"{a} below {b}": trajectory(curves, a, b) for a, b in TRAJECTORIES.get(kind, [])}
    decided = {name: decided_after(points) for name, points in dynamics.items()}
    mean = {}
    for label in curves[0]:  # pointwise over seeds: every seed logs the same evaluations
        runs = [c[label] for c in curves]
        points = [spread([r[i]["val_loss"] for r in runs]) for i in range(min(map(len, runs)))]
        mean[label] = [{**runs[0][i], "val_loss": s["mean"], "sd": s["sd"]} for i, s in enumerate(points)]
    plot_curves(mean, out / "loss_vs_tokens.png", "tokens",
                f"{kind}: mean validation loss over {len(per_seed)} seeds (band: +- sd)")
    common = set.intersection(*map(set, figures))
    aggregated = {k: spread([f[k] for f in figures]) for k in figures[0] if k in common}
    md = [f"# {kind} over seeds {', '.join(map(str, per_seed))}", "",
          "Every figure: mean +- standard deviation over the seeds, then each seed's value. Each "
          "seed's own report: `seed-N/`.", "", *_savings_lines(aggregated),
          "## Claims", "", "| claim | a | b | a - b (95% interval) | verdict |", "|:--|--:|--:|--:|:--|"]
    for c in claims:
        lo, hi = ("?" if x is None else f"{x:+.3f}" for x in c["interval"])
        md.append(f"| {c['claim']} | {show(c['a'])} | {show(c['b'])} | "
                  f"{c['difference']['mean']:+.3f} [{lo}, {hi}] | {c['verdict']} |")
    md += ["", RULE, ""]
    for name, points in dynamics.items():
        md += [f"## Over training: {name}", "", decided[name], "",
               "| tokens | a - b (mean) | 95% interval | verdict |", "|--:|--:|--:|:--|"]
        for p in points:
            lo, hi = p["interval"]
            interval = "-" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
            md.append(f"| {p['tokens']:,.0f} | {p['difference']['mean']:+.3f} | {interval} | {p['verdict']} |")
        md.append("")
    rows = table_over_seeds([r.get("rows") or r["stages"] for r in summaries])
    md += ["## The table, over seeds", "", rows.to_markdown(index=False, disable_numparse=True), "",
           "## Evaluation, over seeds", "",
           evaluation_over_seeds(summaries).to_markdown(index=False, disable_numparse=True), ""]
    # the evaluation table holds every task's figure; what else there is, once
    others = [f"| {name} | {show(s)} |" for name, s in aggregated.items()
              if ": " not in name or "JS" in name or "val loss" in name]
    if others:
        md += ["## Every other figure", "", "| figure | over seeds |", "|:--|--:|", *others]
    md += ["", "![mean loss](loss_vs_tokens.png)", ""]
    files.write_text(out / "report.md", "\n".join(md))
    summary = {"kind": kind, "seeds": list(per_seed), "settings": settings, "rule": RULE,
               "table": rows.to_dict("records"), "figures": aggregated, "claims": claims,
               "curves": mean, "decided": decided,
               "dynamics": {name: [{k: p[k] for k in ("tokens", "difference", "interval", "verdict")}
                                   for p in points] for name, points in dynamics.items()}}
    files.write_json(out / "summary.json", summary)
    files.write_text(out / "figures.csv", pd.DataFrame(
        [{"figure": k, "mean": s["mean"], "sd": s["sd"],
          **{f"seed {seed}": v for seed, v in zip(per_seed, s["values"])}} for k, s in aggregated.items()]
    ).to_csv(index=False))
    return summary
