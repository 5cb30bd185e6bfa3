"""Tensor and sequence parallelism, applied to a dense model from outside with PyTorch's DTensor
plans (torchtitan's for Llama: torchtitan/models/llama3/infra/parallelize.py).

Megatron's split (Shoeybi et al. 2019, arXiv 1909.08053 §3): the first matrix of each pair is
cut by its output columns, the second by its input rows, so a pair needs one collective of its
output; between the pairs the residual stream and the norms are cut along the sequence
(sequence parallelism, Korthikanti et al. 2022, arXiv 2205.05198 §4.2.2). The embedding is cut
by rows of the vocabulary, the LM head by its columns, and the loss is computed on those
columns (`loss_parallel`: no rank gathers the logits); a vocabulary tp does not divide is
padded to a multiple of tp, as Megatron pads it, its padding masked out of the loss and never
stored (minimoe/checkpoint.py). Every rank of a tensor-parallel group sees the same tokens; an
MoE's experts are parallel by `ep` instead (minimoe/expert_parallel.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
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


def pad_vocabulary(model: nn.Module, tp: int) -> int:
    """Pad the embedding and the LM head (still on the meta device) to a multiple of tp rows,
    the LM head masking the padding out of its softmax; returns the padded size."""
    vocab = model.cfg.vocab_size
    padded = math.ceil(vocab / tp) * tp
    if padded > vocab:
        for module in (model.embed, model.lm_head):
            module.weight = nn.Parameter(torch.empty(padded, model.cfg.d_model, device="meta"))
        model.lm_head.pad_V = torch.arange(padded) >= vocab
    return padded


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block, the embedding and the LM head over `tp_mesh`, in place (parameter
    names unchanged; the split ones become DTensors)."""
    tp = tp_mesh.size()
    check_tensor_parallel(model.cfg, tp)
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan())
    pad_vocabulary(model, tp)
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    if model.lm_head.pad_V is not None:  # split as the logits' columns are
        model.lm_head.pad_V = distribute_tensor(model.lm_head.pad_V, tp_mesh, [Shard(0)])
