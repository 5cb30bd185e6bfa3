"""Tensor parallelism, applied to a dense model from outside with PyTorch's DTensor plans.

Megatron's split of a transformer layer (Shoeybi et al. 2019, arXiv 1909.08053 §3): the
first matrix of each pair is cut by its output columns, the second by its input rows, so a
pair needs one reduction of its output and nothing in between.

    attention   q_proj, k_proj, v_proj by columns (each rank keeps n_heads / tp query heads
                and n_kv_heads / tp KV heads, biases included), o_proj by rows
    MLP         gate_proj, up_proj by columns, down_proj by rows
    vocabulary  the embedding by rows of the vocabulary and the LM head by its columns, each
                gathered whole again (torchtitan's plan for tok_embeddings and output)

Every rank of a tensor-parallel group sees the same tokens (`minimoe.dist.row_slice` gives
them the same rows), and the residual stream between the pairs is whole on each rank: this is
tensor parallelism without sequence parallelism. The MoE layers' experts are parallel by
`ep` instead (minimoe/expert_parallel.py); a model with MoE layers is refused here.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from minimoe.moe import MoE

BLOCK_PLAN = {
    "attn.q_proj": ColwiseParallel, "attn.k_proj": ColwiseParallel,
    "attn.v_proj": ColwiseParallel, "attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel, "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


def check_tensor_parallel(cfg, tp: int) -> None:
    """Refuse, naming the field, a model that `tp` ranks cannot split."""
    for name in ("n_heads", "n_kv_heads", "d_ffn", "vocab_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"tp={tp}: must divide {name}={getattr(cfg, name)}")
    if cfg.is_moe:
        raise ValueError(f"tp={tp}: tensor parallelism runs dense models; an MoE's experts are "
                         "split by ep")
    if cfg.tie_embeddings:
        raise ValueError(f"tp={tp}: the embedding and the LM head are split differently, so "
                         "tied embeddings cannot be")


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block's matrices, the embedding and the LM head over `tp_mesh`, in place
    (parameter names unchanged; the split ones become DTensors)."""
    check_tensor_parallel(model.cfg, tp_mesh.size())
    for block in model.layers:
        assert not isinstance(block.mlp, MoE)
        parallelize_module(block, tp_mesh, {name: style() for name, style in BLOCK_PLAN.items()})
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
