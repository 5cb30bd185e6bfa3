"""`minimoe dry-run RECIPE`: a full-size recipe's parallel plan applied for real, on this machine.

The model is built on the meta device (shapes only, no memory), and a CPU gloo process group is
spawned here; every rank applies the recipe's plan with the training code's own
`dist.parallelize` (expert parallelism, FSDP2 or DDP), gives each parameter a gradient and
takes one AdamW step, all on meta tensors, then measures what it holds: parameters, weights,
gradients and optimizer moments (the bytes of its local shards, FSDP2's padding included).
That is set beside the cost simulator's estimate for the same layout (minimoe.sim.cost,
`simulate(...).memory`, priced as this path runs: minimoe.recipes.launch.ENGINE_OPTIONS).

A run of 1,024 ranks cannot be spawned on one machine, so the group has few ranks: the
recipe's expert- and tensor-parallel degrees times 2 (each group's weights split over 2
replicas, as the recipe splits them over gpus / ep or gpus / tp), or 2 for a plain dense model. FSDP2 places every shard
by one rule (torch.chunk: ceil(rows / ranks) per rank, the last ranks padded), so the dry run
checks that the rule gives exactly what the ranks measured, then evaluates the same rule for
the recipe's own number of ranks, beside the simulator at that size.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from minimoe import dist
from minimoe import files
from minimoe.expert_parallel import EXPERT_WEIGHTS
from minimoe.model import build_model
from minimoe.moe import MoE
from minimoe.recipes.launch import ENGINE_OPTIONS, engine_plan, load_launch_recipe
from minimoe.sim.cost import simulate
from minimoe.sim.hardware import get_device
from minimoe.sim.search import plan
from minimoe.tensor_parallel import tp_shard_dims
from minimoe.train import TrainConfig, make_optimizer

PARTS = ("weights", "grads", "optimizer")
FP32 = 4  # FSDP2 keeps fp32 shards; bf16 exists only for the block being computed


def local_ranks(ep: int, tp: int = 1) -> int:
    return 2 * ep * tp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(t: torch.Tensor, storage: bool) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    if storage:  # what FSDP2 allocated for the shard, its padding included
        return local.untyped_storage().nbytes()
    return local.numel() * local.element_size()


def _rank(rank: int, world: int, port: int, recipe_path: str, out: str):
    """One rank of the dry run: the plan on meta tensors, then what this rank holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    recipe = load_launch_recipe(recipe_path)
    layout = recipe.layout
    model = build_model(recipe.model_config, device="meta")
    dist.parallelize(model, dist.build_mesh(layout.ep, tp=layout.tp), layout.parallel,
                     mixed_precision=recipe.train.bf16 and layout.parallel == "fsdp",
                     activation_checkpointing=layout.activation_checkpointing)
    params = list(model.parameters())
    held = {"params": sum(_local_bytes(p, False) // p.element_size() for p in params),
            "weights": sum(_local_bytes(p, True) for p in params)}
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = make_optimizer(model, TrainConfig())
    optimizer.step()  # AdamW allocates its moments, on meta: shapes only
    held["grads"] = sum(_local_bytes(p.grad, False) for p in params)
    held["optimizer"] = sum(_local_bytes(v, False) for state in optimizer.state.values()
                            for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    files.write_json(Path(out, f"rank_{rank}.json"), held)
    dist.shutdown()


def fsdp_rule(recipe, ranks: int) -> dict[str, int]:
    """Parameters and bytes of the fullest rank when `ranks` ranks run the recipe's plan, by
    FSDP2's placement rule: ceil(rows / group) of each parameter's sharded dim, the group being
    every rank (or, for experts split over ep ranks, the ranks / ep replicas of each group),
    after tensor parallelism has split its dim (tp_shard_dims) over tp, the group then being
    the ranks / tp replicas."""
    layout = recipe.layout
    model = build_model(recipe.model_config, device="meta")
    experts = {id(getattr(m, name)) for m in model.modules() if isinstance(m, MoE)
               for name in EXPERT_WEIGHTS} if layout.ep > 1 else set()
    split = tp_shard_dims(model.cfg, layout.tp) if layout.tp > 1 else {}
    fsdp = layout.parallel == "fsdp"
    numel = 0
    for name, p in model.named_parameters():
        shape = list(p.shape)
        group = ranks // layout.tp if fsdp else 1
        # tp_shard_dims names the root's parameters whole ("embed.weight") and a block's from
        # inside the block ("attn.q_proj.weight" of "layers.3.attn.q_proj.weight")
        tp_dim = split.get(name, split.get(name.split(".", 2)[-1]))
        if tp_dim is not None:
            shape[tp_dim] //= layout.tp
        dim = 0
        if id(p) in experts:
            shape[0] //= layout.ep
            group = ranks // layout.ep
            dim = dist.expert_shard_dim(tuple(shape), group)
        shape[dim] = math.ceil(shape[dim] / group)
        numel += math.prod(shape)
    return {"params": numel, "weights": FP32 * numel, "grads": FP32 * numel,
            "optimizer": 2 * FP32 * numel}


def simulated(recipe, ranks: int) -> dict[str, float]:
    """The simulator's memory per GPU for the recipe's layout on `ranks` GPUs."""
    layout = recipe.layout.sim_layout()
    layout = type(layout)(**{**layout.__dict__, "dp": ranks // recipe.layout.tp})
    return simulate(recipe.workload, layout, get_device(recipe.layout.gpu),
                    ENGINE_OPTIONS).memory


def dry_run(recipe_path, ranks: int | None = None) -> dict:
    """Spawn the ranks, measure them, and compare; returns every figure (bytes per rank)."""
    recipe = load_launch_recipe(recipe_path)
    ranks = ranks or local_ranks(recipe.layout.ep, recipe.layout.tp)
    for name in ("ep", "tp"):
        if ranks % getattr(recipe.layout, name):
            raise ValueError(f"ranks={ranks}: must be a multiple of the recipe's "
                             f"{name}={getattr(recipe.layout, name)}")
    with tempfile.TemporaryDirectory(prefix="minimoe-dry-run-") as tmp:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
        mp.start_processes(_rank, args=(ranks, _free_port(), str(recipe_path), tmp), nprocs=ranks,
                           start_method="spawn")
        measured = [json.loads(Path(tmp, f"rank_{r}.json").read_text()) for r in range(ranks)]
    fullest = {k: max(m[k] for m in measured) for k in measured[0]}
    result = {"recipe": recipe.name, "ranks": ranks, "gpus": recipe.layout.gpus,
              "measured": fullest, "rule_here": fsdp_rule(recipe, ranks),
              "rule_full": fsdp_rule(recipe, recipe.layout.gpus),
              "sim_here": simulated(recipe, ranks), "sim_full": simulated(recipe, recipe.layout.gpus)}
    layout, sim = engine_plan(recipe)
    full = plan(recipe.workload.cfg, get_device(recipe.layout.gpu), recipe.layout.cluster_gpus
                or recipe.layout.gpus, recipe.train.batch_tokens, recipe.train.seq_len,
                options=ENGINE_OPTIONS)
    result["engine_plan_matches"] = layout == recipe.layout
    result["plan_fastest"] = (full.fastest.layout.label(), full.fastest.n_gpus,
                              full.fastest.time["step_time"], sim.time["step_time"])
    return result


def states(figures: dict) -> float:
    return sum(figures[k] for k in PARTS)


def dry_run_report(r: dict) -> str:
    gb = 1e9
    lines = [f"dry run of {r['recipe']}: the plan on meta tensors in {r['ranks']} gloo ranks; "
             f"per rank (the fullest), model states in GB",
             f"{'':32s}{'params':>14s}{'weights':>9s}{'grads':>9s}{'optim':>9s}{'states':>9s}"
             f"{'simulator':>11s}{'ratio':>7s}"]
    rows = [(f"measured, {r['ranks']} ranks", r["measured"], r["sim_here"]),
            (f"FSDP2's rule, {r['ranks']} ranks", r["rule_here"], r["sim_here"]),
            (f"FSDP2's rule, {r['gpus']} ranks", r["rule_full"], r["sim_full"])]
    for name, f, sim in rows:
        lines.append(f"{name:32s}{f['params']:14,d}" + "".join(f"{f[k] / gb:9.3f}" for k in PARTS)
                     + f"{states(f) / gb:9.3f}{states(sim) / gb:11.3f}{states(f) / states(sim):7.3f}")
    exact = all(r["rule_here"][k] >= r["measured"][k] >= r["rule_here"][k] * 0.999
                for k in ("params", "weights"))
    lines.append(f"the rule {'reproduces' if exact else 'does NOT reproduce'} the measured shards; "
                 f"simulator at {r['gpus']} GPUs: activations {r['sim_full']['activations'] / gb:.1f}"
                 f" GB, total {r['sim_full']['memory'] / gb:.1f} of {r['sim_full']['usable'] / gb:.0f}"
                 " GB usable")
    label, n, fastest, ours = r["plan_fastest"]
    lines.append(f"layout: {'the' if r['engine_plan_matches'] else 'NOT the'} fastest this torchrun "
                 f"path runs ({ours:.2f} s/step); minimoe plan's fastest of all: {label} on {n} "
                 f"GPUs, {fastest:.2f} s/step")
    return "\n".join(lines)
