"""The `minimoe` command: argument parsing, one-line errors and exit codes.

Each subcommand is a pair in `COMMANDS`: a function that declares its arguments and one that
calls the package. Defaults come from the dataclasses they fill (TrainConfig, RecipeConfig), so
they are written once. A ValueError (bad config, bad file, bad option) becomes one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from minimoe import dist
from minimoe.cli.full_size import (
    add_dry_run,
    add_launch_args,
    add_tokenize,
    run_dry_run,
    run_launch_args,
    run_tokenize,
)
from minimoe.cli.train_options import add_train_options, train_config
from minimoe.cli.evaluation import add_eval, add_generate, run_eval, run_generate
from minimoe.config import PRESETS, get_preset
from minimoe.flops import ATTENTION, RECOMPUTE, check_report, flops_report
from minimoe.grow import DEPTHS, KV_OPTIONS, MAPPINGS, METHODS
from minimoe.cli.recipes import add_experiment, add_pipeline, run_experiment, run_pipeline
from minimoe.recipes.config import RECIPES
from minimoe.recipes.stages import (
    continue_pretraining,
    data_spec,
    grow_run,
    pretrain,
    scale_out_run,
    specialisation_run,
)
from minimoe.sim.hardware import CATALOGUE, get_device
from minimoe.sim.scenario import dumps
from minimoe.sim.scenario_file import load_scenario
from minimoe.sim.options import parse_assignments
from minimoe.sim.plots import plot_validation
from minimoe.sim.search import plan, plan_report
from minimoe.sim.validate import validate, validation_json, validation_text
from minimoe.tables import info_table
from minimoe.upcycle import LAYER_CHOICES, SCALE_OUT_METHODS

DESCRIPTION = """\
Grow language models the EfficientScale way (AquilaMoE, arXiv 2408.06567): pretrain a small
dense model, scale it up (FPI, AKI, AKI-Pro), scale it out into a Mixture of Experts (sparse
upcycling, LLaMA-MoE splits), and account for the savings; estimate full-size runs with the
FLOPs and cost simulator. Start with `minimoe pipeline`."""

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        print(f"minimoe: error: {message}", file=sys.stderr)
        sys.exit(2)


def _add_info(p):
    p.add_argument("--preset", required=True, help=", ".join(PRESETS))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_info(args):
    print(info_table(args.preset, as_json=args.json))


def _add_pretrain(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a fresh model of this preset (see `minimoe info`)")
    src.add_argument("--init", metavar="RUN", help="continue pretraining the model of a run")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds this run)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl files or folders, or "
                   "a shard folder of `minimoe tokenize` (default: the bilingual demo corpus)")
    p.add_argument("--vocab-size", type=int, default=RECIPES["toy"].vocab_size)
    p.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe")
    add_train_options(p)


def _run_pretrain(args):
    tc = train_config(args)
    if args.init:
        if args.data:
            raise ValueError("--data: a continued run uses the data of --init's run")
        result = continue_pretraining(args.init, args.out, tc, progress=not args.no_progress)
    else:
        spec = data_spec(args.data, args.vocab_size, args.tokenizer)
        result = pretrain(args.preset, args.out, tc, spec, progress=not args.no_progress)
    val = ", ".join(f"{k}={v:.3f}" for k, v in result.final_val.items())
    print(f"{result.out_dir}: {result.steps} steps, {result.tokens:,} tokens, "
          f"{result.train_time:.0f} s of training; {val}")


# --- transformations --------------------------------------------------------------------
def _add_scale_up(p):
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the source run")
    p.add_argument("--to", required=True, metavar="PRESET", help="target shape (see `minimoe info`)")
    p.add_argument("--method", choices=METHODS, default="aki-pro")
    p.add_argument("--depth", choices=DEPTHS, help="default: interpolate for aki-pro, else stack")
    p.add_argument("--mapping", choices=MAPPINGS, default="cyclic")
    p.add_argument("--seed", type=int, default=0, help="for --mapping random")
    p.add_argument("--kv", choices=KV_OPTIONS, default="keep",
                   help="mean-pool: average KV heads when the target has fewer groups")
    p.add_argument("--out", required=True, help="run folder for the grown model")
    p.add_argument("--stream", action="store_true", help="full-size checkpoints: safetensors to "
                   "safetensors one tensor at a time (no validation loss measured)")


def _run_scale_up(args):
    r = grow_run(args.src, args.to, args.out, args.method, args.depth, args.mapping, args.seed,
                 args.kv, stream=args.stream)
    _print_transform(args.out, r, f"{args.method}, depth {r['growth']['depth']}")


def _print_transform(out, r: dict, what: str):
    before, after = r["params_before"], r["params_after"]
    loss = (f"; val loss {r['val_before']['val_loss']:.3f} -> {r['val_after']['val_loss']:.3f}"
            if r["val_before"] else "")
    print(f"{out}: {before['total']:,} -> {after['total']:,} parameters ({after['active']:,} "
          f"active; {what}){loss}; report {out}/transform.json")


def _add_scale_out(p):
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the dense run")
    p.add_argument("--experts", type=int, default=RECIPES["toy"].n_experts)
    p.add_argument("--top-k", type=int, default=RECIPES["toy"].top_k)
    p.add_argument("--method", choices=SCALE_OUT_METHODS, default="upcycle",
                   help="upcycle: copies of the MLP (AquilaMoE); split-*: LLaMA-MoE's partitions")
    p.add_argument("--layers", choices=list(LAYER_CHOICES), default="all",
                   help="MLPs to convert: all (AquilaMoE) or every-other (Sparse Upcycling)")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--router-init", choices=["std", "variance"], default="std",
                   help="variance: read --router-std as a variance (the paper's wording)")
    p.add_argument("--scale", type=float, help="split-*: expert output scale (default experts/top-k)")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="split-importance*: batches (8 x 128 tokens) of the run's training data")
    p.add_argument("--seed", type=int, default=0, help="router init and random/cluster splits")
    p.add_argument("--out", required=True, help="run folder for the MoE model")
    p.add_argument("--stream", action="store_true", help="upcycle: safetensors to safetensors "
                   "one tensor at a time, neither model in memory (no validation loss measured)")


def _run_scale_out(args):
    options = dict(layers=args.layers, router_std=args.router_std, router_init=args.router_init)
    if args.scale is not None:
        if args.method == "upcycle":
            raise ValueError("--scale: only the split-* methods scale expert outputs")
        options["scale"] = args.scale
    if args.stream and args.method != "upcycle":
        raise ValueError(f"--stream: streams method upcycle only, not {args.method!r} "
                         "(a split reads whole MLPs and calibration data)")
    r = scale_out_run(args.src, args.out, args.method, args.experts, args.top_k,
                      args.calib_batches, args.seed, stream=args.stream, **options)
    _print_transform(args.out, r, f"{args.method}, {args.experts} experts, top-{args.top_k}")


# --- the cost side: flops, simulate, plan -----------------------------------------------
def _add_flops(p):
    p.add_argument("--preset", required=True)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--attention", choices=ATTENTION, default="causal",
                   help="count the attention core halved (causal) or as the full square")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true", help="cross-check the forward count with "
                   "fvcore on a real forward (a shallow copy for big presets; --seq default 64)")


def _run_flops(args):
    cfg = get_preset(args.preset)
    if args.check:
        print(check_report(cfg, args.preset, args.seq or min(64, cfg.max_seq_len)))
        return
    print(flops_report(cfg, args.preset, args.seq, args.attention, args.recompute,
                       as_json=args.json))


def _add_simulate(p):
    p.add_argument("scenario", help="a scenario file, e.g. sims/aquilamoe_table6.toml")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot-dir", help="also write PNG plots into this folder")


def _run_simulate(args):
    result = load_scenario(args.scenario)
    print(dumps(result) if args.json else result.text())
    if args.plot_dir:
        for path in result.plot(args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)


def _add_plan(p):
    p.add_argument("--preset", required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs available")
    p.add_argument("--gpu", default="h100", help=f"catalogue device: {', '.join(CATALOGUE)}")
    p.add_argument("--batch-tokens", type=int, default=4 * 2**20,
                   help="tokens per optimizer step (default 4 x 2^20)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--tokens-b", type=float, default=None,
                   help="training tokens in billions: also print days, GPU-days, energy and cost")
    p.add_argument("--fixed-gpus", action="store_true", help="use exactly --gpus GPUs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a cost-model option, as in a scenario's [options] (repeatable), "
                        "e.g. --set gemm_efficiency=0.4 --set imbalance=1.3")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_plan(args):
    if args.seq is not None and args.seq <= 0:
        raise ValueError(f"--seq={args.seq}: must be a positive number of tokens")
    if args.tokens_b is not None and not 0 < args.tokens_b < float("inf"):
        raise ValueError(f"--tokens-b={args.tokens_b}: must be a positive, finite number of billions")
    options = parse_assignments(args.set)
    search = plan(get_preset(args.preset), get_device(args.gpu), args.gpus, args.batch_tokens,
                  args.seq, options=options, fixed_gpus=args.fixed_gpus)
    tokens = None if args.tokens_b is None else args.tokens_b * 1e9
    print(plan_report(search, args.preset, tokens, as_json=args.json))


def _add_validate(p):
    p.add_argument("folder", nargs="?", default="sims/validation",
                   help="validation files (default: sims/validation)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot-dir", help="also write validation.png and aquilamoe_breakdown.png here")


def _run_validate(args):
    result = validate(args.folder)
    print(validation_json(result) if args.json else validation_text(result))
    if args.plot_dir:
        for path in plot_validation(result, Path(args.plot_dir)):
            print(f"wrote {path}", file=sys.stderr)


# --- analysis ---------------------------------------------------------------------------
def _add_experts(p):
    p.add_argument("--ckpt", required=True, metavar="RUN", help="an MoE run")
    p.add_argument("--data", nargs="+", metavar="PATH", help="files or folders to route, one "
                   "domain per file or top-level folder (default: the run's data)")
    p.add_argument("--out", help="output folder (default: RUN/experts)")
    p.add_argument("--batches", type=int, default=4, help="validation batches per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)


def _run_experts(args):
    out = Path(args.out) if args.out else Path(args.ckpt) / "experts"
    result = specialisation_run(args.ckpt, out, args.data, args.batch_size, args.seq_len,
                                args.batches)
    for layer in result["layers"]:
        print(f"layer {layer['layer']:3d}: Jensen-Shannon specialisation {layer['js']:.3f}")
    print(f"mean {result['mean_js']:.3f} over {len(result['layers'])} MoE layers, domains "
          f"{', '.join(result['domains'])}; wrote {out}/specialisation.json, "
          "specialisation.png, top_tokens.md")


# --- bench: its code lives apart (minimoe/bench/), imported only when asked for -----------
def _add_bench(p):
    p.add_argument("name", choices=["train", "moe", "grow", "upcycle", "dist", "sim", "generate",
                                    "time-factor"])
    p.add_argument("--run", help="time-factor: a finished pipeline folder (default runs/pipeline)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    p.add_argument("--compile", action="store_true", help="train: also torch.compile each block")


def _run_bench(args):
    from minimoe.bench import (
        BENCHES,  # benchmarks are not part of the library: loaded on demand
    )

    BENCHES[args.name](args)


# name -> (help, declare arguments, run)
COMMANDS = {
    "pipeline": ("preparation -> scale-up -> scale-out vs from scratch, with a report",
                 add_pipeline, run_pipeline),
    "pretrain": ("train a model on the demo corpus or your text", _add_pretrain, _run_pretrain),
    "tokenize": ("stream text of any size into pre-tokenised shards", add_tokenize, run_tokenize),
    "scale-up": ("grow a run's model wider and deeper (FPI, AKI, AKI-Pro)", _add_scale_up, _run_scale_up),
    "scale-out": ("turn a dense run's model into an MoE (upcycle or split)", _add_scale_out, _run_scale_out),
    "experiment": ("the paper's validation experiments at toy scale, over seeds",
                   add_experiment, run_experiment),
    "dry-run": ("a full-size recipe's parallel plan on meta tensors, against the simulator",
                add_dry_run, run_dry_run),
    "launch-args": ("the commands of a full-size recipe (what scaling/launch.sh runs)",
                    add_launch_args, run_launch_args),
    "info": ("shapes and parameter counts of a preset", _add_info, _run_info),
    "flops": ("analytic FLOPs per token of a preset, per component", _add_flops, _run_flops),
    "simulate": ("account a TOML scenario of training phases (sims/)", _add_simulate, _run_simulate),
    "plan": ("fastest and cheapest parallel layouts on N GPUs", _add_plan, _run_plan),
    "validate": ("the cost simulator against published training runs (sims/validation/)",
                 _add_validate, _run_validate),
    "experts": ("what an MoE run's experts specialise in, by domain", _add_experts, _run_experts),
    "eval": ("score runs on tasks: cloze, completion, bits per byte, .jsonl task files",
             add_eval, run_eval),
    "generate": ("continue a prompt with a run's model, greedy or sampled", add_generate,
                 run_generate),
    "bench": ("speed benchmarks, printed as measured ratios", _add_bench, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minimoe", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    # under torchrun: one process group for the command; what it prints comes from rank 0
    dist.init_from_env(getattr(args, "device", "cpu"))
    quiet = open(os.devnull, "w") if not dist.is_main() else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"minimoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minimoe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()
        if quiet:
            quiet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
