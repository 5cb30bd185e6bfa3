"""Distribution wrapped around the model from outside (torchtitan's `parallelize`): torchrun's
process group, the ("dp", "ep") or ("dp", "tp") mesh, and `Parallel`, the training loop's one
handle on them. Each rank takes its rows of every batch (docs/method.md, "Run folders")."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from minimoe.expert_parallel import EXPERT_WEIGHTS, apply_expert_parallel
from minimoe.moe import MoE
from minimoe.stream import barrier, rank, world_size
from minimoe.tensor_parallel import apply_tensor_parallel, check_tensor_parallel


# --- the process group ------------------------------------------------------------------
def init_from_env(device: str = "cpu") -> None:
    """Join torchrun's process group (idempotent); nothing to do in a single process."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    options = {}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's store under a prefix of this attempt: a restarted job (--max-restarts)
        # would otherwise dial the dead attempt's addresses (pytorch issue #167288)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              int(os.environ["WORLD_SIZE"]), is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        options = dict(store=dist.PrefixStore(f"minimoe/attempt_{attempt}", store),
                       rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()), **options)
    else:
        dist.init_process_group("gloo", **options)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return world_size() > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device_for(name: str) -> torch.device:
    """The device of this rank: "cuda" means the GPU torchrun's LOCAL_RANK names."""
    if name == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return torch.device(name)


_inside_main_only = False


def main_only(fn):
    """Run fn() on rank 0 only (a check, a write); every rank returns its result or raises its
    error, so none waits on one that failed. A main_only inside fn just runs."""
    global _inside_main_only
    if not is_distributed() or _inside_main_only:
        return fn()
    box = [None]
    if is_main():
        _inside_main_only = True
        try:
            box = [(True, fn())]
        except Exception as err:  # re-raised on every rank below
            box = [(False, err)]
        finally:
            _inside_main_only = False
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


# --- data and numbers -------------------------------------------------------------------
def row_slice(n: int, tp: int = 1) -> slice:
    """This rank's rows of a global batch of n: the tp ranks of a tensor-parallel group share one."""
    w, r = world_size() // tp, rank() // tp
    assert n % w == 0, (n, w)  # train() refuses such a batch size
    return slice(r * n // w, (r + 1) * n // w)


def rows(batch: torch.Tensor, tp: int = 1) -> torch.Tensor:
    return batch[row_slice(len(batch), tp)]


class RankRows:
    """The data as one rank evaluates it: its rows of every validation batch."""

    def __init__(self, data, tp: int = 1):
        self.data, self.tp = data, tp

    def __getattr__(self, name):
        return getattr(self.data, name)

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int | None = None,
                    lang: str | None = None):
        return [(rows(x, self.tp), rows(y, self.tp))
                for x, y in self.data.val_batches(batch_size, seq_len, n_batches, lang)]


