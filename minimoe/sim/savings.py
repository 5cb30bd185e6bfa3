"""Where a chain's savings factors come from (AquilaMoE Table 6): each phase's speed-up over the
baseline as FLOPs per token x cluster peak x MFU, and each ratio's Shapley share of TSF and CPSF
(docs/simulator.md "Decomposing the savings factors")."""

from __future__ import annotations

import itertools
import math

SOURCES = ("FLOPs per token", "chips (cluster peak)", "efficiency (MFU)")


def decompose(phases: list[dict], baseline: dict) -> dict:
    """phases and baseline: {"name", "tokens", "tokens_per_s", "flops_per_token", "peak"}
    (peak: the cluster's FLOP/s; any unit of time, the same for all). Returns the factors,
    each source's multiplicative share of them, and one row per phase."""
    ratios = [{"FLOPs per token": baseline["flops_per_token"] / p["flops_per_token"],
               "chips (cluster peak)": p["peak"] / baseline["peak"]} for p in phases]
    for r, p in zip(ratios, phases):
        speedup = p["tokens_per_s"] / baseline["tokens_per_s"]
        r["efficiency (MFU)"] = speedup / (r["FLOPs per token"] * r["chips (cluster peak)"])

    def factors(on: set) -> tuple[float, float]:
        time = capacity = 0.0
        for r, p in zip(ratios, phases):
            s = math.prod(r[k] for k in on)
            chips = r["chips (cluster peak)"] if "chips (cluster peak)" in on else 1.0
            time += p["tokens"] / s
            capacity += p["tokens"] * chips / s
        return baseline["tokens"] / time, baseline["tokens"] / capacity

    shares = {}
    for which, name in enumerate(("tsf", "cpsf")):
        logs = dict.fromkeys(SOURCES, 0.0)
        orders = list(itertools.permutations(SOURCES))
        for order in orders:
            for i, source in enumerate(order):
                gain = (math.log(factors(set(order[:i + 1]))[which])
                        - math.log(factors(set(order[:i]))[which]))
                logs[source] += gain / len(orders)
        shares[name] = {k: math.exp(v) for k, v in logs.items()}
    tsf, cpsf = factors(set(SOURCES))
    total = sum(p["tokens"] for p in phases)
    base_time = baseline["tokens"] / baseline["tokens_per_s"]
    rows = [{"phase": p["name"], "token share": p["tokens"] / total, **r,
             "speed-up": math.prod(r.values()),
             "time saved share": (p["tokens"] / baseline["tokens_per_s"]
                                  - p["tokens"] / p["tokens_per_s"])
             / (base_time - sum(q["tokens"] / q["tokens_per_s"] for q in phases))}
            for p, r in zip(phases, ratios)]
    return {"tsf": tsf, "cpsf": cpsf, "shares": shares, "phases": rows,
            "all_tokens_in_first": rows[0]["speed-up"]}


def scenario_decomposition(result) -> dict:
    """decompose() of a ScenarioResult's phases."""
    def inputs(p):
        return {"name": p.name, "tokens": p.tokens, "tokens_per_s": p.tokens_per_day,
                "flops_per_token": p.flops_per_token, "peak": p.gpus * p.peak_flops}

    return decompose([inputs(p) for p in result.phases], inputs(result.baseline))


def decomposition_lines(d: dict) -> list[str]:
    """The decomposition in words and a table, for `minimoe simulate` and the pipeline report."""
    def product(name):
        return " x ".join(f"{d['shares'][name][k]:.2f} ({k})" for k in SOURCES)

    lines = ["Where the factors come from (each ratio's Shapley share; they multiply to the factor):",
             f"  TSF  {d['tsf']:.2f} = {product('tsf')}",
             f"  CPSF {d['cpsf']:.2f} = {product('cpsf')}",
             "  token split: TSF is the token-weighted harmonic mean of the phases' speed-ups; "
             f"all tokens in the first phase would give {d['all_tokens_in_first']:.2f}, "
             "all in the last 1.00",
             f"  {'phase':14s} {'tokens':>7s} {'FLOPs/token':>11s} {'chips':>6s} {'MFU':>6s} "
             f"{'speed-up':>8s} {'time saved':>10s}"]
    for r in d["phases"]:
        lines.append(f"  {r['phase']:14s} {r['token share']:7.1%} {r['FLOPs per token']:10.2f}x "
                     f"{r['chips (cluster peak)']:5.2f}x {r['efficiency (MFU)']:5.2f}x "
                     f"{r['speed-up']:7.2f}x {r['time saved share']:10.1%}")
    return lines
