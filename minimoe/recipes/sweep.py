"""`minimoe experiment savings`: iso-loss savings against the scale-out stage's token budget at
toy scale (seeds as error bars), in one figure with the simulator's full-size chain (AquilaMoE
Table 6's accounting with its scale-out budget swept) and the paper's 4.12x and 3.35x."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from minimoe import dist
from minimoe import files
from minimoe.recipes.config import RecipeConfig
from minimoe.recipes.pipeline import check_folder, measure_speeds, stage_record, train_stages
from minimoe.recipes.report import measured_savings
from minimoe.recipes.findings import show, spread
from minimoe.sim.scenario import sweep
from minimoe.sim.scenario_file import load_scenario

TABLE6 = Path(__file__).resolve().parents[2] / "sims" / "aquilamoe_table6.toml"
FACTORS = {"compute_savings_iso_loss": "compute, iso-loss", "time_savings_iso_loss": "time, iso-loss",
           "compute_savings_model_flops": "compute, equal tokens", "time_savings": "time, equal tokens"}


def savings_experiment(out, pc: RecipeConfig, budgets: list[int], seeds: list[int],
                       progress: bool = True) -> dict:
    """For each seed the stages before scale-out once (out/seed-N), then for each budget B
    (scale-out steps) 5-scale-out-B and 6-scratch-B, the baseline on that chain's tokens."""
    out, rows = Path(out), []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        settings = {**dataclasses.asdict(pc), "seed": seed, "scale_out_steps": "swept"}
        dist.main_only(lambda: check_folder(folder, settings))
        for budget in sorted(set(budgets)):
            recipe = dataclasses.replace(pc, seed=seed, scale_out_steps=budget)
            runs = train_stages(recipe, folder, progress, tag=f"-{budget}")["runs"]
            rows.append({"seed": seed, "budget": budget, "runs": runs, "recipe": recipe})
    return dist.main_only(lambda: _report(out, pc, rows))


def _report(out: Path, pc: RecipeConfig, rows: list[dict]) -> dict:
    # step speeds depend on the model's shape, not its seed or budget: measured once
    speeds = measure_speeds(pc, rows[-1]["runs"], out / "speed.json")
    for row in rows:
        stages = [stage_record(name, run, pc.seq_len) for name, run in row.pop("runs").items()]
        recipe = row.pop("recipe")
        row.update(measured_savings(stages[:-1], stages[-1], speeds["tokens_per_s"]))
        row["share"] = recipe.scale_out_steps / recipe.total_steps  # of the chain's tokens
        row["chain loss"] = stages[-2]["log"][-1]["val_loss"]
        row["scratch loss"] = stages[-1]["log"][-1]["val_loss"]
    frame = pd.DataFrame(rows)
    files.write_text(out / "savings.csv", frame.to_csv(index=False))
    shown = (*FACTORS, "chain loss", "scratch loss")
    points = [{"budget": int(budget), "share": float(group["share"].iloc[0]),
               "reached": int(group["iso_loss_reached"].sum()),
               **{key: spread(group[key].tolist()) for key in shown}}
              for budget, group in frame.groupby("budget")]
    full = load_scenario(TABLE6)
    before = sum(p.tokens for p in full.phases[:-1])
    curve = [{**r, "share": r["tokens (B)"] * 1e9 / (before + r["tokens (B)"] * 1e9)}
             for r in sweep(full, full.phases[-1].name,
                            [before * f / (1 - f) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)],
                            [1.0], [])]
    paper = {"share": full.phases[-1].tokens / (before + full.phases[-1].tokens),
             "tsf": full.tsf, "cpsf": full.cpsf}
    _plot(points, curve, paper, out / "savings.png")
    md = ["# Savings against the scale-out budget", "",
          f"Seeds {', '.join(str(s) for s in frame['seed'].unique())}; every figure mean +- sd, then "
          "each seed's value. Iso-loss: the MoE from scratch first reaching the chain's final loss; "
          "where it never did (`reached` below the seeds) the figure is a lower bound.", "",
          "| scale-out steps | share of chain tokens | reached | " + " | ".join(FACTORS.values())
          + " | chain loss | scratch loss |", "|--:" * (5 + len(FACTORS)) + "|"]
    md += [f"| {p['budget']} | {p['share']:.1%} | {p['reached']}/{p['time_savings']['n']} | "
           + " | ".join(show(p[k], 2) for k in shown) + " |" for p in points]
    md += ["", f"Full size ({TABLE6.name}, equal tokens as Table 6 defines them): the paper's "
           f"split puts {paper['share']:.1%} of the chain's tokens in scale-out, TSF {paper['tsf']:.2f}, "
           f"CPSF {paper['cpsf']:.2f}.", "", "![savings against budget](savings.png)", ""]
    files.write_text(out / "savings.md", "\n".join(md))
    summary = {"points": points, "simulator": curve, "paper": paper, "speeds": speeds,
               "rows": frame.to_dict("records")}
    files.write_json(out / "summary.json", summary)
    return summary


def _plot(points: list[dict], curve: list[dict], paper: dict, path: Path):
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = [p["share"] for p in points]
    for key, style in (("compute_savings_iso_loss", dict(color="C0", marker="o")),
                       ("time_savings_iso_loss", dict(color="C1", marker="o")),
                       ("compute_savings_model_flops", dict(color="C0", marker="s", ls=":", mfc="none"))):
        ax.errorbar(x, [p[key]["mean"] for p in points], yerr=[p[key]["sd"] for p in points],
                    capsize=3, label=f"toy: {FACTORS[key]} (mean +- sd over seeds)", **style)
    for p in points:  # a lower bound where the baseline never reached the chain's loss
        if p["reached"] < p["compute_savings_iso_loss"]["n"]:
            ax.annotate(">=", (p["share"], p["compute_savings_iso_loss"]["mean"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    sx = [r["share"] for r in curve]
    ax.plot(sx, [r["tsf"] for r in curve], color="C3", label="full size, simulator: time (TSF)")
    ax.plot(sx, [r["cpsf"] for r in curve], color="C2", label="full size, simulator: compute (CPSF)")
    ax.plot([paper["share"]] * 2, [paper["tsf"], paper["cpsf"]], "k*", ms=10,
            label=f"paper: {paper['tsf']:.2f}x time, {paper['cpsf']:.2f}x compute")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set(xlabel="scale-out's share of the chain's tokens", ylabel="savings factor (x)",
           title="EfficientScale savings against the scale-out budget")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    files.save_figure(fig, path)