def _comm_device() -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --- the mesh and the plan --------------------------------------------------------------
def build_mesh(ep: int = 1, device_type: str = "cpu", tp: int = 1) -> DeviceMesh:
    """The ("dp", "ep") mesh over every rank, or ("dp", "tp") with tensor parallelism."""
    w = world_size()
    name, size = ("tp", tp) if tp > 1 else ("ep", ep)  # TrainConfig refuses both above 1
    if w % size:
        raise ValueError(f"{name}={size!r}: must be a positive divisor of the {w} ranks")
    mesh = init_device_mesh(device_type, (w // size, size), mesh_dim_names=("dp", name))
    # every sub-mesh parallelize uses, made here once: outside FakeTensorMode (minimoe dry-run)
    # making one creates real tensors, which fake mode refuses; later lookups find them made
    mesh["dp"], mesh[name], mesh._flatten("dp_" + name)
    return mesh


def mesh_size(mesh: DeviceMesh | None, name: str) -> int:
    return mesh[name].size() if mesh is not None and name in mesh.mesh_dim_names else 1


# --- the handle -------------------------------------------------------------------------
class Parallel:
    """The training loop's one handle on distribution (as nanoGPT's loop holds its DDP model),
    from a TrainConfig's layout and a mesh (None: one process)."""

    def __init__(self, layout, mesh: DeviceMesh | None = None):
        for name in ("ep", "tp"):
            if mesh is None and getattr(layout, name) > 1:
                raise ValueError(f"TrainConfig.{name}={getattr(layout, name)}: needs torchrun "
                                 f"with a multiple of {getattr(layout, name)} processes")
        self.layout, self.mesh, self.distributed = layout, mesh, mesh is not None
        self.mode = layout.parallel if mesh is not None else "single"
        self.mixed_precision = layout.bf16 and self.mode == "fsdp"  # FSDP2 casts: no autocast
        self.device = device_for(layout.device)
        self.main, self.world = is_main(), world_size()
        self.model = self.module = None  # the model; what a step calls (the DDP wrapper)
        # gloo only: what set_gradient_divide_factor would have done to the experts' gradients
        self.expert_grad_scale = ()  # (parameters, factor)

    @classmethod
    def from_env(cls, layout) -> Parallel:
        """Join torchrun's process group (nothing to join in one process), mesh included."""
        init_from_env(layout.device)
        if not is_distributed():
            return cls(layout)
        return cls(layout, build_mesh(layout.ep, device_for(layout.device).type, layout.tp))

    def parallelize(self, model: nn.Module, fill=None) -> Parallel:
        """Apply the plan to `model` in place, in torchtitan's order: activation checkpointing and
        compile per block, tensor or expert parallelism, FSDP2 or DDP. fill() gives a meta model
        its values, before DDP (which broadcasts rank 0's) or after FSDP2 (each its shards)."""
        layout, mesh = self.layout, self.mesh
        if fill is not None and self.mode != "fsdp":
            fill()
        for block in model.layers:
            if layout.activation_checkpointing:
                checkpoint_block(block)
            if layout.compile:
                block.compile()
        self.model = self.module = model
        if mesh is not None:
            if mesh_size(mesh, "tp") > 1:  # (TrainConfig allows tp and ep with FSDP2 only)
                check_tensor_parallel(model.cfg, layout.tp, layout.seq_len)
                apply_tensor_parallel(model, mesh["tp"])
            if mesh_size(mesh, "ep") > 1:
                apply_expert_parallel(model, mesh["ep"])
            if self.mode == "ddp":
                first = next(model.parameters())
                ids = [local_rank()] if first.is_cuda else None
                # on the meta device (a dry run) there are no values to broadcast from rank 0
                self.module = DistributedDataParallel(model, device_ids=ids,
                                                      init_sync=not first.is_meta)
            else:
                self.expert_grad_scale = _fully_shard(model, mesh, self.mixed_precision)
        if fill is not None and self.mode == "fsdp":
            fill()
        return self

    def main_only(self, fn):
        return main_only(fn)

    def rows(self, n: int) -> slice | None:
        """This rank's rows of a global batch of n (None in one process: all of them)."""
        return row_slice(n, self.layout.tp) if self.distributed else None

    def val_rows(self, data) -> RankRows:
        return RankRows(data, self.layout.tp)

    def mean(self, values: dict) -> dict[str, float]:
        """Each number (a float or a 0-d tensor) averaged over the ranks: one copy to the host."""
        if not values:
            return {}
        names = sorted(values)
        device = _comm_device() if is_distributed() else "cpu"
        t = torch.stack([torch.as_tensor(values[k]).to(device, torch.float64) for k in names])
        if is_distributed():
            dist.all_reduce(t)
            t /= world_size()
        return dict(zip(names, t.tolist()))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return t
        t = t.to(_comm_device()).clone()
        dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        barrier()

    def loss_context(self):
        """Around a micro-batch's forward and backward: with tensor parallelism the loss is
        computed on each rank's columns of the logits (torch's loss_parallel)."""
        return loss_parallel() if mesh_size(self.mesh, "tp") > 1 else contextlib.nullcontext()

    def sync(self, last: bool):
        """Context of one micro-batch's forward + backward: DDP reduces on a step's last one only;
        FSDP2 after every one, or on the last only, holding each gradient whole until then."""
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last or self.layout.reduce_every_micro_batch)
        elif self.mode == "ddp" and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to a global norm (returned, on the device); with FSDP2 the gradients are DTensors,
        on two meshes when experts are parallel: each mesh's norm is reduced, then combined."""
        if self.expert_grad_scale:
            params, factor = self.expert_grad_scale
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], factor)
        if self.mode != "fsdp":
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        by_mesh: dict = {}
        for p in self.model.parameters():
            if p.grad is not None:
                by_mesh.setdefault(p.grad.device_mesh, []).append(p)
        squares = []
        for params in by_mesh.values():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
        total = torch.stack(squares).sum().sqrt()
        for params in by_mesh.values():  # one call per mesh: DTensor ops stay on one mesh
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total


