"""Memory per GPU of minimoe's own torchrun path (FSDP2), as `minimoe dry-run` tracks it, on numpy
arrays of layouts: `Options.memory_model = "minimoe"` (docs/simulator.md "Memory")."""

from __future__ import annotations

import numpy as np

LOSS_CHUNK_LOGITS = 2**27  # minimoe.model.LOSS_CHUNK_LOGITS (the simulator imports no torch)
PARTS = ("weights", "grads", "optimizer", "activations")


class MemoryStats:
    """Per-token and per-parameter numbers of a model the formulas need (floats)."""

    def __init__(self, cfg, opt, param_counts: dict):
        h, hd = cfg.d_model, cfg.head_dim
        kv, a = cfg.n_kv_heads * hd, cfg.n_heads
        self.L, self.n_moe, self.h, self.hd, self.V = cfg.n_layers, cfg.n_moe_layers, h, hd, cfg.vocab_size
        self.vocab_mats = 1 if cfg.tie_embeddings else 2
        self.expert_params = param_counts["experts"]
        self.layer_params = (param_counts["total"] - param_counts["experts"]
                             - param_counts["embedding"] - param_counts["lm_head"]) / cfg.n_layers
        k, fe, E = cfg.top_k, cfg.expert_d_ffn or cfg.d_ffn, cfg.n_experts
        b = opt.act_bytes
        # --- minimoe: what autograd saves per token in model.py and moe.py under FSDP2's bf16
        # compute, as the rehearsal's tracker counts it (docs/simulator.md#memory)
        scale = b / 2  # the counts are for bf16 (act_bytes 2); fp32 compute doubles them
        common = 20 * h + 4 * kv + 4 * hd + 4 * a + 8
        self.dense_layer = scale * (common + 8 * cfg.d_ffn)
        self.moe_layer = scale * (common + k * (8 * fe + 6 * h + 30) + 8 * E + 12
                                  + 8 * cfg.shared_d_ffn)
        self.tp_whole = scale * (4 * h + 4 * hd)  # gathered from the sequence shards: not / tp
        self.block_input, self.outside = scale * 2 * h, scale * 8 * h  # + the final norm, embedding
        self.is_moe = bool(self.n_moe)


def torchrun_memory(ms: MemoryStats, opt, tp, dp, ep, zero, mb, rc, s, n_micro) -> dict:
    """FSDP2 over dp (the dense weights, split by tp first) and dp / ep (each expert slice);
    `minimoe dry-run` measures the same parts (recipes/dry_run.py PARTS). Returns the PARTS per
    GPU, in bytes, elementwise."""
    out, h = {}, ms.h
    tokens = mb * s  # a rank's tokens; tensor-parallel ranks see the same ones
    vocab = np.ceil(ms.V / tp) * tp  # padded to a multiple of tp (minimoe/tensor_parallel.py)
    p_dense = ms.L * ms.layer_params / tp + ms.vocab_mats * vocab * h / tp
    p_expert = ms.expert_params / ep
    sharded = np.where(zero >= 3, p_dense / dp + p_expert / (dp / ep), p_dense + p_expert)
    out["weights"], out["optimizer"] = 4 * sharded, 8 * sharded
    whole = p_dense + p_expert  # gradients reduced once per step are held whole until then
    held_whole = np.logical_not(opt.reduce_every_micro_batch) & (n_micro > 1)
    out["grads"] = 4 * np.where(held_whole | (zero < 3), whole, sharded)
    # what the peak holds besides the states: per token, every layer's saved activations, or
    # with checkpointing every block's input; the embedding's output and the final norm's
    layer = (ms.n_moe * ms.moe_layer + (ms.L - ms.n_moe) * ms.dense_layer) / ms.L
    layer = (layer - ms.tp_whole) / tp + ms.tp_whole
    kept = np.where(rc == 2, ms.L * ms.block_input / tp, ms.L * layer) + ms.outside / tp
    # (a) the LM head's backward ends: its weight gathered in bf16, its gradient in bf16 and as
    # the reduction's copy, and a loss chunk; under tensor parallelism the rehearsal tracks 5
    # bytes per head weight there, not 4 + 4 (its peak comes before the reduction's copy)
    head = vocab * h / tp
    at_head = head * np.where(tp > 1, 5, 4 + opt.reduce_bytes) + LOSS_CHUNK_LOGITS * 4 / tp
    # (b) checkpointing: the top block recomputed, with its backward's gradients (1.13 x its
    # activations, the share the rehearsal measures), its weights gathered in bf16
    block = 2 * (ms.layer_params / tp + ms.expert_params / ms.L / ep)
    top = (np.maximum(ms.moe_layer if ms.is_moe else 0, ms.dense_layer) - ms.tp_whole) / tp
    in_block = 1.13 * tokens * (top + ms.tp_whole) + block
    out["activations"] = tokens * kept + np.where(rc == 2, np.maximum(at_head, in_block), at_head)
    return out
