"""Tensor and sequence parallelism of a dense model, applied from outside with PyTorch's DTensor
plans (Megatron's split, torchtitan's plan; docs/method.md, "Distribution")."""

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


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split every block, the embedding and the LM head over `tp_mesh`, in place (parameter
    names unchanged; the split ones become DTensors). check_tensor_parallel ran at the door."""
    # each block: sequence shards between the pairs, whole sequences inside them
    gathered = dict(input_layouts=(Shard(1), None, None, None),  # x (and cos, sin, cache)
                    desired_input_layouts=(Replicate(), None, None, None))
    for block in model.layers:
        parallelize_module(block, tp_mesh, {
            "attn_norm": SequenceParallel(), "attn": PrepareModuleInput(**gathered),
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(), "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    # the vocabulary padded to a multiple of tp rows (still on the meta device), the LM head
    # masking the padding out of its softmax
    vocab, tp = model.cfg.vocab_size, tp_mesh.size()
    padded = math.ceil(vocab / tp) * tp
    if padded > vocab:
        for module in (model.embed, model.lm_head):
            module.weight = nn.Parameter(torch.empty(padded, model.cfg.d_model, device="meta"))
        model.lm_head.pad_V = torch.arange(padded) >= vocab
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    if model.lm_head.pad_V is not None:  # split as the logits' columns are
        model.lm_head.pad_V = distribute_tensor(model.lm_head.pad_V, tp_mesh, [Shard(0)])
