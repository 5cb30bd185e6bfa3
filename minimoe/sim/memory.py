"""Memory per GPU of minimoe's own torchrun path (FSDP2), as `minimoe dry-run` tracks it, on numpy
arrays of layouts: `Options.memory_model = "minimoe"` (docs/simulator.md "Memory")."""

from __future__ import annotations

import numpy as np

LOSS_CHUNK_LOGITS = 2**27  # minimoe.model.LOSS_CHUNK_LOGITS (the simulator imports no torch)
PARTS = ("weights", "grads", "optimizer", "activations")


class MemoryStats:
    """Bytes per token minimoe's model keeps (the parameter counts are WorkloadStats')."""

    def __init__(self, cfg, opt):
        h, hd = cfg.d_model, cfg.head_dim
        kv, a = cfg.n_kv_heads * hd, cfg.n_heads
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


def torchrun_memory(st, opt, tp, dp, ep, zero, mb, rc, n_micro) -> dict:
    """FSDP2 over dp (the dense weights, split by tp first) and dp / ep (each expert slice) of
    WorkloadStats `st`: the PARTS `minimoe dry-run` measures, bytes per GPU, elementwise."""
    out, ms, h, L = {}, st.memory, st.d, st.n_layers
    tokens = mb * st.s  # a rank's tokens; tensor-parallel ranks see the same ones
    vocab = np.ceil(st.V / tp) * tp  # padded to a multiple of tp (minimoe/tensor_parallel.py)
    p_dense = L * st.layer_params / tp + st.vocab_mats * vocab * h / tp
    p_expert = st.expert_params / ep
    sharded = np.where(zero >= 3, p_dense / dp + p_expert / (dp / ep), p_dense + p_expert)
    out["weights"], out["optimizer"] = 4 * sharded, 8 * sharded
    whole = p_dense + p_expert  # gradients reduced once per step are held whole until then
    held_whole = np.logical_not(opt.reduce_every_micro_batch) & (n_micro > 1)
    out["grads"] = 4 * np.where(held_whole | (zero < 3), whole, sharded)
    # what the peak holds besides the states: per token, every layer's saved activations, or
    # with checkpointing every block's input; the embedding's output and the final norm's
    layer = (st.n_moe * ms.moe_layer + (L - st.n_moe) * ms.dense_layer) / L
    layer = (layer - ms.tp_whole) / tp + ms.tp_whole
    kept = np.where(rc == 2, L * ms.block_input / tp, L * layer) + ms.outside / tp
    # (a) the LM head's backward ends: its weight gathered in bf16, its gradient in bf16 and as
    # the reduction's copy, and a loss chunk; under tensor parallelism the rehearsal tracks 5
    # bytes per head weight there, not 4 + 4 (its peak comes before the reduction's copy)
    head = vocab * h / tp
    at_head = head * np.where(tp > 1, 5, 4 + opt.reduce_bytes) + LOSS_CHUNK_LOGITS * 4 / tp
    # (b) checkpointing: the top block recomputed, with its backward's gradients (1.13 x its
    # activations, the share the rehearsal measures), its weights gathered in bf16
    block = 2 * (st.layer_params / tp + st.expert_params / L / ep)
    top = (np.maximum(ms.moe_layer if st.n_moe else 0, ms.dense_layer) - ms.tp_whole) / tp
    in_block = 1.13 * tokens * (top + ms.tp_whole) + block
    out["activations"] = tokens * kept + np.where(rc == 2, np.maximum(at_head, in_block), at_head)
    return out