def _fully_shard(model: nn.Module, mesh: DeviceMesh, mixed_precision: bool) -> tuple:
    """FSDP2 units over every rank (torchtitan's): the embedding, each block, the final norm with
    the LM head, the root; parallel experts their own unit over "dp" (replicas of the same ones)."""
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = bf16 if mixed_precision else MixedPrecisionPolicy()
    ep = mesh_size(mesh, "ep")
    # mesh["dp"]: every rank when ep == tp == 1, the data-parallel replicas of a tensor-parallel
    # split when tp > 1; with experts parallel, a 1-D mesh over the world
    everyone = mesh["dp"] if ep == 1 else mesh._flatten("dp_ep")  # made by build_mesh
    units, scale = [], ()  # scale: Parallel.expert_grad_scale's parameters
    place = shard_dim(everyone.size())
    if not model.cfg.tie_embeddings:  # a tied embedding is the head's weight: the root's
        units.append(fully_shard(model.embed, mesh=everyone, mp_policy=policy))
    for block in model.layers:
        experts = []
        if ep > 1 and isinstance(block.mlp, MoE):
            unit, params = _shard_experts(block.mlp, mesh, everyone, policy, place)
            experts, scale = [unit], scale + params
        units += [fully_shard(block, mesh=everyone, mp_policy=policy, shard_placement_fn=place),
                  *experts]
    if not model.cfg.tie_embeddings:  # backward starts here at once: no reshard in between
        fully_shard([model.norm, model.lm_head], mesh=everyone, mp_policy=policy,
                    reshard_after_forward=False)
        units.append(model.norm)  # the handle of that pair
    fully_shard(model, mesh=everyone, mp_policy=policy)
    if ep > 1:  # explicit prefetch: the all-to-all's host sync stalls FSDP2's implicit one
        for unit, after in zip(units, units[1:]):
            unit.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([unit])
    return (scale, 1.0 / ep) if scale else ()


def _shard_experts(moe: MoE, mesh: DeviceMesh, everyone: DeviceMesh, policy, place):
    # router, noise and shared expert first, over every rank: their gradients are a mean over
    # all the data, so they must not fall into the experts' unit below
    for child in (moe.router, moe.router_noise, moe.shared):
        if child is not None:
            fully_shard(child, mesh=everyone, mp_policy=policy, shard_placement_fn=place)
    unit = fully_shard(moe, mesh=mesh["dp"], mp_policy=policy,
                       shard_placement_fn=shard_dim(mesh["dp"].size()))
    # An expert's gradient already sums its whole EP group's tokens (the all-to-all's
    # backward), so the mean divides by dp x ep (torchtitan's set_gradient_divide_factor).
    # gloo lacks the PREMUL_SUM that needs with dp > 1: FSDP2 divides by dp, the step by ep.
    if dist.get_backend() == "gloo" and mesh["dp"].size() > 1:
        return unit, tuple(getattr(moe, name) for name in EXPERT_WEIGHTS)
    unit.set_gradient_divide_factor(float(mesh.size()))
    return unit, ()


def shard_dim(n: int):
    """FSDP2's shard_placement_fn over n ranks: dim 0, unless a weight has fewer rows than ranks
    (stacked experts, a router), then the first later dim n divides (as torchtitan does)."""
    def place(param):
        shape = param.to_local().shape if isinstance(param, DTensor) else param.shape
        return Shard(even_dim(shape, n) or 0)
    return place


def even_dim(shape, n: int) -> int | None:
    """shard_dim's dim for a weight of `shape` over n ranks, or None where none fits (a layout
    recipes.launch.engine_plan refuses)."""
    if len(shape) < 2 or shape[0] >= n:
        return 0
    return next((d for d in range(1, len(shape)) if shape[d] % n == 0), None)


def checkpoint_block(block: nn.Module) -> None:
    """Activation checkpointing of one block (non-reentrant): forward keeps only its input,
    backward recomputes the rest; module tree and parameter names unchanged."""
    forward = block.forward

    def recomputed(*args):
        if not torch.is_grad_enabled():  # evaluation: nothing to save
            return forward(*args)
        calls = []

        def run(*inputs):
            calls.append(1)
            try:
                return forward(*inputs)
            finally:  # (the recomputation may stop early, by an exception)
                if len(calls) > 1:  # recomputed in backward: the MoE's auxiliary losses it
                    for module in block.modules():  # recorded would keep its graph alive
                        if hasattr(module, "aux"):
                            module.aux = {}

        return checkpoint(run, *args, use_reentrant=False)

    block.forward = recomputed
