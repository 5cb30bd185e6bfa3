"""The commands that make runs (minimoe/recipes/stages.py): pretrain, with the options of the one
training loop (TrainConfig's fields, defaults and rules: minimoe/train.py), scale-up, scale-out
and experts."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from minimoe.checks import SEED, option
from minimoe.config import GATES, PRESETS
from minimoe.grow import DEPTHS, KV_OPTIONS, MAPPINGS, METHODS
from minimoe.recipes.config import RECIPES
from minimoe.recipes.stages import (continue_pretraining, data_spec, grow_run, pretrain,
                                    scale_out_run, specialisation_run)
from minimoe.train import TRAIN_RULES, TrainConfig
from minimoe.upcycle import LAYER_CHOICES, SCALE_OUT_METHODS

TRAIN = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
TOY = RECIPES["toy"]
NUMBERS = {"steps": None, "batch_size": None, "seq_len": None, "grad_accum": None, "lr": None,
           "warmup_steps": "warmup steps", "eval_every": None, "ckpt_every": None, "log_every": None,
           "seed": None, "mix_every": "dynamic: steps between weight updates",
           "mix_eta": "dynamic: step size of the update"}  # TrainConfig field: help (None: the name)


def add_pretrain(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a fresh model of this preset (see `minimoe info`)")
    src.add_argument("--init", metavar="RUN", help="continue pretraining the model of a run")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds this run)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl files or folders, or "
                   "a shard folder of `minimoe tokenize` (default: the bilingual demo corpus)")
    p.add_argument("--vocab-size", type=option("int[258, 16777216]"),
                   help=f"BPE vocabulary (default {TOY.vocab_size})")
    p.add_argument("--tokenizer", choices=["bpe", "byte"], help="default bpe")
    g = p.add_argument_group("training (defaults and rules: TrainConfig)")
    for name, help_text in NUMBERS.items():
        flag = "--warmup" if name == "warmup_steps" else f"--{name.replace('_', '-')}"
        g.add_argument(flag, dest=name, type=option(TRAIN_RULES[name]), default=TRAIN[name], help=help_text)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPUs: slow on AVX2 CPUs)")
    g.add_argument("--device", default=TRAIN["device"], help="cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", metavar="DIR", help="also write the training curves here "
                   "(torch's SummaryWriter; needs the tensorboard extra)")
    g.add_argument("--mix", default=TRAIN["mix"], help="domain mix: size (in proportion to size), "
                   "en-kjv=0.3,zh-pd1998=0.7 (static) or dynamic (Sheared-LLaMA)")
    g.add_argument("--mix-reference", default=TRAIN["mix_reference"], metavar="PATH",
                   help="dynamic: reference losses, a JSON file {domain: loss} or a run folder")
    g = p.add_argument_group("under torchrun (minimoe/dist.py; --batch-size is the global batch)")
    g.add_argument("--parallel", choices=["fsdp", "ddp"], default=TRAIN["parallel"],
                   help="FSDP2 (with --bf16: bf16 compute, fp32 master weights and reduction) or DDP")
    g.add_argument("--ep", type=option(TRAIN_RULES["ep"]), default=1,
                   help="expert-parallel ranks: each holds experts/ep experts of every MoE layer")
    g.add_argument("--tp", type=option(TRAIN_RULES["tp"]), default=1,
                   help="tensor-parallel ranks: each holds 1/tp of every matrix (dense models)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward")
    g.add_argument("--reduce-once", action="store_true", help="FSDP2: reduce gradients once per "
                   "step, holding them whole until then (default: after every micro-batch)")
    g.add_argument("--async-checkpoint", action="store_true",
                   help="write checkpoints in the background while training goes on")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")


def run_pretrain(args):
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in TRAIN},
                     reduce_every_micro_batch=not args.reduce_once)
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(f"--tensorboard={args.tensorboard}: needs the tensorboard package "
                         "(pip install 'minimoe[tensorboard]')")
    progress, board = not args.no_progress, args.tensorboard
    if args.init:
        for name in ("data", "tokenizer", "vocab_size"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name.replace('_', '-')}: a continued run keeps the data "
                                 "and tokenizer of --init's run")
        result = continue_pretraining(args.init, args.out, tc, progress=progress, tensorboard=board)
    else:
        spec = data_spec(args.data, args.vocab_size or TOY.vocab_size, args.tokenizer or "bpe")
        result = pretrain(args.preset, args.out, tc, spec, progress=progress, tensorboard=board)
    val = ", ".join(f"{k}={v:.3f}" for k, v in result.final_val.items())
    print(f"{result.out_dir}: {result.steps} steps, {result.tokens:,} tokens, "
          f"{result.train_time:.0f} s of training; {val}")


def add_scale_up(p):
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the source run")
    p.add_argument("--to", required=True, choices=PRESETS, metavar="PRESET",
                   help="target shape (see `minimoe info`)")
    p.add_argument("--method", choices=METHODS, default="aki-pro")
    p.add_argument("--depth", choices=DEPTHS, help="default: interpolate for aki-pro, else stack")
    p.add_argument("--mapping", choices=MAPPINGS, default="cyclic")
    p.add_argument("--seed", type=option(SEED), default=0, help="for --mapping random")
    p.add_argument("--kv", choices=KV_OPTIONS, default="keep",
                   help="mean-pool: average KV heads when the target has fewer groups")
    p.add_argument("--out", required=True, help="run folder for the grown model")
    p.add_argument("--stream", action="store_true", help="full-size checkpoints: safetensors to "
                   "safetensors one tensor at a time (no validation loss measured)")


def run_scale_up(args):
    r = grow_run(args.src, args.to, args.out, args.method, args.depth, args.mapping, args.seed,
                 args.kv, stream=args.stream)
    _print_transform(args.out, r, f"{args.method}, depth {r['growth']['depth']}")


def _print_transform(out, r: dict, what: str):
    before, after = r["params_before"], r["params_after"]
    loss = (f"; val loss {r['val_before']['val_loss']:.3f} -> {r['val_after']['val_loss']:.3f}"
            if r["val_before"] else "")
    print(f"{out}: {before['total']:,} -> {after['total']:,} parameters ({after['active']:,} "
          f"active; {what}){loss}; report {out}/transform.json")


def add_scale_out(p):
    p.add_argument("--from", dest="src", required=True, metavar="RUN", help="the dense run")
    p.add_argument("--experts", type=option("int[1, 1024]"), default=TOY.n_experts)
    p.add_argument("--top-k", type=option("int[1, 1024]"), default=TOY.top_k)
    p.add_argument("--method", choices=SCALE_OUT_METHODS, default="upcycle",
                   help="upcycle: copies of the MLP (AquilaMoE); split-*: LLaMA-MoE's partitions")
    p.add_argument("--layers", choices=list(LAYER_CHOICES), default="all",
                   help="MLPs to convert: all (AquilaMoE) or every-other (Sparse Upcycling)")
    p.add_argument("--router-std", type=option(">0"), default=0.02)
    p.add_argument("--router-init", choices=["std", "variance"], default="std",
                   help="variance: read --router-std as a variance (the paper's wording)")
    p.add_argument("--scale", type=option(">0"), help="split-*: expert output scale (default experts/top-k)")
    p.add_argument("--gate", choices=GATES, help="softmax-topk (Mixtral, AquilaMoE; the default) or "
                   "topk-softmax (LLaMA-MoE)")
    p.add_argument("--router-noise", action="store_true", default=None, help="noisy top-k gating "
                   "while training (Shazeer et al. 2017, as LLaMA-MoE trains its splits)")
    p.add_argument("--capacity-factor", type=option("[0, 64]"), help="tokens an expert takes, "
                   "over an even share; those over it are dropped (default 0: dropless)")
    p.add_argument("--calib-batches", type=option("int[1, 10000]"), default=8,
                   help="split-importance*: batches (8 x 128 tokens) of the run's training data")
    p.add_argument("--seed", type=option(SEED), default=0, help="router init and random/cluster splits")
    p.add_argument("--out", required=True, help="run folder for the MoE model")
    p.add_argument("--stream", action="store_true", help="upcycle: safetensors to safetensors "
                   "one tensor at a time, neither model in memory (no validation loss measured)")


def run_scale_out(args):
    if args.scale is not None and args.method == "upcycle":
        raise ValueError("--scale: only the split-* methods scale expert outputs")
    if args.stream and args.method != "upcycle":
        raise ValueError(f"--stream: streams method upcycle only, not {args.method!r} "
                         "(a split reads whole MLPs and calibration data)")
    given = {k: getattr(args, k) for k in ("gate", "capacity_factor", "router_noise", "scale")
             if getattr(args, k) is not None}  # the others: the library's defaults
    r = scale_out_run(args.src, args.out, args.method, args.experts, args.top_k, args.calib_batches,
                      args.seed, stream=args.stream, layers=args.layers, router_std=args.router_std,
                      router_init=args.router_init, **given)
    _print_transform(args.out, r, f"{args.method}, {args.experts} experts, top-{args.top_k}")


def add_experts(p):
    p.add_argument("--ckpt", required=True, metavar="RUN", help="an MoE run")
    p.add_argument("--data", nargs="+", metavar="PATH", help="files or folders to route, one "
                   "domain per file or top-level folder (default: the run's data)")
    p.add_argument("--out", help="output folder (default: RUN/experts)")
    p.add_argument("--batches", type=option("int[1, 10000]"), default=4, help="validation batches per domain")
    p.add_argument("--batch-size", type=option("int[1, 65536]"), default=8)
    p.add_argument("--seq-len", type=option("int[1, 1048576]"), default=128)


def run_experts(args):
    out = Path(args.out) if args.out else Path(args.ckpt) / "experts"
    result = specialisation_run(args.ckpt, out, args.data, args.batch_size, args.seq_len, args.batches)
    for layer in result["layers"]:
        print(f"layer {layer['layer']:3d}: Jensen-Shannon specialisation {layer['js']:.3f}")
    print(f"mean {result['mean_js']:.3f} over {len(result['layers'])} MoE layers, domains "
          f"{', '.join(result['domains'])}; wrote {out}/specialisation.json, "
          "specialisation.png, top_tokens.md")
