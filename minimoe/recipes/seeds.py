"""One recipe over several seeds: every figure as mean, standard deviation and each seed's value,
and every claim judged by one stated rule (RULE) on the paired difference over seeds."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

# two-sided 97.5% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}

RULE = ("A claim compares two figures seed by seed (the same seed gives both runs the same data "
        "order and, where they share one, the same parent model). Over n seeds the paired "
        "difference has mean d and standard error se = sd / sqrt(n); its 95% interval is "
        "d +- t(n-1) se (Student's t). The claim **holds** when the interval lies wholly on "
        "the claimed side of zero, **does not hold** when it lies wholly on the other side, "
        "and is **within noise** when it contains zero (always, with one seed).")


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
    if d["n"] == 1:  # no spread to judge by
        return {"claim": claim, "expect": expect, "a": spread(a), "b": spread(b),
                "difference": d, "interval": [None, None], "verdict": "within noise"}
    half = t975(d["n"] - 1) * d["sd"] / math.sqrt(d["n"])
    lo, hi = d["mean"] - half, d["mean"] + half
    verdict = "within noise"
    if lo > 0 or hi < 0:  # the interval excludes zero
        verdict = "holds" if (d["mean"] < 0) == (expect == "<") else "does not hold"
    return {"claim": claim, "expect": expect, "a": spread(a), "b": spread(b), "difference": d,
            "interval": [lo, hi], "verdict": verdict}


def show(s: dict, digits: int = 3) -> str:
    """'5.399 +- 0.012 (5.387, 5.401, 5.410)': mean +- sd and every seed's value."""
    each = ", ".join(f"{v:.{digits}f}" for v in s["values"])
    return f"{s['mean']:.{digits}f} +- {s['sd']:.{digits}f} ({each})" if s["n"] > 1 else each


def claims_markdown(claims: list[dict], digits: int = 3) -> list[str]:
    """The claims as a Markdown table (difference = a - b, its 95% interval, the verdict)."""
    lines = ["| claim | a | b | a - b (95% interval) | verdict |", "|:--|--:|--:|--:|:--|"]
    for c in claims:
        lo, hi = ("?" if x is None else f"{x:+.{digits}f}" for x in c["interval"])
        lines.append(f"| {c['claim']} | {show(c['a'], digits)} | {show(c['b'], digits)} | "
                     f"{c['difference']['mean']:+.{digits}f} [{lo}, {hi}] | {c['verdict']} |")
    return lines + ["", RULE, ""]


def figures_over_seeds(per_seed: dict[int, dict[str, float]]) -> dict[str, dict]:
    """{figure: spread over seeds} from {seed: {figure: value}} (figures every seed has)."""
    common = set.intersection(*(set(f) for f in per_seed.values()))
    first = next(iter(per_seed.values()))
    return {k: spread([f[k] for f in per_seed.values()]) for k in first if k in common}


def mean_curves(curves: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Pointwise mean and sd over seeds of runs' validation curves (the same evaluation steps)."""
    out = {}
    for label in curves[0]:
        runs = [c[label] for c in curves if label in c]
        n = min(len(r) for r in runs)
        out[label] = [{**runs[0][i], "val_loss": statistics.fmean(r[i]["val_loss"] for r in runs),
                       "sd": statistics.stdev(r[i]["val_loss"] for r in runs) if len(runs) > 1 else 0.0}
                      for i in range(n)]
    return out
