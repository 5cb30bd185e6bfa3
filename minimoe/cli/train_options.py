"""The options of the one training loop, shared by every command that trains: TrainConfig's
fields (their defaults written once, in the dataclass) and the layout under torchrun."""

from __future__ import annotations

import dataclasses

from minimoe.train import TrainConfig

TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def add_train_options(p):
    """Options of the one training loop, shared by every command that trains."""
    g = p.add_argument_group("training (defaults: TrainConfig)")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "ckpt_every", "log_every",
                 "seed"):
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=TRAIN_DEFAULTS[name])
    g.add_argument("--lr", type=float, default=TRAIN_DEFAULTS["lr"])
    g.add_argument("--warmup", type=int, default=TRAIN_DEFAULTS["warmup_steps"], help="warmup steps")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (for GPUs: slow on AVX2 CPUs)")
    g.add_argument("--device", default=TRAIN_DEFAULTS["device"])
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--mix", default=TRAIN_DEFAULTS["mix"], help="domain mix: size (in proportion "
                   "to size), en-kjv=0.3,zh-pd1998=0.7 (static) or dynamic (Sheared-LLaMA)")
    g.add_argument("--mix-every", type=int, default=TRAIN_DEFAULTS["mix_every"],
                   help="dynamic: steps between weight updates")
    g.add_argument("--mix-eta", type=float, default=TRAIN_DEFAULTS["mix_eta"],
                   help="dynamic: step size of the update")
    g.add_argument("--mix-reference", default=TRAIN_DEFAULTS["mix_reference"], metavar="PATH",
                   help="dynamic: reference losses, a JSON file {domain: loss} or a run folder")
    g = p.add_argument_group("under torchrun (minimoe/dist.py; --batch-size is the global batch)")
    g.add_argument("--parallel", choices=["fsdp", "ddp"], default=TRAIN_DEFAULTS["parallel"],
                   help="FSDP2 (with --bf16: bf16 compute, fp32 master weights and reduction) or DDP")
    g.add_argument("--ep", type=int, default=TRAIN_DEFAULTS["ep"],
                   help="expert-parallel ranks: each holds experts/ep experts of every MoE layer")
    g.add_argument("--tp", type=int, default=TRAIN_DEFAULTS["tp"],
                   help="tensor-parallel ranks: each holds 1/tp of every matrix (dense models)")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward")
    g.add_argument("--reduce-once", action="store_true", help="FSDP2: reduce gradients once per "
                   "step, holding them whole until then (default: after every micro-batch)")
    g.add_argument("--async-checkpoint", action="store_true",
                   help="write checkpoints in the background while training goes on")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")


def train_config(args) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                       log_every=args.log_every, seed=args.seed,
                       bf16=args.bf16, device=args.device, mix=args.mix, mix_every=args.mix_every,
                       mix_eta=args.mix_eta, mix_reference=args.mix_reference,
                       parallel=args.parallel, ep=args.ep, tp=args.tp,
                       activation_checkpointing=args.activation_checkpointing,
                       compile=args.compile, reduce_every_micro_batch=not args.reduce_once,
                       async_checkpoint=args.async_checkpoint)
