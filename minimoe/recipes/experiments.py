"""The paper's validation experiments at toy scale (`minimoe experiment`): AquilaMoE Table 1 and
the scale-out comparison, each a table, plots and summary.json; run_seeds repeats one over seeds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch

from minimoe import checkpoint as ckpt
from minimoe import files
from minimoe.config import get_preset
from minimoe.evaluate import evaluate
from minimoe.flops import flops_per_token
from minimoe.grow import scale_up
from minimoe.model import build_model
from minimoe.recipes.config import RECIPES, RecipeConfig
from minimoe.recipes.findings import over_seeds, write_seeds_report
from minimoe.recipes.report import evaluation_section, plot_curves, plot_expert_loads, val_curve
from minimoe.recipes.stages import (continue_pretraining, data_spec, evaluate_run,
                                    load_run_data, pretrain)
from minimoe.train import read_log
from minimoe.upcycle import split, upcycle


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


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _val_points(run_dir: Path, flops0: float, per_token: float) -> list[dict]:
    """A run's validation points, FLOPs counted from flops0 (the report's own curve rule)."""
    return val_curve({"log": read_log(run_dir), "flops_per_token": per_token}, 0.0, flops0)


def _evaluate(runs: dict[str, str], ec: RecipeConfig, progress: bool) -> dict[str, dict]:
    """The evaluation tasks on each finished run (kept in its eval.json for re-runs)."""
    return {name: evaluate_run(run, limit=ec.eval_examples, ppl_chars=ec.eval_chars, cache=True,
                               progress=progress) for name, run in runs.items()}


def _finish_run(init_dir: Path, run_dir: Path, model, spec: dict, ec: RecipeConfig, meta: dict,
                progress: bool):
    """Save an initial model (once), then continue pretraining it for ec.steps."""
    if not (init_dir / "model.safetensors").exists():
        ckpt.save_model(init_dir, model, {"data": spec, **meta})
    continue_pretraining(init_dir, run_dir, ec.train_config(ec.steps, ec.cpt_lr),
                         stage=meta.get("stage", "continue"), progress=progress)


def _small_model(out: Path, ec: RecipeConfig, progress: bool):
    """The small model pretrained into out/small: (data spec, data, model, the large shape)."""
    spec = data_spec(None, ec.vocab_size)
    data, tok = load_run_data(spec)
    pretrain(get_preset(ec.small), out / "small", ec.train_config(ec.prep_steps, ec.lr), spec,
             progress=progress)
    small, _ = ckpt.load_model(out / "small")
    return spec, data, small, get_preset(ec.large).replace(vocab_size=tok.vocab_size)


def scale_up_experiment(out, ec: RecipeConfig = RECIPES["experiment"], progress: bool = True) -> dict:
    """AquilaMoE Table 1 at toy scale. Returns the summary written to out/summary.json."""
    out = Path(out)
    small_run = out / "small"
    spec, data, small, large_cfg = _small_model(out, ec, progress)
    tc = ec.train_config(1, ec.lr)
    small_flops = flops_per_token(small.cfg, ec.seq_len).model * ckpt.read_json(
        ckpt.latest_checkpoint(small_run) / "state.json")["tokens"]
    large_per_token = flops_per_token(large_cfg, ec.seq_len).model

    rows, curves, runs = [], {}, {"Original": str(small_run)}
    original = evaluate(small, data, tc)["val_loss"]
    rows.append({"method": "Original", "width only": original, "at init": None, "final": None})
    for name, options in SCALE_UP_VARIANTS.items():
        slug = _slug(name)
        if options is None:  # from scratch: a fresh large model, no pretraining FLOPs to count
            torch.manual_seed(ec.seed)
            model, width_only, flops0 = build_model(large_cfg), None, 0.0
        else:
            model = scale_up(small, large_cfg, seed=ec.seed, **options)
            wide = scale_up(small, large_cfg.replace(n_layers=small.cfg.n_layers), seed=ec.seed, **options)
            width_only, flops0 = evaluate(wide, data, tc)["val_loss"], small_flops
        at_init = evaluate(model, data, tc)["val_loss"]
        _finish_run(out / f"init-{slug}", out / f"run-{slug}", model, spec, ec,
                    {"stage": "scale-up", "variant": name, "options": options}, progress)
        curves[name] = _val_points(out / f"run-{slug}", flops0, large_per_token)
        runs[name] = str(out / f"run-{slug}")
        rows.append({"method": name, "width only": width_only, "at init": at_init,
                     "final": curves[name][-1]["val_loss"]})
    for row in rows:
        paper = PAPER_TABLE1.get(row["method"], (None, None))
        row["paper width only"], row["paper at init"] = paper
    settings = dataclasses.asdict(ec)
    shapes = (f"M({small.cfg.n_layers}, {small.cfg.d_model})", f"M({small.cfg.n_layers}, {large_cfg.d_model})",
              f"M({large_cfg.n_layers}, {large_cfg.d_model})")
    return _write_results(out, "scale-up", rows, curves, settings, runs, shapes,
                          evaluation=_evaluate(runs, ec, progress))


def scale_out_experiment(out, ec: RecipeConfig = RECIPES["experiment"], progress: bool = True,
                         dense_run=None) -> dict:
    """Dense vs upcycled vs LLaMA-MoE splits vs MoE from scratch, from one grown dense model.

    dense_run: a finished run of the grown dense model (e.g. a pipeline's 3-scale-up); by default
    the small model is pretrained, grown with AKI-Pro and trained for ec.steps here first.
    """
    out = Path(out)
    if dense_run is None:
        spec, _, small, large_cfg = _small_model(out, ec, progress)
        _finish_run(out / "grown", out / "dense", scale_up(small, large_cfg, method="aki-pro", seed=ec.seed),
                    spec, ec, {"stage": "scale-up"}, progress)
        dense_run = out / "dense"
    dense, meta = ckpt.load_model(dense_run)
    spec = meta["data"]
    data, _ = load_run_data(spec)
    tc = ec.train_config(1, ec.lr)
    calib = [data.train_batch(10_000 + i, ec.batch_size, ec.seq_len, seed=ec.seed) for i in range(8)]
    E, k = ec.n_experts, ec.top_k
    variants = {
        "dense (continued)": lambda: dense,
        "upcycled": lambda: upcycle(dense, n_experts=E, top_k=k, seed=ec.seed),
        "split-random": lambda: split(dense, E, k, method="random", seed=ec.seed),
        "split-cluster": lambda: split(dense, E, k, method="cluster", seed=ec.seed),
        "split-importance": lambda: split(dense, E, k, method="importance", calib=calib, seed=ec.seed),
        "MoE from scratch": None,
    }
    rows, curves, loads, runs = [], {}, {}, {}
    for name, make in variants.items():
        slug = _slug(name)
        if make is None:  # the upcycled shape, randomly initialised, trained for the same tokens
            moe_cfg = ckpt.read_config(out / "init-upcycled")
            pretrain(moe_cfg, out / f"run-{slug}", ec.train_config(ec.steps, ec.lr), spec, progress=progress)
            at_init = next(p for p in _val_points(out / f"run-{slug}", 0, 0))["val_loss"]
        else:
            model = make()
            at_init = evaluate(model, data, tc)["val_loss"]
            _finish_run(out / f"init-{slug}", out / f"run-{slug}", model, spec, ec,
                        {"stage": "scale-out", "variant": name}, progress)
        cfg = ckpt.read_config(out / f"run-{slug}")
        runs[name] = str(out / f"run-{slug}")
        curves[name] = _val_points(out / f"run-{slug}", 0.0, flops_per_token(cfg, ec.seq_len).model)
        load = next((r["load"] for r in reversed(read_log(out / f"run-{slug}")) if r.get("load")), None)
        if load:
            loads[name] = load
        counts = cfg.param_counts()
        rows.append({"method": name, "params (total)": counts["total"], "params (active)": counts["active"],
                     "at init": at_init, "final": curves[name][-1]["val_loss"]})
    return _write_results(out, "scale-out", rows, curves, dataclasses.asdict(ec), runs, None, loads,
                          _evaluate(runs, ec, progress))


def _write_results(out: Path, kind: str, rows, curves, settings, runs, shapes=None, loads=None,
                   evaluation=None) -> dict:
    """The table (CSV, Markdown), the plots and summary.json: rows, curves, settings, the run
    folder of every variant (`runs`), for MoE runs the last expert load each logged, and the
    evaluation tasks of every run."""
    table = pd.DataFrame(rows)
    if shapes:  # name the loss columns by model shape, as the paper's Table 1 does
        small, wide, large = shapes
        table = table.rename(columns={"width only": f"{wide} (width only)", "at init": f"{large} at init",
                                      "final": f"{large} after training",
                                      "paper width only": "paper M(24, 4096)", "paper at init": "paper M(32, 4096)"})
    files.write_text(out / f"{kind}.csv", table.to_csv(index=False))
    shown = table.astype(object).where(table.notna(), None)  # empty cells print as "-"
    md = [f"# {kind} experiment", "", shown.to_markdown(index=False, floatfmt=".3f", missingval="-"), ""]
    plot_curves(curves, out / "loss_vs_tokens.png", "tokens", f"{kind}: validation loss")
    plot_curves(curves, out / "loss_vs_flops.png", "flops", f"{kind}: validation loss vs cumulative FLOPs")
    md += ["![loss vs tokens](loss_vs_tokens.png)", "", "![loss vs FLOPs](loss_vs_flops.png)", ""]
    if loads:
        plot_expert_loads(loads, out / "expert_load.png")
        md += ["![expert load](expert_load.png)", ""]
    if evaluation:
        md += ["## Tasks (after training)", ""] + evaluation_section(evaluation)
    md += ["Settings:", "", "```json", json.dumps(settings, indent=2), "```", ""]
    files.write_text(out / f"{kind}.md", "\n".join(md))
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
