"""Expert parallelism: each rank of an expert-parallel group holds E/ep experts of every MoE
layer, and the tokens travel to their experts and back (GShard, arXiv 2006.16668 §2.2; the
dispatch/combine of torchtitan's ExpertParallel, torchtitan/distributed/expert_parallel.py).

Applied from outside the model: `apply_expert_parallel` turns each MoE layer's stacked expert
weights (E, D, F) into DTensors sharded on the expert dimension over the "ep" mesh (each rank
keeps its E/ep slice; checkpoints still see the whole (E, D, F) tensor) and sets the layer's
`expert_runner` (the seam in minimoe/moe.py) to an `ExpertDispatch`. The router, the sort of
the token-expert pairs and the combine stay the layer's own code; only "run the experts on
these sorted pairs" changes:

    1. count_E -> rows for each rank (its E/ep experts' counts), and the counts exchanged
       (all_to_all_single of E integers), so each rank knows what it will receive
    2. the rows sent with all_to_all_single and explicit, uneven split sizes
    3. the received rows (grouped by source rank, then expert) regrouped by local expert, run
       through the local experts (moe.expert_ffn), put back in arrival order
    4. the results sent back with the split sizes swapped

Autograd flows through `AllToAll`, whose backward is the same exchange in the other direction,
so a rank's expert weights receive the gradient of every token any rank of its group sent
them. That is ep times a data-parallel replica's share; minimoe/dist.py divides the experts'
reduction by the whole world size to make it the mean (as torchtitan's
set_gradient_divide_factor does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from minimoe.moe import MoE, expert_ffn, moe_layers, to_host

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


class AllToAll(torch.autograd.Function):
    """all_to_all_single with explicit split sizes, differentiable: the gradient of what rank
    r received from rank s goes back to s (the splits swap). Written here because the list
    form of all_to_all fails on gloo when sizes differ, and torch.distributed.nn's version is
    deprecated in torch 2.13."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return AllToAll.apply(x, out_splits, in_splits, group)


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a stacked weight (the local shard of its DTensor)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


class ExpertDispatch:
    """MoE.expert_runner on one rank of an expert-parallel group: (moe, x_SD, count_E) -> y_SD,
    equal to moe.experts(x_SD, count_E) run in one process."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        if n_experts % self.ep:
            raise ValueError(f"ep={self.ep}: must divide n_experts={n_experts}")
        self.n_local = n_experts // self.ep

    def __call__(self, moe: MoE, x_SD: torch.Tensor, count_E: torch.Tensor) -> torch.Tensor:
        ep, L = self.ep, self.n_local
        # rank r holds experts r*L .. r*L+L-1, so the sorted pairs are already in rank order
        send_RL = count_E.view(ep, L)
        recv_RL = torch.empty_like(send_RL)  # recv_RL[s, l]: pairs rank s sends my expert l
        dist.all_to_all_single(recv_RL, send_RL.contiguous(), group=self.group)
        # the layer's one host sync: the split sizes both ways (moe.to_host)
        sizes = to_host(torch.cat([send_RL.sum(1), recv_RL.sum(1)]), 2 * len(x_SD))
        in_splits, out_splits = sizes[:ep], sizes[ep:]
        x_recv = all_to_all(x_SD, out_splits, in_splits, self.group)

        # arrival order is (source rank, local expert); the experts want (local expert, source)
        segment = torch.repeat_interleave(torch.arange(ep * L, device=x_SD.device),
                                          recv_RL.reshape(-1), output_size=len(x_recv))
        by_expert = torch.argsort((segment % L) * ep + segment // L, stable=True)
        weights = [local_weight(getattr(moe, name)) for name in EXPERT_WEIGHTS]
        y_sorted = expert_ffn(x_recv[by_expert], recv_RL.sum(0), *weights)
        arrival = torch.empty_like(by_expert)
        arrival[by_expert] = torch.arange(len(by_expert), device=by_expert.device)
        return all_to_all(y_sorted[arrival], in_splits, out_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[MoE]:
    """Shard every MoE layer's experts over `ep_mesh` (1-D) and route its pairs through it.

    The weights become DTensors Shard(0) over the mesh: rank r keeps experts r*E/ep ... of the
    tensor rank 0 holds (distribute_tensor scatters rank 0's values, so every rank agrees).
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"ep={ep_mesh.size()}: the model has no MoE layer to split over "
                         "expert-parallel ranks; use ep=1")
    for moe in layers:
        dispatch = ExpertDispatch(ep_mesh.get_group(), moe.n_experts)
        for name in EXPERT_WEIGHTS:
            weight = getattr(moe, name)
            source = None if weight.is_meta else 0  # meta (dry run): nothing to send
            sharded = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)], src_data_rank=source)
            setattr(moe, name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        moe.expert_runner = dispatch
    return layers
