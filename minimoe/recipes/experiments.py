"""The paper's validation experiments at toy scale (`minimoe experiment`): AquilaMoE Table 1 and
the scale-out comparison, each a table, plots and summary.json; run_seeds repeats one over seeds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from minimoe import checkpoint as ckpt
from minimoe import files
from minimoe.config import get_preset
from minimoe.evaluate import evaluate
from minimoe.flops import flops_per_token
from minimoe.grow import scale_up
from minimoe.recipes.config import RECIPES, RecipeConfig
from minimoe.recipes.findings import over_seeds, write_seeds_report
from minimoe.recipes.report import val_curve, write_report
from minimoe.recipes.stages import (continue_pretraining, data_spec, evaluate_run, grow_run,
                                    load_run_data, pretrain, run_data_spec, scale_out_run)
from minimoe.train import read_log


# AquilaMoE Table 1 as printed (1.3B M(24, 2048) -> 7B M(32, 4096)); "-" cells are None.
PAPER_TABLE1 = {
    "Original": (2.97, None),
    "Random": (None, 12.22),
    "FPI (Stacking)": (2.97, 4.30),
    "FPI (Interpolation)": (2.97, 3.31),
    "AKI (Stacking)": (None, 9.56),
    "AKI-Pro (Interpolation)": (None, 7.81),
}

# name -> scale_up options (None: random initialisation, i.e. training from scratch)
SCALE_UP_VARIANTS = {
    "Random": None,
    "FPI (Stacking)": dict(method="fpi", depth="stack"),
    "FPI (Interpolation)": dict(method="fpi", depth="interpolate"),
    "AKI (Stacking)": dict(method="aki", depth="stack"),
    "AKI-Pro (Interpolation)": dict(method="aki-pro", depth="interpolate"),
    "FPI (Identity depth)": dict(method="fpi", depth="identity"),  # beyond the paper: LLaMA-Pro
}


# name -> scale_out_run's method; "dense (continued)" and "MoE from scratch" transform nothing
SCALE_OUT_VARIANTS = {"dense (continued)": None, "upcycled": "upcycle",
                      "split-random": "split-random", "split-cluster": "split-cluster",
                      "split-importance": "split-importance", "MoE from scratch": None}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _val_points(run_dir: Path, flops0: float, per_token: float) -> list[dict]:
    """A run's validation points, FLOPs counted from flops0 (the report's own curve rule)."""
    return val_curve({"log": read_log(run_dir), "flops_per_token": per_token}, 0.0, flops0)


def _evaluate(runs: dict[str, str], ec: RecipeConfig, progress: bool) -> dict[str, dict]:
    """The evaluation tasks on each finished run (kept in its eval.json for re-runs)."""
    return {name: evaluate_run(run, limit=ec.eval_examples, ppl_chars=ec.eval_chars, cache=True,
                               progress=progress) for name, run in runs.items()}


def _pretrain_small(out: Path, ec: RecipeConfig, progress: bool) -> dict:
    """The small model pretrained into out/small; returns its data spec."""
    spec = data_spec(None, ec.vocab_size)
    pretrain(get_preset(ec.small), out / "small", ec.train_config(ec.prep_steps, ec.lr), spec,
             progress=progress)
    return spec


def _continue(init: Path, run: Path, ec: RecipeConfig, stage: str, progress: bool):
    """Every variant trains the same ec.steps from its initial model (the run's first
    validation point is that model's loss at init)."""
    continue_pretraining(init, run, ec.train_config(ec.steps, ec.cpt_lr), stage=stage,
                         progress=progress)


def scale_up_experiment(out, ec: RecipeConfig = RECIPES["experiment"], progress: bool = True) -> dict:
    """AquilaMoE Table 1 at toy scale. Returns the summary written to out/summary.json."""
    out = Path(out)
    small_run = out / "small"
    spec = _pretrain_small(out, ec, progress)
    small, _ = ckpt.load_model(small_run)
    data, tok = load_run_data(spec)
    large_cfg = get_preset(ec.large).replace(vocab_size=tok.vocab_size)
    tc = ec.train_config(1, ec.lr)
    small_flops = flops_per_token(small.cfg, ec.seq_len).model * ckpt.read_json(
        ckpt.latest_checkpoint(small_run) / "state.json")["tokens"]
    large_per_token = flops_per_token(large_cfg, ec.seq_len).model

    rows = [{"method": "Original", "width only": evaluate(small, data, tc)["val_loss"],
             "at init": None, "final": None}]
    curves, runs = {}, {"Original": str(small_run)}
    for name, options in SCALE_UP_VARIANTS.items():
        init, run = out / f"init-{_slug(name)}", out / f"run-{_slug(name)}"
        if options is None:  # from scratch: a fresh large model, no pretraining FLOPs to count
            pretrain(large_cfg, run, ec.train_config(ec.steps, ec.cpt_lr), spec, progress=progress)
            width_only, flops0 = None, 0.0
        else:  # the width-only model is measured, not trained
            wide = scale_up(small, large_cfg.replace(n_layers=small.cfg.n_layers), seed=ec.seed,
                            **options)
            width_only, flops0 = evaluate(wide, data, tc)["val_loss"], small_flops
            grow_run(small_run, ec.large, init, seed=ec.seed, tc=tc, **options)
            _continue(init, run, ec, "scale-up", progress)
        curves[name] = _val_points(run, flops0, large_per_token)
        runs[name] = str(run)
        rows.append({"method": name, "width only": width_only, "at init": curves[name][0]["val_loss"],
                     "final": curves[name][-1]["val_loss"]})
    for row in rows:
        row["paper width only"], row["paper at init"] = PAPER_TABLE1.get(row["method"], (None, None))
    shapes = (f"M({small.cfg.n_layers}, {small.cfg.d_model})", f"M({small.cfg.n_layers}, {large_cfg.d_model})",
              f"M({large_cfg.n_layers}, {large_cfg.d_model})")
    return _write_results(out, "scale-up", rows, curves, dataclasses.asdict(ec), runs, shapes,
                          evaluation=_evaluate(runs, ec, progress))


def scale_out_experiment(out, ec: RecipeConfig = RECIPES["experiment"], progress: bool = True,
                         dense_run=None) -> dict:
    """Dense vs upcycled vs LLaMA-MoE splits vs MoE from scratch, from one grown dense model.

    dense_run: a finished run of the grown dense model (e.g. a pipeline's 3-scale-up); by default
    the small model is pretrained, grown with AKI-Pro and trained for ec.steps here first.
    """
    out = Path(out)
    tc = ec.train_config(1, ec.lr)
    if dense_run is None:
        _pretrain_small(out, ec, progress)
        grow_run(out / "small", ec.large, out / "grown", seed=ec.seed, tc=tc)
        _continue(out / "grown", out / "dense", ec, "scale-up", progress)
        dense_run = out / "dense"
    spec = run_data_spec(dense_run)
    data, _ = load_run_data(spec)
    # the importance split calibrates on training batches far past the ones the runs train on
    calib = [data.train_batch(10_000 + i, ec.batch_size, ec.seq_len, seed=ec.seed) for i in range(8)]
    rows, curves, loads, runs = [], {}, {}, {}
    for name, method in SCALE_OUT_VARIANTS.items():
        init, run = out / f"init-{_slug(name)}", out / f"run-{_slug(name)}"
        if name == "dense (continued)":
            _continue(Path(dense_run), run, ec, "scale-out", progress)
        elif name == "MoE from scratch":  # the upcycled shape, randomly initialised
            pretrain(ckpt.read_config(out / "init-upcycled"), run, ec.train_config(ec.steps, ec.lr),
                     spec, progress=progress)
        else:
            scale_out_run(dense_run, init, method, ec.n_experts, ec.top_k, seed=ec.seed, tc=tc,
                          calib=calib if method == "split-importance" else None)
            _continue(init, run, ec, "scale-out", progress)
        cfg = ckpt.read_config(run)
        runs[name] = str(run)
        curves[name] = _val_points(run, 0.0, flops_per_token(cfg, ec.seq_len).model)
        load = next((r["load"] for r in reversed(read_log(run)) if r.get("load")), None)
        if load:
            loads[name] = load
        counts = cfg.param_counts()
        rows.append({"method": name, "params (total)": counts["total"], "params (active)": counts["active"],
                     "at init": curves[name][0]["val_loss"], "final": curves[name][-1]["val_loss"]})
    return _write_results(out, "scale-out", rows, curves, dataclasses.asdict(ec), runs, None, loads,
                          _evaluate(runs, ec, progress))


def _write_results(out: Path, kind: str, rows, curves, settings, runs, shapes=None, loads=None,
                   evaluation=None) -> dict:
    """The table (CSV, and Markdown through report.write_report) and summary.json: rows, curves,
    settings, the run folder of every variant (`runs`), for MoE runs the last expert load each
    logged, and the evaluation tasks of every run."""
    table = pd.DataFrame(rows)
    if shapes:  # name the loss columns by model shape, as the paper's Table 1 does
        small, wide, large = shapes
        table = table.rename(columns={"width only": f"{wide} (width only)", "at init": f"{large} at init",
                                      "final": f"{large} after training",
                                      "paper width only": "paper M(24, 4096)", "paper at init": "paper M(32, 4096)"})
    files.write_text(out / f"{kind}.csv", table.to_csv(index=False))
    shown = table.astype(object).where(table.notna(), None)  # empty cells print as "-"
    write_report(out, kind, [f"# {kind} experiment", "", shown.to_markdown(index=False, floatfmt=".3f",
                                                                            missingval="-"), ""],
                 curves, f"{kind}: validation loss", settings, evaluation, loads)
    figures = {f"{r['method']}: {k}": v for r in rows for k, v in r.items()
               if k in ("width only", "at init", "final") and v is not None}
    summary = {"rows": rows, "curves": curves, "settings": settings, "runs": runs, "loads": loads or {},
               "figures": figures,
               "evaluation": {name: {task: r["metrics"] for task, r in results.items()}
                              for name, results in (evaluation or {}).items()}}
    files.write_json(out / "summary.json", summary)
    return summary


def run_seeds(kind: str, out, ec: RecipeConfig, seeds: list[int], progress: bool = True,
              dense_run: str | None = None) -> dict:
    """One experiment per seed (out/seed-N), then out/report over the seeds (recipes/findings.py).
    dense_run (scale-out) may name the seed, e.g. runs/pipeline/seed-{seed}/3-scale-up."""
    def one(recipe, folder):
        if kind == "scale-up":
            return scale_up_experiment(folder, recipe, progress)
        dense = dense_run.format(seed=recipe.seed) if dense_run else None
        return scale_out_experiment(folder, recipe, progress, dense)

    per_seed = over_seeds(one, ec, out, seeds)
    return write_seeds_report(Path(out) / "report", kind, per_seed, dataclasses.asdict(ec))
