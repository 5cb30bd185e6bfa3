"""Tensor and sequence parallelism, applied to a dense model from outside with PyTorch's DTensor
plans (torchtitan's for Llama: torchtitan/models/llama3/infra/parallelize.py).

Megatron's split of a transformer layer (Shoeybi et al. 2019, arXiv 1909.08053 §3): the first
matrix of each pair is cut by its output columns, the second by its input rows, so a pair needs
one collective of its output and nothing in between. Between the pairs the residual stream,
the RMSNorms and the residual adds are cut along the sequence instead (sequence parallelism,
Korthikanti et al. 2022, arXiv 2205.05198 §4.2.2): a pair's input is all-gathered from the
sequence shards and its output reduce-scattered back to them, the same bytes as an all-reduce.

    attention   q_proj, k_proj, v_proj by columns (each rank keeps n_heads / tp query heads
                and n_kv_heads / tp KV heads, biases included), o_proj by rows
    MLP         gate_proj, up_proj by columns, down_proj by rows
    norms       attn_norm, mlp_norm and the final norm on the rank's sequence shard
    vocabulary  the embedding by rows of the vocabulary, the LM head by its columns (gathered
                whole for the loss); replicated instead when tp does not divide the vocabulary

Every rank of a tensor-parallel group sees the same tokens (`minimoe.dist.row_slice` gives
them the same rows). The MoE layers' experts are parallel by `ep` instead
(minimoe/expert_parallel.py); a model with MoE layers is refused here.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_plan() -> dict:
    """Each block's split: sequence shards between the pairs, whole sequences inside them."""
    gathered = dict(input_layouts=(Shard(1), None, None, None),  # x (and cos, sin, cache)
                    desired_input_layouts=(Replicate(), None, None, None))
    return {
        "attn_norm": SequenceParallel(), "attn": PrepareModuleInput(**gathered),
        "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
    }


def check_tensor_parallel(cfg, tp: int, seq_len: int | None = None) -> None:
    """Refuse, naming the field, a model (and sequence length) that `tp` ranks cannot split."""
    for name in ("n_heads", "n_kv_heads", "d_ffn"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"tp={tp}: must divide {name}={getattr(cfg, name)}")
    if seq_len is not None and seq_len % tp:
        raise ValueError(f"tp={tp}: must divide seq_len={seq_len} (sequence parallelism)")
    if cfg.is_moe:
        raise ValueError(f"tp={tp}: tensor parallelism runs dense models; an MoE's experts are "
                         "split by ep")
    if cfg.tie_embeddings:
        raise ValueError(f"tp={tp}: the embedding and the LM head are split differently, so "
                         "tied embeddings cannot be")


def splits_vocabulary(cfg, tp: int) -> bool:
    return cfg.vocab_size % tp == 0


def tp_shard_dims(cfg, tp: int) -> dict[str, int]:
    """Which dim of each parameter the plan splits over tp, by the name's ending (a block's)
    or whole name: columns are dim 0 of a Linear's weight and its bias, rows dim 1; the
    embedding splits its vocabulary rows (dim 0). What is not named stays whole."""
    dims = {}
    for name, style in block_plan().items():
        if isinstance(style, ColwiseParallel):
            dims.update({f"{name}.weight": 0, f"{name}.bias": 0})
        elif isinstance(style, RowwiseParallel):
            dims[f"{name}.weight"] = 1
    if splits_vocabulary(cfg, tp):
        dims.update({"embed.weight": 0, "lm_head.weight": 0})
    return dims


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block, the embedding and the LM head over `tp_mesh`, in place (parameter
    names unchanged; the split ones become DTensors)."""
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan())
    vocab = splits_vocabulary(model.cfg, tp)
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)) if vocab
        else PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()) if vocab
        else PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                use_local_output=True),
    })
