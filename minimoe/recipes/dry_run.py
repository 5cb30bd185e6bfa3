"""`minimoe dry-run RECIPE`: one training step of a full-size recipe rehearsed on this CPU, on a
fake process group with fake tensors, its peak memory beside the simulator's (docs/recipes.md)."""

from __future__ import annotations

import contextlib
import dataclasses
from copy import deepcopy

import torch
import torch.distributed as torch_dist
import torch.distributed.tensor._sharding_prop as sharding_prop
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from minimoe import dist
from minimoe.model import build_model
from minimoe.recipes.launch import engine_plan, load_launch_recipe, train_config
from minimoe.sim.hardware import get_device
from minimoe.train import make_optimizer, plan, train_step

# the tracker's categories, gathered into the parts a reader compares with the simulator
PARTS = {"weights": ("Sharded Param", "Buffer", "Parameter"),
         "working weights": ("Unsharded Param", "All Gather"),
         "grads": ("Sharded Grad", "Unsharded Grad", "Reduce Scatter", "Gradient"),
         "optimizer": ("OptState", "Optstate"), "activations": ("Activation", "Inputs"),
         "temporaries": ("Temp", "Other")}


class PeakTracker(FSDPMemTracker):
    """FSDPMemTracker keeping the rank's peak only: its per-module peaks cost a pass over every
    module at every operation, which at full size is most of the rehearsal's time."""

    def _update_peak_stats(self, peak_state) -> None:
        for device, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snap["Total"]:
                self._peak_mem[device], self._peak_mem_snap[device] = snap["Total"], deepcopy(snap)


def measure(parallel: dist.Parallel, optimizer, batch, tc) -> dict[str, int]:
    """Bytes this rank holds at its peak in one `train_step`, by category (PARTS, "total")."""
    for p in parallel.model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW makes its states
    if not tc.reduce_every_micro_batch:  # sharded gradients appear at the step's end only
        optimizer.zero_grad(set_to_none=True)
    micro = 1 if tc.reduce_every_micro_batch else 2
    tc = dataclasses.replace(tc, grad_accum=micro)
    if parallel.mode == "fsdp":
        tracker = PeakTracker(parallel.model, optimizer)
    else:  # one process or DDP (`minimoe bench dist`)
        tracker = MemTracker()
        tracker.track_external(parallel.model, optimizer)
    with tracker:
        train_step(parallel, optimizer, batch, tc)
    snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    named = {str(k.value if hasattr(k, "value") else k): v for k, v in snap.items()}
    out = {part: sum(named.get(c, 0) for c in cats) for part, cats in PARTS.items()}
    out["total"] = named["Total"]
    return out


@contextlib.contextmanager
def _propagation_apart():
    """DTensor's sharding propagation in a fake mode of its own, which the tracker ignores
    (torch/distributed/tensor/_sharding_prop.py takes the active one, if any)."""
    detect = sharding_prop.detect_fake_mode
    sharding_prop.detect_fake_mode = lambda *args: None
    try:
        yield
    finally:
        sharding_prop.detect_fake_mode = detect


@contextlib.contextmanager
def fake_world(world: int):
    """A fake process group of `world` ranks in this process, this process being rank 0."""
    torch_dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def rehearse(recipe) -> dict[str, int]:
    """The recipe's step on a fake world: rank 0's peak bytes by category."""
    layout, cfg, tc = recipe.layout, recipe.model_config, train_config(recipe)
    if layout.parallel != "fsdp":
        raise ValueError(f"{recipe.name}: parallel={layout.parallel!r}: the rehearsal runs FSDP2 "
                         "layouts (DDP's reducer is C++ and cannot run on fake tensors)")
    with fake_world(layout.gpus):
        mesh = dist.build_mesh(layout.ep, "cpu", layout.tp)
        model = build_model(cfg, device="meta")
        parallel = plan(model, tc, mesh)  # on meta, outside fake mode: it builds meshes
        with FakeTensorMode(allow_non_fake_inputs=True), _propagation_apart():
            model.to_empty(device="cpu")
            optimizer = make_optimizer(model, tc)
            shape = (layout.micro_batch, tc.seq_len)  # this rank's rows of a micro-batch

            def batch(micro):
                return (torch.randint(0, cfg.vocab_size, shape),) * 2

            return measure(parallel, optimizer, batch, tc)


def dry_run(recipe_path) -> dict:
    """Rehearse a recipe and price it; every figure in bytes per GPU."""
    recipe = load_launch_recipe(recipe_path)
    rehearsed = rehearse(recipe)
    sim = recipe.simulated
    layout = recipe.layout
    parts = [layout.parallel.upper().replace("FSDP", "FSDP2")]
    parts += [f"{name} {getattr(layout, name)}" for name in ("tp", "ep") if getattr(layout, name) > 1]
    parts.append(f"micro-batch {layout.micro_batch}")
    if layout.activation_checkpointing:
        parts.append("activation checkpointing")
    return {"recipe": recipe.name, "gpus": layout.gpus, "layout": ", ".join(parts),
            "rehearsed": rehearsed, "simulated": sim.memory, "tokens_per_s": sim.tokens_per_s,
            "capacity": get_device(layout.gpu).hbm_bytes, "usable": sim.memory["usable"],
            "engine_plan_matches": engine_plan(recipe)[0] == layout}


def dry_run_report(r: dict) -> str:
    gb = 1e9
    rehearsed, sim = r["rehearsed"], r["simulated"]
    lines = [f"dry run of {r['recipe']} ({r['layout']}, {r['gpus']} GPUs): one training step "
             "rehearsed on a fake process group, rank 0's peak in GB"]
    lines += [f"  {part:18s}{rehearsed[part] / gb:9.2f}" for part in PARTS]
    peak, usable = rehearsed["total"], r["usable"]
    lines.append(f"  {'peak':18s}{peak / gb:9.2f}   of {r['capacity'] / gb:.0f} GB: "
                 f"{'fits' if peak <= usable else 'does NOT fit'} with a 10% margin "
                 f"({usable / gb:.0f} GB)")
    lines.append(f"  simulator: {sim['memory'] / gb:.2f} GB ({sim['memory'] / peak - 1:+.1%}), "
                 f"{r['tokens_per_s']:,.0f} tokens/s predicted; layout "
                 f"{'is' if r['engine_plan_matches'] else 'is NOT'} the simulator's choice")
    return "\n".join(lines)


def dry_run_table(results: list[dict]) -> str:
    """The README's table of the recipes (Markdown)."""
    lines = ["| recipe | GPUs | layout | rehearsed peak GB | simulated peak GB | predicted tokens/s |",
             "|---|--:|---|--:|--:|--:|"]
    for r in results:
        lines.append(f"| {r['recipe']} | {r['gpus']:,} | {r['layout']} | "
                     f"{r['rehearsed']['total'] / 1e9:.1f} | {r['simulated']['memory'] / 1e9:.1f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)
