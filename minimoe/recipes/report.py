"""The pipeline report: stage table, loss curves against tokens and FLOPs, savings factors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from minimoe import files
from minimoe.evaluate import results_table
from minimoe.sim.scenario import savings_factors
from minimoe.tables import human


# --- the pipeline report ------------------------------------------------------------------
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


def measured_savings(chain: list[dict], scratch: dict) -> dict[str, float]:
    """AquilaMoE Table 6's factors from measured stages (arXiv 2408.06567 §4.3).

    A stage's time is its measured training time; the baseline's is the chain's tokens at the
    from-scratch run's measured tokens/s. Capacity = device peak x time, and one machine runs
    every stage here, so the capacity factor equals the time factor: the ratio of counted
    model FLOPs is given beside it.
    """
    n_total = sum(s["tokens"] for s in chain)
    scratch_time = n_total / (scratch["tokens"] / scratch["train_time_s"])
    times = [s["train_time_s"] for s in chain]
    tsf, cpsf = savings_factors(times, times, scratch_time, scratch_time)
    return {
        "time_savings": tsf,
        "compute_savings_capacity": cpsf,
        "compute_savings_model_flops": (n_total * scratch["flops_per_token"])
        / sum(s["flops"] for s in chain),
        "scratch_tokens_equal_chain": scratch["tokens"] == n_total,
    }


def evaluation_section(evaluation: dict[str, dict], expected: int | None = None) -> list[str]:
    """Markdown lines: the tasks x models table (the layout of AquilaMoE Table 4) and how to
    read it. `expected`: the columns there should be (a missing one is named as missing)."""
    if not evaluation:
        return []
    first = next(iter(evaluation.values()))
    n = {name: r["n"] for name, r in first.items()}
    table = results_table(evaluation)
    lines = [
        "Rows are tasks, columns models, as in AquilaMoE Table 4 (OpenCompass: \"ppl\" tasks pick",
        "the most likely candidate, \"gen\" tasks are written by the model). The tasks are made",
        "from the held-out split of the corpus (`minimoe/tasks.py`), the same examples for every",
        "model: cloze = the next sentence among 4 (acc: highest log-likelihood; acc_norm: per",
        "character, as lm-evaluation-harness), complete = the sentence's last word (en) or last",
        "two characters (zh) written greedily, exact match; ppl = bits per byte and perplexity",
        "per token on validation documents. Chance: a random guess, or for bits per byte and",
        "perplexity the uniform model (log2 of the vocabulary per token).", "",
        "Examples per task: " + ", ".join(f"{k} {v}" for k, v in n.items()) + " (documents for",
        "ppl). The standard error of an accuracy p on n examples is about sqrt(p (1 - p) / n):",
        "with 100 examples, differences of a few points are noise.", "",
        table.drop(columns=["n"]).to_markdown(disable_numparse=True, colalign=["left"] +
                                              ["right"] * (table.shape[1] - 1)), "",
    ]
    if expected is not None and len(evaluation) < expected:
        lines += [f"({expected - len(evaluation)} model(s) missing: a pipeline folder made before "
                  "the evaluation existed has no equal-compute snapshot of the baseline; run it "
                  "again in a new folder to get one.)", ""]
    return lines


def specialisation_section(results: dict[str, dict]) -> list[str]:
    """Markdown lines: the Jensen-Shannon specialisation of each MoE run, layer by layer, and
    its heatmaps (experts/<run>/specialisation.png, written by recipes.stages.specialisation_run)."""
    if not results:
        return []
    rows = [{"MoE": label, "mean JS": f"{r['mean_js']:.3f}",
             **{f"layer {layer['layer']}": f"{layer['js']:.3f}" for layer in r["layers"]}}
            for label, r in results.items()]
    lines = ["LLaMA-MoE's routing analysis (arXiv 2406.16554): the validation windows of each",
             "domain go through the MoE, and per layer we count which experts they are sent to.",
             "The score is the Jensen-Shannon divergence between the domains' expert",
             "distributions, divided by log2(domains): 0 when the router ignores the domain, 1",
             "when each domain has experts of its own. Upcycled experts start as copies of one",
             "MLP behind a random router, and a random router already sends the two languages",
             "to different experts (their hidden states differ), so the start is not 0: the",
             "change from the start to the end of scale-out is what continued pretraining did.", "",
             pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    for label, r in results.items():
        lines += [f"![{label}](experts/{r['folder']}/specialisation.png)", ""]
    lines += ["Each expert's most frequent tokens: `experts/*/top_tokens.md`.", ""]
    return lines


def write_pipeline_report(out: Path, settings: dict, stages: list[dict], transitions: dict,
                          evaluation: dict[str, dict] | None = None,
                          specialisation: dict[str, dict] | None = None) -> dict:
    """report.md + loss_vs_flops.png + loss_vs_tokens.png + expert_load.png + stages.csv, the
    evaluation table when `evaluation` ({model label: run_tasks results}) is given, and the
    routing-by-domain section when `specialisation` ({label: specialisation_run result}) is."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chain, scratch = stages[:-1], stages[-1]
    factors = measured_savings(chain, scratch)

    # loss against cumulative FLOPs, the paper's Figure 4 / README plot, transitions marked
    curves = {}
    tokens0 = flops0 = 0.0
    for stage in chain:
        curves[stage["stage"]] = val_curve(stage, tokens0, flops0)
        tokens0 += stage["tokens"]
        flops0 += stage["flops"]
    curves["from scratch"] = val_curve(scratch, 0.0, 0.0)
    title = "EfficientScale vs training the MoE from scratch"
    for x in ("tokens", "flops"):
        marks = {f"-> {label}": pts[0][x] for label, pts in list(curves.items())[1:-1]}
        plot_curves(curves, out / f"loss_vs_{x}.png", x, title, marks)

    # per-layer expert load of the final MoE (tokens per expert, last logged step)
    load = next((r["load"] for r in reversed(chain[-1]["log"]) if r.get("load")), None)
    if load:
        plot_expert_loads({"scale-out, last step": load}, out / "expert_load.png")

    rows = []
    for s in stages:
        final = next(r for r in reversed(s["log"]) if "val_loss" in r)
        first = next(r for r in s["log"] if "val_loss" in r)
        rows.append({"stage": s["stage"], "params (total)": human(s["params_total"]),
                     "params (active)": human(s["params_active"]), "tokens": s["tokens"],
                     "train time (s)": round(s["train_time_s"], 1),
                     "tokens/s": round(s["tokens"] / s["train_time_s"]),
                     "model FLOPs": f"{s['flops']:.3g}", "val loss at start": round(first["val_loss"], 3),
                     "val loss at end": round(final["val_loss"], 3), "data mix": s.get("mix", "")})
    table = pd.DataFrame(rows)
    files.write_text(out / "stages.csv", table.to_csv(index=False))
    trans = pd.DataFrame([{"transformation": name, "params before": human(r["params_before"]["total"]),
                           "params after": human(r["params_after"]["total"]),
                           **{f"{k} before": round(v, 3) for k, v in r["val_before"].items()},
                           **{f"{k} after": round(v, 3) for k, v in r["val_after"].items()}}
                          for name, r in transitions.items()])
    chain_end = rows[len(chain) - 1]["val loss at end"]
    scratch_end = rows[-1]["val loss at end"]
    # the from-scratch run's loss when it had spent what the whole chain spent (equal compute)
    chain_flops = sum(s["flops"] for s in chain)
    scratch_at_budget = _interpolate(curves["from scratch"], "flops", chain_flops)
    factors["scratch_val_loss_at_chain_flops"] = scratch_at_budget
    md = [
        "# minimoe pipeline report", "",
        "EfficientScale at toy scale: preparation -> Scale-Up -> Scale-Out, each with continued",
        "pretraining, against the final MoE shape trained from scratch on the same total tokens.",
        "Validation loss is cross-entropy on the held-out split of the demo corpus (nats/token).", "",
        "## Stages", "", table.to_markdown(index=False), "",
        "## Right after each transformation (before any training)", "",
        trans.to_markdown(index=False), "",
        "## Savings, computed the way AquilaMoE Table 6 computes them", "",
        f"- time savings factor: **{factors['time_savings']:.2f}x** "
        "(measured tokens/s of each stage; paper: 4.12x)",
        f"- compute savings factor, Table 6 capacity accounting (device peak x time): "
        f"**{factors['compute_savings_capacity']:.2f}x** (one device for every stage here, so it "
        "equals the time factor; paper: 3.35x with two kinds of chip)",
        f"- compute savings factor by counted model FLOPs: **{factors['compute_savings_model_flops']:.2f}x**",
        f"- final validation loss: EfficientScale {chain_end:.3f} vs from scratch {scratch_end:.3f} "
        f"({'lower' if chain_end < scratch_end else 'higher'} by {abs(chain_end - scratch_end):.3f}) "
        "after the same tokens",
        f"- at equal compute ({chain_flops:.3g} FLOPs, what the whole chain spent) the from-scratch "
        f"run was at **{scratch_at_budget:.3f}** (EfficientScale: {chain_end:.3f})", "",
        "The factors are measured on this machine at toy scale; the paper's figures are for 7B -> 16B",
        "-> 8x16B on GPU clusters (see `minimoe simulate sims/aquilamoe_table6.toml`).", "",
        "![loss vs FLOPs](loss_vs_flops.png)", "", "![loss vs tokens](loss_vs_tokens.png)", "",
    ]
    if load:
        md += ["![expert load](expert_load.png)", ""]
    if evaluation:
        md += ["## Evaluation", ""] + evaluation_section(evaluation, expected=5)
        files.write_text(out / "evaluation.csv", results_table(evaluation).to_csv())
    if specialisation:
        md += ["## What the experts specialise in, by domain", ""]
        md += specialisation_section(specialisation)
    md += ["## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    files.write_text(out / "report.md", "\n".join(md))
    summary = {"factors": factors, "stages": rows,
               "transitions": {k: {"val_before": r["val_before"], "val_after": r["val_after"]}
                               for k, r in transitions.items()},
               "evaluation": {label: {task: {"metrics": r["metrics"], "chance": r["chance"],
                                             "n": r["n"]} for task, r in results.items()}
                              for label, results in (evaluation or {}).items()},
               "specialisation": {label: {"mean_js": r["mean_js"],
                                          "js": [layer["js"] for layer in r["layers"]]}
                                  for label, r in (specialisation or {}).items()}}
    files.write_json(out / "summary.json", summary)
    return summary


def plot_curves(curves: dict[str, list[dict]], path: Path, x: str, title: str,
                marks: dict[str, float] | None = None):
    """Validation loss of several runs against `x` ("tokens" or "flops"), one line each;
    `marks` draws labelled vertical lines (the transitions between stages)."""
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in curves.items():
        style = dict(ls="--", color="gray") if label == "from scratch" else {}
        ax.plot([p[x] for p in pts], [p["val_loss"] for p in pts], marker="o", ms=3, label=label, **style)
    for label, at in (marks or {}).items():
        ax.axvline(at, color="k", lw=0.6, ls=":")
        ax.annotate(label, (at, ax.get_ylim()[1]), fontsize=8, rotation=90, va="top", ha="right")
    if x == "flops":  # log scale as in the paper's plot; symlog keeps a from-scratch run's 0
        positive = [p["flops"] for pts in curves.values() for p in pts if p["flops"] > 0]
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
        ax.set_xlim(left=0)
    ax.set_xlabel("cumulative training FLOPs" if x == "flops" else x)
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(title)
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
