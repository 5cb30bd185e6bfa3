"""The cost side of `minimoe`: info, flops, simulate, plan and validate (minimoe/sim/)."""

from __future__ import annotations

import sys
from pathlib import Path

from minimoe.checks import option
from minimoe.config import PRESETS, get_preset
from minimoe.flops import ATTENTION, RECOMPUTE, flops_report
from minimoe.sim.hardware import CATALOGUE, get_device
from minimoe.sim.options import parse_assignments
from minimoe.sim.plots import plot_validation
from minimoe.sim.scenario import dumps
from minimoe.sim.scenario_file import load_scenario
from minimoe.sim.search import plan, plan_report
from minimoe.sim.report import aquilamoe_table, validation_json, validation_text
from minimoe.sim.validate import validate
from minimoe.tables import info_table

SEQ = option("int[1, 16777216]")
JSON = "print JSON instead of a table"


def add_info(p):
    p.add_argument("--preset", required=True, help=", ".join(PRESETS))
    p.add_argument("--json", action="store_true", help=JSON)


def run_info(args):
    print(info_table(args.preset, as_json=args.json))


def add_flops(p):
    p.add_argument("--preset", required=True)
    p.add_argument("--seq", type=SEQ, help="sequence length (default: the preset's)")
    p.add_argument("--attention", choices=ATTENTION, default="causal",
                   help="count the attention core halved (causal) or as the full square")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none")
    p.add_argument("--json", action="store_true", help=JSON)
    p.add_argument("--check", action="store_true", help="cross-check the forward count with "
                   "fvcore on a real forward (a shallow copy for big presets; --seq default 64)")


def run_flops(args):
    cfg = get_preset(args.preset)
    if args.check:
        from minimoe.bench.flops_check import check_report  # torch and fvcore: only here
        print(check_report(cfg, args.preset, args.seq or min(64, cfg.max_seq_len)))
    else:
        print(flops_report(cfg, args.preset, args.seq, args.attention, args.recompute, as_json=args.json))


def add_simulate(p):
    p.add_argument("scenario", help="a scenario file, e.g. sims/aquilamoe_table6.toml")
    p.add_argument("--json", action="store_true", help=JSON)
    p.add_argument("--plot-dir", help="also write PNG plots into this folder")


def run_simulate(args):
    result = load_scenario(args.scenario)
    print(dumps(result) if args.json else result.text())
    for path in result.plot(args.plot_dir) if args.plot_dir else []:
        print(f"wrote {path}", file=sys.stderr)


def add_plan(p):
    p.add_argument("--preset", required=True)
    p.add_argument("--gpus", type=option("int[1, 1048576]"), required=True, help="GPUs available")
    p.add_argument("--gpu", default="h100", help=f"catalogue device: {', '.join(CATALOGUE)}")
    p.add_argument("--batch-tokens", type=option("int[1, 1099511627776]"), default=4 * 2**20,
                   help="tokens per optimizer step (default 4 x 2^20)")
    p.add_argument("--seq", type=SEQ, help="sequence length (default: the preset's)")
    p.add_argument("--tokens-b", type=option(">0"),
                   help="training tokens in billions: also print days, GPU-days, energy and cost")
    p.add_argument("--fixed-gpus", action="store_true", help="use exactly --gpus GPUs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a cost-model option, as in a scenario's [options] (repeatable), "
                        "e.g. --set gemm_efficiency=0.4 --set imbalance=1.3")
    p.add_argument("--json", action="store_true", help=JSON)


def run_plan(args):
    search = plan(get_preset(args.preset), get_device(args.gpu), args.gpus, args.batch_tokens,
                  args.seq, options=parse_assignments(args.set), fixed_gpus=args.fixed_gpus)
    tokens = None if args.tokens_b is None else args.tokens_b * 1e9
    print(plan_report(search, args.preset, tokens, as_json=args.json))


def add_validate(p):
    p.add_argument("folder", nargs="?", default="sims/validation",
                   help="validation files (default: sims/validation)")
    p.add_argument("--json", action="store_true", help=JSON)
    p.add_argument("--plot-dir", help="also write validation.png and aquilamoe_breakdown.png here")
    p.add_argument("--cv", action="store_true", help="also predict each source from the constants "
                   "fitted on the others (leave one source out)")


def run_validate(args):
    result = validate(args.folder, cv=args.cv)
    aquila = aquilamoe_table(result.predicted)
    print(validation_json(result, aquila) if args.json else validation_text(result, aquila))
    for path in plot_validation(result, Path(args.plot_dir)) if args.plot_dir else []:
        print(f"wrote {path}", file=sys.stderr)
