"""The options of the one training loop, shared by every command that trains: TrainConfig's
fields, defaults and rules (minimoe/train.py)."""

from __future__ import annotations

import dataclasses
import importlib.util

from minimoe.checks import option
from minimoe.train import TRAIN_RULES, TrainConfig

TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
NUMBERS = {"steps": "", "batch_size": "", "seq_len": "", "grad_accum": "", "lr": "",
           "warmup_steps": "warmup steps", "eval_every": "", "ckpt_every": "", "log_every": "",
           "seed": "", "mix_every": "dynamic: steps between weight updates",
           "mix_eta": "dynamic: step size of the update"}


def add_train_options(p):
    g = p.add_argument_group("training (defaults and rules: TrainConfig)")
    for name, help_text in NUMBERS.items():
        flag = "--warmup" if name == "warmup_steps" else f"--{name.replace('_', '-')}"
        g.add_argument(flag, dest=name, type=option(TRAIN_RULES[name]),
                       default=TRAIN_DEFAULTS[name], help=help_text or None)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPUs: slow on AVX2 CPUs)")
    g.add_argument("--device", default=TRAIN_DEFAULTS["device"], help="cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--tensorboard", metavar="DIR", help="also write the training curves here "
                   "(torch's SummaryWriter; needs the tensorboard extra)")
    g.add_argument("--mix", default=TRAIN_DEFAULTS["mix"], help="domain mix: size (in proportion "
                   "to size), en-kjv=0.3,zh-pd1998=0.7 (static) or dynamic (Sheared-LLaMA)")
    g.add_argument("--mix-reference", default=TRAIN_DEFAULTS["mix_reference"], metavar="PATH",
                   help="dynamic: reference losses, a JSON file {domain: loss} or a run folder")
    g = p.add_argument_group("under torchrun (minimoe/dist.py; --batch-size is the global batch)")
    g.add_argument("--parallel", choices=["fsdp", "ddp"], default=TRAIN_DEFAULTS["parallel"],
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


def tensorboard_dir(args) -> str | None:
    """--tensorboard, refused at the door where the tensorboard package is missing."""
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(f"--tensorboard={args.tensorboard}: needs the tensorboard package "
                         "(pip install 'minimoe[tensorboard]')")
    return args.tensorboard


def train_config(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    return TrainConfig(**given, reduce_every_micro_batch=not args.reduce_once)
