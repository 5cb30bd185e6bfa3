"""bench step: a full-size recipe's training step on this machine's one GPU, the recipe shrunk
to one rank (FSDP2 on a process group of one; its micro-batch, or --micro-batch, and its
activation checkpointing), against what the project predicts for it: the CUDA allocator's peak
over `minimoe dry-run`'s rehearsed peak, and the measured tokens/s over the cost simulator's for
this GPU. --quick: the tiny preset on the CPU (what the tests run; no simulator ratio)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.distributed as torch_dist

from minimoe import dist
from minimoe.checkpoint import fill_model
from minimoe.flops import flops_per_token
from minimoe.model import build_model
from minimoe.recipes.dry_run import measure, rehearse
from minimoe.recipes.launch import ENGINE_OPTIONS, load_launch_recipe, train_config
from minimoe.sim.cost import simulate
from minimoe.sim.hardware import CATALOGUE, get_device
from minimoe.train import make_optimizer, plan, train_step

STEPS = 6  # timed, after 2 warm-up steps


def one_rank_recipe(args):
    r = load_launch_recipe(args.recipe)
    layout = dataclasses.replace(r.layout, gpus=1, cluster_gpus=1, gpus_per_node=1,
                                 micro_batch=args.micro_batch or r.layout.micro_batch)
    if args.quick:
        r = dataclasses.replace(r, preset="tiny", train=dataclasses.replace(r.train, seq_len=64, bf16=False))
        layout = dataclasses.replace(layout, device="cpu", micro_batch=2)
    return dataclasses.replace(r, layout=layout)


def bench_step(args):
    r = one_rank_recipe(args)
    device = r.layout.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench step: needs a CUDA GPU (--quick runs the tiny model on the CPU)")
    rehearsed = rehearse(r)["total"]  # before the real world exists: it makes a fake one
    # the simulator's entry whose key the device's name holds ("NVIDIA H100 80GB HBM3" -> h100)
    name = torch.cuda.get_device_name().lower() if device == "cuda" else ""
    gpu = next((key for key in CATALOGUE if key in name), None)
    sim = (simulate(r.workload, r.layout.sim_layout(), get_device(gpu), ENGINE_OPTIONS)
           if gpu in CATALOGUE else None)
    torch_dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                  store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        measured = _measure(r, device)
    finally:
        torch_dist.destroy_process_group()
    tokens = r.layout.micro_batch * r.train.seq_len
    tps = tokens / statistics.median(measured["seconds"])
    print(f"bench step: {r.name} ({r.preset}) on one {gpu or 'CPU'} ({r.model_config.param_counts()['total']:,} "
          f"parameters), micro-batch {r.layout.micro_batch} x {r.train.seq_len}, activation "
          f"checkpointing {'on' if r.layout.activation_checkpointing else 'off'}, "
          f"median of {STEPS} steps after 2")
    if device == "cuda":
        print(f"  peak memory: {measured['peak'] / 1e9:.2f} GB allocated, {measured['reserved'] / 1e9:.2f} "
              f"reserved; rehearsed {rehearsed / 1e9:.2f} GB: allocated / rehearsed = "
              f"{measured['peak'] / rehearsed:.2f}, reserved / rehearsed = {measured['reserved'] / rehearsed:.2f}")
    else:
        print(f"  peak memory tracked on real tensors {measured['peak'] / 1e6:.2f} MB, rehearsed on fake "
              f"ones {rehearsed / 1e6:.2f} MB: tracked / rehearsed = {measured['peak'] / rehearsed:.3f}")
    out = {"rehearsed": rehearsed, **measured, "tokens_per_s": tps}
    if sim is not None:
        mfu = tps * flops_per_token(r.model_config, r.train.seq_len).model / get_device(gpu).peak_flops
        print(f"  {tps:,.0f} tokens/s measured ({mfu:.1%} model FLOPs utilisation), "
              f"{sim.tokens_per_s:,.0f} predicted ({sim.interval[0]:,.0f}-{sim.interval[1]:,.0f}): "
              f"measured / predicted = {tps / sim.tokens_per_s:.2f}")
        out.update(predicted=sim.tokens_per_s, mfu=mfu)
    else:
        print(f"  {tps:,.0f} tokens/s measured (no simulator entry for this device)")
    return out


def _measure(r, device: str) -> dict:
    """Step seconds, then the allocator's peak (CUDA), then the tracked step (its hooks stay)."""
    tc = dataclasses.replace(train_config(r), grad_accum=1)
    cfg, shape = r.model_config, (r.layout.micro_batch, r.train.seq_len + 1)
    model = build_model(cfg, device="meta")
    parallel = plan(model, tc, dist.build_mesh(tc.ep, device, tc.tp))
    fill_model(model, torch.device(device), "seed", tc.seed)
    optimizer = make_optimizer(model, tc)
    g = torch.Generator(device=device).manual_seed(0)
    rows = [torch.randint(0, cfg.vocab_size, shape, device=device, generator=g) for _ in range(4)]
    batches = [(x[:, :-1], x[:, 1:]) for x in rows]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = []
    for i in range(2 + STEPS):
        sync()
        t0 = time.perf_counter()
        train_step(parallel, optimizer, lambda micro, i=i: batches[i % 4], tc)
        sync()
        seconds.append(time.perf_counter() - t0)
    cuda = device == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    reserved = torch.cuda.max_memory_reserved() if cuda else 0
    tracked = measure(parallel, optimizer, lambda micro: batches[0], tc)["total"]
    return {"seconds": seconds[2:], "peak": peak or tracked, "reserved": reserved or tracked}
