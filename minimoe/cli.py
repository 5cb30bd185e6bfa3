"""The `minimoe` command: argument parsing, one-line errors and exit codes, no logic of its own.

Every subcommand is a pair: `_add_NAME(sub)` declares its arguments and `_run_NAME(args)` calls
the package. A `ValueError` (bad config, bad file, bad option) becomes one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        print(f"minimoe: error: {message}", file=sys.stderr)
        sys.exit(2)


# --- info -------------------------------------------------------------------------------
def _add_info(sub):
    p = sub.add_parser("info", help="shapes and parameter counts of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_info(args):
    from minimoe.report import info_table

    print(info_table(args.preset, as_json=args.json))


# --- pretrain ---------------------------------------------------------------------------
def _add_train_options(p, steps=300):
    """Options of the one training loop, shared by every command that trains."""
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=30, help="warmup steps")
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--ckpt-every", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--device", default="cpu")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args):
    from minimoe.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       eval_every=args.eval_every, ckpt_every=args.ckpt_every, seed=args.seed,
                       bf16=args.bf16, device=args.device)


def _add_pretrain(sub):
    p = sub.add_parser("pretrain", help="train a model on the demo corpus or your text")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a fresh model of this preset (see `minimoe info`)")
    src.add_argument("--init", metavar="RUN", help="continue pretraining the model of a run")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds this run)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl files or folders "
                   "(default: the bilingual demo corpus)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe")
    _add_train_options(p)


def _run_pretrain(args):
    from minimoe.stages import continue_pretraining, data_spec, pretrain

    tc = _train_config(args)
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


# --- pipeline ---------------------------------------------------------------------------
def _add_pipeline(sub):
    p = sub.add_parser("pipeline", help="preparation -> scale-up -> scale-out vs from scratch")
    p.add_argument("--preset", default="toy", help="toy (about 10 minutes) or tiny (under 1)")
    p.add_argument("--out", default="runs/pipeline", help="pipeline folder (resumed if re-run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_pipeline(args):
    from minimoe.pipeline import get_pipeline, run_pipeline

    summary = run_pipeline(get_pipeline(args.preset), args.out, progress=not args.no_progress)
    f = summary["factors"]
    print(f"report: {args.out}/report/report.md")
    print(f"time savings {f['time_savings']:.2f}x, compute savings (model FLOPs) "
          f"{f['compute_savings_model_flops']:.2f}x; final val loss "
          f"{summary['stages'][-2]['val loss at end']:.3f} (EfficientScale) vs "
          f"{summary['stages'][-1]['val loss at end']:.3f} (from scratch, same tokens), "
          f"{f['scratch_val_loss_at_chain_flops']:.3f} (from scratch, same FLOPs)")


# --- scale-up ---------------------------------------------------------------------------
def _add_scale_up(sub):
    from minimoe.grow import DEPTHS, KV_OPTIONS, MAPPINGS, METHODS

    p = sub.add_parser("scale-up", help="grow a run's model wider and deeper (FPI, AKI, AKI-Pro)")
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the source run")
    p.add_argument("--to", required=True, metavar="PRESET",
                   help="target shape (see `minimoe info`)")
    p.add_argument("--method", choices=METHODS, default="aki-pro")
    p.add_argument("--depth", choices=DEPTHS, help="default: interpolate for aki-pro, else stack")
    p.add_argument("--mapping", choices=MAPPINGS, default="cyclic")
    p.add_argument("--seed", type=int, default=0, help="for --mapping random")
    p.add_argument("--kv", choices=KV_OPTIONS, default="keep",
                   help="mean-pool: average KV heads when the target has fewer groups")
    p.add_argument("--out", required=True, help="run folder for the grown model")


def _run_scale_up(args):
    from minimoe.stages import grow_run

    r = grow_run(args.src, args.to, args.out, args.method, args.depth, args.mapping, args.seed, args.kv)
    _print_transform(args.out, r, f"{args.method}, depth {r['growth']['depth']}")


def _print_transform(out, r: dict, what: str):
    before, after = r["params_before"], r["params_after"]
    loss = (f"; val loss {r['val_before']['val_loss']:.3f} -> {r['val_after']['val_loss']:.3f}"
            if r["val_before"] else "")
    print(f"{out}: {before['total']:,} -> {after['total']:,} parameters ({after['active']:,} "
          f"active; {what}){loss}; report {out}/transform.json")


# --- scale-out --------------------------------------------------------------------------
def _add_scale_out(sub):
    from minimoe.upcycle import LAYER_CHOICES, SCALE_OUT_METHODS

    p = sub.add_parser("scale-out", help="turn a dense run's model into an MoE (upcycle or split)")
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the dense run")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
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


def _run_scale_out(args):
    from minimoe.stages import scale_out_run

    options = dict(layers=args.layers, router_std=args.router_std, router_init=args.router_init)
    if args.scale is not None:
        if args.method == "upcycle":
            raise ValueError("--scale: only the split-* methods scale expert outputs")
        options["scale"] = args.scale
    r = scale_out_run(args.src, args.out, args.method, args.experts, args.top_k,
                      args.calib_batches, args.seed, **options)
    _print_transform(args.out, r, f"{args.method}, {args.experts} experts, top-{args.top_k}")


# --- flops, simulate, plan: the cost side (flops.py, scenario.py, plan.py) --------------
def _add_flops(sub):
    p = sub.add_parser("flops", help="analytic FLOPs per token of a preset, per component")
    p.add_argument("--preset", required=True)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--attention", choices=["causal", "full"], default="causal",
                   help="count the attention core halved (causal) or as the full square")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_flops(args):
    from minimoe.config import get_preset
    from minimoe.flops import flops_report

    print(flops_report(get_preset(args.preset), args.preset, args.seq, args.attention,
                       args.recompute, as_json=args.json))


def _add_simulate(sub):
    p = sub.add_parser("simulate", help="account a TOML scenario of training phases (sims/)")
    p.add_argument("scenario", help="a scenario file, e.g. sims/aquilamoe_table6.toml")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot-dir", help="also write PNG plots into this folder")


def _run_simulate(args):
    from minimoe.scenario import dumps, load_scenario

    result = load_scenario(args.scenario)
    print(dumps(result) if args.json else result.text())
    if args.plot_dir:
        for path in result.plot(args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)


def _add_plan(sub):
    p = sub.add_parser("plan", help="fastest and cheapest parallel layouts on N GPUs")
    p.add_argument("--preset", required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs available")
    p.add_argument("--gpu", default="h100", help="catalogue device: a100, h100, h800, h200, b200")
    p.add_argument("--batch-tokens", type=int, default=4 * 2**20,
                   help="tokens per optimizer step (default 4 x 2^20)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--tokens-b", type=float, default=None,
                   help="training tokens in billions: also print days, GPU-days, energy and cost")
    p.add_argument("--fixed-gpus", action="store_true", help="use exactly --gpus GPUs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_plan(args):
    from minimoe.config import get_preset
    from minimoe.hardware import get_device
    from minimoe.plan import plan, plan_report

    search = plan(get_preset(args.preset), get_device(args.gpu), args.gpus, args.batch_tokens,
                  args.seq, fixed_gpus=args.fixed_gpus)
    tokens = args.tokens_b * 1e9 if args.tokens_b else None
    print(plan_report(search, args.preset, tokens, as_json=args.json))


# --- experiment -------------------------------------------------------------------------
def _add_experiment(sub):
    p = sub.add_parser("experiment", help="the paper's validation experiments at toy scale")
    p.add_argument("name", choices=["scale-up", "scale-out"],
                   help="scale-up: Table 1 (initialisations); scale-out: dense vs upcycled vs split")
    p.add_argument("--out", required=True, help="experiment folder (finished runs are kept)")
    p.add_argument("--quick", action="store_true", help="tiny models, under 2 minutes")
    p.add_argument("--dense-run", metavar="RUN", help="scale-out: start from this grown dense run")
    p.add_argument("--no-progress", action="store_true")


def _run_experiment(args):
    from minimoe import experiments as ex

    ec = ex.QUICK if args.quick else ex.ExperimentConfig()
    if args.name == "scale-up":
        ex.scale_up_experiment(args.out, ec, progress=not args.no_progress)
    else:
        ex.scale_out_experiment(args.out, ec, progress=not args.no_progress, dense_run=args.dense_run)
    print(f"{args.out}/{args.name}.md")
    print(open(f"{args.out}/{args.name}.md", encoding="utf-8").read().split("\n![")[0])


# --- bench ------------------------------------------------------------------------------
def _add_bench(sub):
    from minimoe.bench import BENCHES

    p = sub.add_parser("bench", help="speed benchmarks, printed as measured ratios")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")


def _run_bench(args):
    from minimoe.bench import BENCHES

    BENCHES[args.name](args)


COMMANDS = ["info", "pretrain", "pipeline", "experiment", "scale-up", "scale-out", "bench", "flops", "simulate", "plan"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minimoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        globals()[f"_add_{name.replace('-', '_')}"](sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        globals()[f"_run_{args.command.replace('-', '_')}"](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"minimoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minimoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
