"""The full-size commands: tokenize (text of any size into shards), dry-run and launch-args."""

from __future__ import annotations

import json

from minimoe import dist
from minimoe.checks import SEED, option
from minimoe.recipes.config import RECIPES
from minimoe.recipes.dry_run import dry_run, dry_run_report, dry_run_table
from minimoe.recipes.launch import launch_args, load_launch_recipe
from minimoe.shards import SHARD_TOKENS, tokenize


def add_tokenize(p):
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt/.jsonl files or folders, streamed (one domain per file or folder)")
    p.add_argument("--out", required=True, help="shard folder; then `pretrain --data OUT`")
    p.add_argument("--tokenizer", default="bpe",
                   help="bpe (trained here on a sample of the text), byte, a tokenizer.json, "
                        "or a folder holding one (a run, a Hugging Face checkpoint)")
    p.add_argument("--vocab-size", type=option("int[258, 16777216]"),
                   default=RECIPES["toy"].vocab_size, help="for bpe")
    p.add_argument("--val-fraction", type=option("(0, 0.5)"), default=0.03)
    p.add_argument("--shard-tokens", type=option("int[1, 2147483648]"), default=SHARD_TOKENS,
                   help="tokens per shard file")
    p.add_argument("--seed", type=option(SEED), default=0, help="the train/val split's hash")
    p.add_argument("--no-progress", action="store_true")


def run_tokenize(args):
    m = dist.main_only(lambda: tokenize(args.data, args.out, args.tokenizer, args.vocab_size,
                                        args.val_fraction, args.seed, args.shard_tokens,
                                        progress=not args.no_progress))
    n_shards = (sum(len(e) for e in m["shards"]["train"].values())
                + sum(len(e) for langs in m["shards"]["val"].values() for e in langs.values()))
    domains = ", ".join(f"{d} {n:,}" for d, n in m["tokens_by_domain"]["train"].items())
    print(f"{args.out}: {m['tokens']['train']:,} training + {m['tokens']['val']:,} validation "
          f"tokens in {n_shards} {m['dtype']} shards (vocabulary {m['vocab_size']:,}; "
          f"training tokens by domain: {domains}); train with --data {args.out}")


def add_dry_run(p):
    p.add_argument("recipe", nargs="+", help="full-size launch recipes, e.g. scaling/full/*.toml")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")


def run_dry_run(args):
    results = []
    for path in args.recipe:
        results.append(dry_run(path))
        print(json.dumps(results[-1]) if args.json else dry_run_report(results[-1]), flush=True)
    if len(results) > 1 and not args.json:
        print(dry_run_table(results))


def add_launch_args(p):
    p.add_argument("recipe", help="a full-size launch recipe (scaling/full/)")
    p.add_argument("step", choices=["prepare", "train", "node"],
                   help="the minimoe arguments of a step, or the recipe's nodes (launch.sh)")


def run_launch_args(args):
    print(launch_args(load_launch_recipe(args.recipe), args.step))
