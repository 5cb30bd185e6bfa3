"""`minimoe pipeline` and `minimoe experiment` (the recipes, minimoe/recipes/), one seed or many."""

from __future__ import annotations

import argparse
from pathlib import Path

from minimoe.checks import option
from minimoe.recipes import experiments, pipeline
from minimoe.recipes.config import RECIPES, get_recipe
from minimoe.recipes.sweep import savings_experiment


def _numbers(text: str, least: int) -> list[int]:  # "0,4,7"; else one line, as option()
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < least or max(values) >= 2**32 or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: must be whole numbers in [{least}, "
                                         f"{2**32 - 1}], none repeated")
    return values


def _seeds(text: str) -> list[int]:  # --seeds 3 (seeds 0, 1, 2) or --seeds 0,4,7
    return _numbers(text, 0) if "," in text else list(range(option("int[1, 1000]")(text)))


def add_pipeline(p):
    p.add_argument("--preset", default="toy", help=f"a recipe ({', '.join(RECIPES)}) or a "
                   ".toml recipe file (scaling/); toy takes about 10 minutes, tiny under 1")
    p.add_argument("--out", default="runs/pipeline", help="pipeline folder (resumed if re-run)")
    p.add_argument("--seeds", type=_seeds, help="run once per seed (N or a list) into "
                   "OUT/seed-N, and report every figure over the seeds in OUT/report")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _print_claims(summary: dict):
    for c in summary["claims"]:
        print(f"  {c['verdict']:>13s}: {c['claim']}")


def run_pipeline(args):
    recipe, progress = get_recipe(args.preset), not args.no_progress
    if args.seeds:
        summary = pipeline.run_pipeline_seeds(recipe, args.out, args.seeds, progress)
        print(f"report: {args.out}/report/report.md")
        return _print_claims(summary)
    summary = pipeline.run_pipeline(recipe, args.out, progress=progress)
    f = summary["factors"]
    bound = "" if f["iso_loss_reached"] else ">="
    print(f"report: {args.out}/report/report.md")
    print(f"at equal loss: compute savings {bound}{f['compute_savings_iso_loss']:.2f}x, time "
          f"{bound}{f['time_savings_iso_loss']:.2f}x; at equal tokens: compute "
          f"{f['compute_savings_model_flops']:.2f}x, time {f['time_savings']:.2f}x; final val loss "
          f"{summary['stages'][-2]['val loss at end']:.3f} (EfficientScale) vs "
          f"{summary['stages'][-1]['val loss at end']:.3f} (from scratch, same tokens)")


def add_experiment(p):
    p.add_argument("name", choices=["scale-up", "scale-out", "savings"],
                   help="scale-up: Table 1 (initialisations); scale-out: dense vs upcycled vs "
                   "split; savings: iso-loss savings against the scale-out budget")
    p.add_argument("--out", required=True, help="experiment folder (finished runs are kept)")
    p.add_argument("--preset", help=f"a recipe ({', '.join(RECIPES)}) or a .toml recipe file "
                   "(scaling/); default: experiment, toy for savings")
    p.add_argument("--quick", action="store_true", help="the tiny recipe: under 2 minutes")
    p.add_argument("--seeds", type=_seeds, help="run once per seed (N or a list) into "
                   "OUT/seed-N and judge the paper's claims over the seeds in OUT/report")
    p.add_argument("--dense-run", metavar="RUN", help="scale-out: start from this grown dense "
                   "run ({seed} in it is replaced by each seed)")
    p.add_argument("--budgets", type=lambda text: _numbers(text, 1), default=[20, 80, 320],
                   help="savings: scale-out steps to sweep (a list; default 20,80,320)")
    p.add_argument("--no-progress", action="store_true")


def run_experiment(args):
    default = "toy" if args.name == "savings" else "experiment"
    recipe = get_recipe("tiny" if args.quick else args.preset or default)
    progress = not args.no_progress
    if args.name == "savings":
        savings_experiment(args.out, recipe, args.budgets, args.seeds or [recipe.seed], progress)
    elif args.seeds:
        summary = experiments.run_seeds(args.name, args.out, recipe, args.seeds, progress, args.dense_run)
        print(f"{args.out}/report/report.md")
        return _print_claims(summary)
    elif args.name == "scale-up":
        experiments.scale_up_experiment(args.out, recipe, progress=progress)
    else:
        experiments.scale_out_experiment(args.out, recipe, progress=progress, dense_run=args.dense_run)
    table = Path(args.out) / f"{args.name}.md"  # savings.md, scale-up.md or scale-out.md
    print(table)
    print(table.read_text(encoding="utf-8").split("\n![")[0])
