"""What tests/test_dist.py runs in its processes (one, or several under torchrun).

    python tests/dist_worker.py train OUT [--parallel fsdp|ddp] [--ep N] [--tp N] [--vocab V] [--moe] [--kill-at S]
                                          [--kill-rank R] [--device cpu|cuda] [--bf16]
    python tests/dist_worker.py ep [--device cpu|cuda]
    python tests/dist_worker.py measure RECIPE OUT

`train` trains the tiny model (or a tiny MoE) for 6 steps of 2 micro-batches (gradients reduced
on the second only), logging every step and checkpointing every 2; --kill-at S makes rank R
(every rank when R < 0) SIGKILL itself right after step S, in the first attempt of a torchrun
job only (TORCHELASTIC_RESTART_COUNT), so a restart runs on.
`ep` checks that an expert-parallel MoE computes what one process's MoE computes.
`measure` tracks one real training step of a launch recipe (minimoe dry-run's, on real tensors)
and rank 0 writes its peak by category to OUT; the routers send each token to one expert of
each of 2 expert-parallel ranks, the even routing the rehearsal stands in with.
"""

import argparse
import faulthandler
import os
import signal
import sys

import torch
import torch.distributed as torch_dist

from minimoe import dist
from minimoe.config import get_preset
from minimoe.moe import AuxLossConfig
from minimoe.recipes.stages import data_spec, pretrain
from minimoe.train import TrainConfig


def train(args):
    cfg = get_preset("tiny")
    if args.moe:
        cfg = cfg.replace(n_experts=4, top_k=2)
    # balance=0: the balance loss is a product of per-rank means, the one term whose sum over
    # ranks is not one process's (every other loss is a mean over tokens)
    tc = TrainConfig(steps=6, batch_size=4, seq_len=32, grad_accum=2, warmup_steps=2,
                     eval_every=3, eval_batches=2, ckpt_every=2, log_every=1,
                     parallel=args.parallel, ep=args.ep, tp=args.tp, device=args.device, bf16=args.bf16,
                     aux=AuxLossConfig(balance=0.0))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(f"{args.out}.attempts", "a") as f:  # beside the run folder: which attempts ran
        f.write(f"{attempt}\n")
    first_attempt = attempt == "0"

    def on_step(step, record):
        if step == args.kill_at and first_attempt and args.kill_rank in (-1, dist.rank()):
            os.kill(os.getpid(), signal.SIGKILL)

    pretrain(cfg.replace(vocab_size=args.vocab), args.out, tc, data_spec(vocab_size=args.vocab),
             progress=False, on_step=on_step)


def expert_parallel(args):
    """Outputs and gradients of an EP MoE (2 experts per rank) equal the one-process MoE's on
    each rank's tokens; the ranks send different numbers of tokens to each expert, and expert 3
    gets none."""
    import copy

    from minimoe.expert_parallel import apply_expert_parallel
    from minimoe.moe import MoE

    dist.init_from_env(args.device)
    device = dist.device_for(args.device)
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(n_experts=4, top_k=2)
    reference = MoE(cfg)
    with torch.no_grad():  # feature 0 is large in every token and expert 3 hates it
        reference.router.weight[3] = 0.0
        reference.router.weight[3, 0] = -10.0
    reference = reference.to(device)
    ep_moe = copy.deepcopy(reference)
    mesh = dist.build_mesh(ep=world, device_type=device.type)
    apply_expert_parallel(ep_moe, mesh["ep"])

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    n_tokens = 24 + 8 * rank
    x = torch.randn(1, n_tokens, cfg.d_model, generator=generator)
    x[..., 0] = 5.0
    x = x.to(device)
    g = torch.randn(1, n_tokens, cfg.d_model, generator=generator).to(device)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_ep = reference(x_ref), ep_moe(x_ep)
    (out_ref * g).sum().backward()
    (out_ep * g).sum().backward()

    load = torch.stack([reference.load_E * (r == rank) for r in range(world)])
    torch_dist.all_reduce(load)  # row r: rank r's routing
    load = load.cpu()
    assert load[:, 3].sum() == 0, f"expert 3 should get no token: {load.tolist()}"
    assert not torch.equal(load[0], load[1]), f"the ranks should route differently: {load.tolist()}"
    tol = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(out_ep, out_ref, **tol)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, **tol)
    torch.testing.assert_close(ep_moe.router.weight.grad, reference.router.weight.grad, **tol)
    local = cfg.n_experts // world
    for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
        # the one-process gradient of expert e is the sum over the ranks' tokens
        summed = getattr(reference, name).grad.clone()
        torch_dist.all_reduce(summed)
        mine = getattr(ep_moe, name).grad.to_local()
        torch.testing.assert_close(mine, summed[rank * local:(rank + 1) * local], **tol)
    print(f"rank {rank}: expert-parallel MoE equals the one-process MoE; load {load.tolist()}")
    dist.shutdown()


def measure(args):
    import json

    from minimoe.model import build_model
    from minimoe.moe import moe_layers
    from minimoe.recipes.dry_run import measure as tracked_step
    from minimoe.recipes.launch import load_launch_recipe, train_config
    from minimoe.stream import fill_block
    from minimoe.train import make_optimizer, plan

    dist.init_from_env()
    recipe = load_launch_recipe(args.out)
    cfg, tc = recipe.model_config, train_config(recipe)
    model = build_model(cfg, device="meta")
    parallel = plan(model, tc, dist.build_mesh(tc.ep, "cpu", tc.tp))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters(fill=fill_block)
    for moe in moe_layers(model):  # experts 0, 2 (one per rank) for x.v > 0, else 1, 3
        v = torch.randn(cfg.d_model)
        router = torch.stack([v, -v, 1.001 * v, -1.001 * v])
        fill_block(moe.router.weight, lambda t: t.copy_(router))
    x = torch.randint(0, cfg.vocab_size, (recipe.layout.micro_batch, tc.seq_len))
    peak = tracked_step(parallel, make_optimizer(model, tc), lambda micro: (x, x), tc)
    if dist.is_main():
        with open(args.what_out, "w") as f:
            json.dump(peak, f)
    dist.shutdown()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["train", "ep", "measure"])
    parser.add_argument("out", nargs="?")
    parser.add_argument("what_out", nargs="?")
    parser.add_argument("--parallel", default="fsdp")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    {"train": train, "ep": expert_parallel, "measure": measure}[args.what](args)
    sys.exit(0)
