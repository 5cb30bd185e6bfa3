"""The pipeline report of one seed: stages, transformations, savings (iso-loss first, the
paper's equal-token factors beside), where the time factor comes from, plots, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from minimoe import files
from minimoe.evaluate import results_table
from minimoe.sim.savings import decompose, decomposition_lines
from minimoe.tables import human


def val_curve(stage: dict, tokens0: float, flops0: float) -> list[dict]:
    """Validation points of one stage, offset by the tokens and FLOPs of the stages before."""
    return [{"tokens": tokens0 + r["tokens"], "flops": flops0 + r["tokens"] * stage["flops_per_token"],
             "val_loss": r["val_loss"]} for r in stage["log"] if "val_loss" in r]


def _interpolate(points: list[dict], x: str, at: float) -> float:
    """Validation loss at x == at, linear between the two logged points around it."""
    for a, b in zip(points, points[1:]):
        if a[x] <= at <= b[x]:
            t = (at - a[x]) / (b[x] - a[x]) if b[x] > a[x] else 0.0
            return a["val_loss"] + t * (b["val_loss"] - a["val_loss"])
    return points[-1]["val_loss"]


def iso_loss(curve: list[dict], target: float) -> tuple[dict, bool]:
    """Where a curve first reaches `target` ({"tokens", "flops"}, linear between evaluations),
    and whether it does; if it never does, its last point (so a factor from it is a lower bound)."""
    for a, b in zip(curve, curve[1:]):
        if b["val_loss"] <= target:
            t = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"]) if a["val_loss"] > target else 0.0
            return {k: a[k] + t * (b[k] - a[k]) for k in ("tokens", "flops")}, True
    return {k: curve[-1][k] for k in ("tokens", "flops")}, False


def measured_savings(chain: list[dict], scratch: dict, speed: dict[str, float]) -> dict:
    """AquilaMoE Table 6's factors from measured stages, at equal loss and at equal tokens, time
    at each model's measured step speed (`speed`) and from the wall time (docs/method.md)."""
    tokens, flops = sum(s["tokens"] for s in chain), sum(s["flops"] for s in chain)
    chain_time = sum(s["tokens"] / speed[s["stage"]] for s in chain)
    scratch_curve = val_curve(scratch, 0.0, 0.0)
    at, reached = iso_loss(scratch_curve, val_curve(chain[-1], 0, 0)[-1]["val_loss"])
    wall_speed = scratch["tokens"] / scratch["train_time_s"]
    return {
        "compute_savings_iso_loss": at["flops"] / flops,
        "time_savings_iso_loss": at["tokens"] / speed[scratch["stage"]] / chain_time,
        "iso_loss_reached": reached,
        "scratch_tokens_to_chain_loss": at["tokens"],
        "compute_savings_model_flops": tokens * scratch["flops_per_token"] / flops,
        "time_savings": tokens / speed[scratch["stage"]] / chain_time,
        "time_savings_wall": tokens / wall_speed / sum(s["train_time_s"] for s in chain),
        "scratch_val_loss_at_chain_flops": _interpolate(scratch_curve, "flops", flops),
        "scratch_tokens_equal_chain": scratch["tokens"] == tokens,
    }


