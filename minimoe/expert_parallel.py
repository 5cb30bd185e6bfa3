"""Expert parallelism: each rank of an expert-parallel group holds E/ep experts of every MoE
layer, and the token-expert pairs travel to their experts and back by all_to_all_single with
uneven splits (GShard; torchtitan's dispatch and combine; docs/method.md, "Distribution")."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from minimoe.moe import MoE, expert_ffn, moe_layers, to_host

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


class AllToAll(torch.autograd.Function):
    """all_to_all_single with explicit split sizes, differentiable (backward swaps the splits):
    the list form fails on gloo with uneven sizes; torch.distributed.nn's is deprecated in 2.13."""

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
        x_recv = AllToAll.apply(x_SD, out_splits, in_splits, self.group)

        # arrival order is (source rank, local expert); the experts want (local expert, source)
        segment = torch.repeat_interleave(torch.arange(ep * L, device=x_SD.device),
                                          recv_RL.reshape(-1), output_size=len(x_recv))
        by_expert = torch.argsort((segment % L) * ep + segment // L, stable=True)
        weights = [getattr(moe, name).to_local() for name in EXPERT_WEIGHTS]  # this rank's experts
        y_sorted = expert_ffn(x_recv[by_expert], recv_RL.sum(0), *weights)
        arrival = torch.empty_like(by_expert)
        arrival[by_expert] = torch.arange(len(by_expert), device=by_expert.device)
        return AllToAll.apply(y_sorted[arrival], in_splits, out_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` (1-D) and route its pairs through it:
    rank r keeps experts r*E/ep ... of rank 0's tensor (distribute_tensor scatters rank 0's)."""
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
