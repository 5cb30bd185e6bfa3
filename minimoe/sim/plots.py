"""PNG plots of a scenario (`minimoe simulate --plot-dir`): where the days and GPU-days go, phase by
phase, against the from-scratch baseline; and the savings factors of a sensitivity sweep."""

from __future__ import annotations

from pathlib import Path

from minimoe.files import pyplot, save_figure


def plot_scenario(result, out_dir: Path) -> list[Path]:
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, unit in ((axes[0], "days", "days"), (axes[1], "gpu_days", "GPU-days")):
        bottom = 0.0
        for p in result.phases:  # the EfficientScale bar, one segment per phase
            value = getattr(p, metric)
            ax.bar("EfficientScale", value, bottom=bottom, label=p.name)
            bottom += value
        ax.bar(result.baseline.name, getattr(result.baseline, metric), color="grey",
               label=result.baseline.name)
        ax.set_ylabel(unit)
        ax.set_title(f"{unit} per phase")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.title}\nTSF {result.tsf:.2f}, CPSF {result.cpsf:.2f}", fontsize=9)
    paths.append(save_figure(fig, out_dir / "phases.png"))
    if result.sweep:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for mfu in sorted({r["mfu"] for r in result.sweep}):
            rows = [r for r in result.sweep if r["mfu"] == mfu]
            x = [r["tokens (B)"] for r in rows]
            axes[0].plot(x, [r["tsf"] for r in rows], marker="o", label=f"MFU {mfu:.1%}")
            axes[1].plot(x, [r["cpsf"] for r in rows], marker="o", label=f"MFU {mfu:.1%}")
        for ax, name in zip(axes, ("time savings factor", "compute savings factor")):
            ax.set_xlabel(f"{result.sweep[0]['phase']} tokens (B)")
            ax.set_ylabel(name)
            ax.axhline(1.0, color="grey", lw=0.5)
        axes[0].legend(title=f"MFU of {result.sweep[0]['mfu_phases']}", fontsize=8)
        paths.append(save_figure(fig, out_dir / "sweep.png"))
    return paths


def plot_validation(v, out_dir: Path) -> list[Path]:
    """Predicted against measured MFU per run, with its interval (leaving each source out where
    the validation has it); the AquilaMoE phases' step time by term."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 5))
    rows = v.cv_rows or v.rows
    rows = rows + [r for r in v.rows if r["set"] != "published" and rows is v.cv_rows]
    markers = {("published", "dense"): "o", ("published", "moe"): "s",
               ("aquilamoe", "dense"): "^", ("aquilamoe", "moe"): "v"}
    for key, marker in markers.items():
        chosen = [r for r in rows if (r["set"], r["kind"]) == key]
        if chosen:
            y = [r["predicted MFU"] for r in chosen]
            scale = [r["predicted MFU"] / r["predicted tok/s/GPU"] for r in chosen]
            err = [[yi - r["low"] * k for yi, r, k in zip(y, chosen, scale)],
                   [r["high"] * k - yi for yi, r, k in zip(y, chosen, scale)]]
            ax.errorbar([r["measured MFU"] for r in chosen], y, yerr=err, fmt=marker, ms=5,
                        capsize=2, label=f"{key[0]} {key[1]}")
    top = max(max(r["measured MFU"], r["predicted MFU"]) for r in rows) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.fill_between([0, top], [0, 0.9 * top], [0, 1.1 * top], color="grey", alpha=0.15,
                    label="±10%")
    ax.set_xlabel("measured MFU (causal model FLOPs)")
    ax.set_ylabel("predicted MFU" + (" (each source left out)" if v.cv_rows else ""))
    ax.legend(fontsize=8)
    paths = [save_figure(fig, out_dir / "validation.png")]
    breakdown = {name: {k: result.time[k] for k in result.time if k != "step_time"}
                 | {"tokens_per_step": result.tokens_per_step}
                 for name, (run, result, _) in v.predicted.items() if run.set == "aquilamoe"}
    if breakdown:
        fig, ax = plt.subplots(figsize=(8.5, 4))
        names = list(breakdown)
        bottom = [0.0] * len(names)
        for part in [k for k in next(iter(breakdown.values())) if k != "tokens_per_step"]:
            # seconds per million tokens, so phases of different batch sizes compare
            values = [breakdown[n][part] / breakdown[n]["tokens_per_step"] * 1e6 for n in names]
            ax.bar(names, values, bottom=bottom, label=part)
            bottom = [a + b for a, b in zip(bottom, values)]
        by_run = {r["run"]: r for r in v.rows}
        measured = [1e6 / (by_run[n]["measured tok/s/GPU"] * by_run[n]["GPUs"]) for n in names]
        ax.scatter(names, measured, marker="_", s=900, color="black", zorder=3,
                   label="measured (Table 6)")
        ax.set_ylabel("seconds per million tokens")
        ax.set_title("AquilaMoE phases: where the time goes (predicted)")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left", markerscale=0.3)
        paths.append(save_figure(fig, out_dir / "aquilamoe_breakdown.png"))
    return paths