def specialisation_section(results: dict[str, dict]) -> list[str]:
    """Markdown lines: each MoE run's Jensen-Shannon specialisation by layer, and its heatmaps."""
    rows = [{"MoE": label, "mean JS": f"{r['mean_js']:.3f}",
             **{f"layer {layer['layer']}": f"{layer['js']:.3f}" for layer in r["layers"]}}
            for label, r in results.items()]
    lines = ["Routing by domain (LLaMA-MoE, arXiv 2406.16554; README \"Data mixing\"): the "
             "Jensen-Shannon divergence between the domains' expert distributions over "
             "log2(domains), 0 when the router ignores the domain, 1 when each has its own experts.",
             "", pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    lines += [f"![{label}](experts/{r['folder']}/specialisation.png)" for label, r in results.items()]
    return lines + ["", "Each expert's most frequent tokens: `experts/*/top_tokens.md`.", ""]


def _figures(factors: dict, rows: list[dict], transitions: dict, evaluation: dict,
             specialisation: dict) -> dict[str, float]:
    """Every number of the report by name: what recipes/findings.py aggregates over seeds."""
    figures = {f"val loss, {r['stage']} {when}": r[f"val loss at {when}"]
               for r in rows for when in ("start", "end")}
    figures["val loss, from scratch at the chain's FLOPs"] = factors["scratch_val_loss_at_chain_flops"]
    for key in ("compute_savings_iso_loss", "time_savings_iso_loss", "compute_savings_model_flops",
                "time_savings", "time_savings_wall", "iso_loss_reached"):
        figures[key] = float(factors[key])
    for name, r in transitions.items():
        figures[f"{name}: val loss before"] = r["val_before"]["val_loss"]
        figures[f"{name}: val loss after"] = r["val_after"]["val_loss"]
    for model, results in evaluation.items():
        figures.update({f"{model}: {task} {metric}": value for task, r in results.items()
                        for metric, value in r["metrics"].items()})
    figures.update({f"{label}: mean JS": r["mean_js"] for label, r in specialisation.items()})
    return figures


def write_pipeline_report(out: Path, settings: dict, stages: list[dict], transitions: dict,
                          speeds: dict, evaluation: dict[str, dict], specialisation: dict[str, dict]
                          ) -> dict:
    """report.md, summary.json, stages.csv, evaluation.csv and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    chain, scratch = stages[:-1], stages[-1]
    speed = speeds["tokens_per_s"]
    factors = measured_savings(chain, scratch, speed)
    curves, tokens0, flops0 = {}, 0.0, 0.0
    for stage in chain:  # loss against cumulative FLOPs (the paper's Figure 4), stages joined
        curves[stage["stage"]] = val_curve(stage, tokens0, flops0)
        tokens0, flops0 = tokens0 + stage["tokens"], flops0 + stage["flops"]
    curves["from scratch"] = val_curve(scratch, 0.0, 0.0)
    # tokens per expert of the final MoE, per layer, at its last logged step
    load = next((r["load"] for r in reversed(chain[-1]["log"]) if r.get("load")), None)
    rows = [{"stage": s["stage"], "params (total)": human(s["params_total"]),
             "params (active)": human(s["params_active"]), "tokens": s["tokens"],
             "train time (s)": round(s["train_time_s"], 1),
             "step speed (tokens/s)": round(speed[s["stage"]]), "model FLOPs": f"{s['flops']:.3g}",
             "val loss at start": round(val_curve(s, 0, 0)[0]["val_loss"], 3),
             "val loss at end": round(val_curve(s, 0, 0)[-1]["val_loss"], 3),
             "data mix": s["mix"]} for s in stages]
    files.write_text(out / "stages.csv", pd.DataFrame(rows).to_csv(index=False))
    trans = pd.DataFrame([{"transformation": name, "params before": human(r["params_before"]["total"]),
                           "params after": human(r["params_after"]["total"]),
                           **{f"{k} before": round(v, 3) for k, v in r["val_before"].items()},
                           **{f"{k} after": round(v, 3) for k, v in r["val_after"].items()}}
                          for name, r in transitions.items()])
    chain_end, scratch_end = rows[-2]["val loss at end"], rows[-1]["val loss at end"]
    parts = decompose([{"name": s["stage"], "tokens": s["tokens"], "tokens_per_s": speed[s["stage"]],
                        "flops_per_token": s["flops_per_token"], "peak": 1.0} for s in chain],
                      {"tokens": sum(s["tokens"] for s in chain), "tokens_per_s": speed["from scratch"],
                       "flops_per_token": scratch["flops_per_token"], "peak": 1.0})
    bound = "" if factors["iso_loss_reached"] else ">= "
    load_1min = ", ".join(f"{x:.2f}" for x in speeds["load_1min"])
    md = [
        "# minimoe pipeline report", "",
        "Preparation -> Scale-Up -> Scale-Out, each with continued pretraining, against the final",
        "MoE shape trained from scratch on the same total tokens. Validation loss: cross-entropy",
        "on the held-out split of the demo corpus (nats/token).", "",
        "## Stages", "", pd.DataFrame(rows).to_markdown(index=False), "",
        "## Right after each transformation (before any training)", "", trans.to_markdown(index=False), "",
        "## Savings", "",
        f"- **at equal loss** (the MoE from scratch first reaching the chain's final {chain_end:.3f}, "
        f"read off its curve{'' if bound == '' else '; it never did, so these are lower bounds'}): "
        f"compute **{bound}{factors['compute_savings_iso_loss']:.2f}x**, "
        f"time **{bound}{factors['time_savings_iso_loss']:.2f}x**",
        f"- at equal tokens (AquilaMoE Table 6's definition; paper 4.12x time, 3.35x compute): "
        f"compute by model FLOPs {factors['compute_savings_model_flops']:.2f}x, time "
        f"{factors['time_savings']:.2f}x; final loss {chain_end:.3f} (chain) vs {scratch_end:.3f} "
        "(from scratch)",
        f"- at equal compute (the chain's {flops0:.3g} FLOPs) the MoE from scratch was at "
        f"{factors['scratch_val_loss_at_chain_flops']:.3f}", "",
        "Time is each stage's tokens at its model's training-step speed, measured after training in",
        f"rounds alternating between the models (one thread, median; 1-minute load average "
        f"{load_1min} on {speeds['cpus']} CPUs). From the wall time of training instead, which "
        f"moves with whatever else the machine ran: {factors['time_savings_wall']:.2f}x. One device "
        "runs every stage, so Table 6's capacity factor equals the time factor here.", "",
        "```", *decomposition_lines(parts), "```", ""]
    write_report(out, "report", md, curves, "EfficientScale vs the MoE from scratch", settings,
                 evaluation, {"scale-out, last step": load} if load else None, marks=True,
                 tail=["## What the experts specialise in, by domain", "",
                       *specialisation_section(specialisation)])
    summary = {"factors": factors, "stages": rows, "speeds": speeds, "decomposition": parts,
               "curves": curves,
               "figures": _figures(factors, rows, transitions, evaluation, specialisation),
               "transitions": {k: {"val_before": r["val_before"], "val_after": r["val_after"]}
                               for k, r in transitions.items()},
               "evaluation": {label: {task: {"metrics": r["metrics"], "chance": r["chance"],
                                             "n": r["n"]} for task, r in results.items()}
                              for label, results in evaluation.items()},
               "specialisation": {label: {"mean_js": r["mean_js"],
                                          "js": [layer["js"] for layer in r["layers"]]}
                                  for label, r in specialisation.items()}}
    files.write_json(out / "summary.json", summary)
    return summary


def write_report(out: Path, name: str, head: list[str], curves: dict[str, list[dict]], title: str,
                 settings: dict, evaluation: dict[str, dict] | None, loads: dict | None = None,
                 marks: bool = False, tail: list[str] = ()):
    """One seed's out/`name`.md: `head`, loss against FLOPs and tokens (`marks`: where each middle
    stage begins), the expert loads, the evaluation (also evaluation.csv), `tail`, the settings."""
    md = list(head)
    for x, axis in (("flops", "FLOPs"), ("tokens", "tokens")):
        starts = {f"-> {label}": pts[0][x] for label, pts in list(curves.items())[1:-1]}
        plot_curves(curves, out / f"loss_vs_{x}.png", x, title, starts if marks else None)
        md += [f"![loss vs {axis}](loss_vs_{x}.png)", ""]
    if loads:
        plot_expert_loads(loads, out / "expert_load.png")
        md += ["![expert load](expert_load.png)", ""]
    if evaluation:  # tasks x models, as AquilaMoE Table 4
        n = {task: r["n"] for task, r in next(iter(evaluation.values())).items()}
        table = results_table(evaluation)
        md += ["## Evaluation", "", "Tasks x models as AquilaMoE Table 4 (`minimoe/tasks.py`, the README's "
               "Evaluation section says what each measures). Examples per task: "
               + ", ".join(f"{k} {v}" for k, v in n.items()) + "; an accuracy p on n examples has "
               "a standard error of about sqrt(p (1 - p) / n).", "",
               table.drop(columns=["n"]).to_markdown(disable_numparse=True, colalign=["left"] +
                                                     ["right"] * (table.shape[1] - 1)), ""]
        files.write_text(out / "evaluation.csv", table.to_csv())
    md += [*tail, "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    files.write_text(out / f"{name}.md", "\n".join(md))


def plot_curves(curves: dict[str, list[dict]], path: Path, x: str, title: str,
                marks: dict[str, float] | None = None):
    """Validation loss of several runs against `x` ("tokens" or "flops"), one line each (a band
    of +- sd where the points carry one: means over seeds); `marks` draws labelled vertical lines."""
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in curves.items():
        style = dict(ls="--", color="gray") if label.startswith("from scratch") else {}
        xs, ys = [p[x] for p in pts], [p["val_loss"] for p in pts]
        line = ax.plot(xs, ys, marker="o", ms=3, label=label, **style)[0]
        if pts and "sd" in pts[0]:
            ax.fill_between(xs, [y - p["sd"] for y, p in zip(ys, pts)],
                            [y + p["sd"] for y, p in zip(ys, pts)], color=line.get_color(), alpha=0.2)
    for label, at in (marks or {}).items():
        ax.axvline(at, color="k", lw=0.6, ls=":")
        ax.annotate(label, (at, ax.get_ylim()[1]), fontsize=8, rotation=90, va="top", ha="right")
    if x == "flops":  # log scale as in the paper's plot; symlog keeps a from-scratch run's 0
        positive = [p["flops"] for pts in curves.values() for p in pts if p["flops"] > 0]
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
        ax.set_xlim(left=0)
    ax.set(xlabel="cumulative training FLOPs" if x == "flops" else x,
           ylabel="validation loss (nats)", title=title)
    ax.legend(fontsize=8)
    files.save_figure(fig, path)


def plot_expert_loads(loads: dict[str, list[list[float]]], path: Path):
    """One heatmap per MoE run: tokens routed to each expert (columns) in each layer (rows)."""
    plt = files.pyplot()
    fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3), squeeze=False)
    for ax, (label, load) in zip(axes[0], loads.items()):
        im = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(len(load[0])))
        ax.set_yticks(range(len(load)))  # whole layers, not matplotlib's fractional ticks
        fig.colorbar(im, ax=ax, label="token-expert pairs")
    files.save_figure(fig, path)
