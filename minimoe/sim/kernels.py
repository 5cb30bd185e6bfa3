"""How long one kernel or collective takes, on numpy arrays: a GEMM by its shape, flash attention,
ring and tree collectives, the MoE all-to-all by dispatcher (docs/simulator.md "Kernels")."""

from __future__ import annotations

import numpy as np

QUERY_TILE = 128  # queries per flash-attention thread block (FlashAttention-2 §3.3)
# Fitted to the 43 GEMMs of >= 2^33 multiply-adds in OpenXLA's measured H100 table
# (xla/service/gpu/model/matmul_interpolator_data.h, sm_90 bf16; rms error 3.5%): a tile's
# prologue and epilogue cost as much as 145 more steps of its K loop, a kernel 4.3 us
TILE_K0, LAUNCH = 145, 4.3e-6


def gemm_seconds(M, K, N, dev, peak, eff, hbm_eff, count=1, nbytes=2):
    """`count` GEMMs (M x K) @ (K x N) in one launch: tiles in waves, or the roofline's HBM time."""
    rows, cols = np.ceil(M / 128), np.ceil(N / 128)  # output elements of the waves of cuBLAS's
    area = np.minimum(np.minimum(np.ceil(count * rows * np.ceil(N / 256) / dev.sms),  # bf16 tiles:
                                 np.ceil(count * np.ceil(M / 256) * cols / dev.sms)) * 32768,  # 128 x
                      np.ceil(count * rows * cols / dev.sms) * 16384)  # 256, 256 x 128, 128 x 128
    streamed = count * (M * K + K * N + M * N) * nbytes / (dev.hbm_bw * hbm_eff)
    return np.maximum(area * 2 * (K + TILE_K0) / (eff * peak / dev.sms), streamed) + LAUNCH


def train_gemm_seconds(M, K, N, dev, peak, eff, hbm_eff, count=1):
    """(forward, backward) of a weight's GEMM on M tokens: backward is the input's gradient
    and the weight's, whose inner dimension is the tokens."""
    args = (dev, peak, eff, hbm_eff, count)
    return gemm_seconds(M, K, N, *args), gemm_seconds(M, N, K, *args) + gemm_seconds(K, M, N, *args)


def flash_seconds(queries, keys, heads, head_dim, dev, eff, backward=False):
    """Flash attention of `heads` x `queries` queries over `keys` keys each on average: matrix
    work (FlashAttention-2 §3.2) in waves of query tiles, and the exps (FlashAttention-3 §3.1)."""
    work = (2.5 if backward else 1.0) * 4 * head_dim * keys
    tiles = heads * np.ceil(queries / QUERY_TILE)
    matrix = np.ceil(tiles / dev.sms) * QUERY_TILE * work / (eff * dev.peak_flops / dev.sms)
    return matrix + heads * queries * keys / dev.exp_per_s + LAUNCH


BASE_LATENCY = 8.4e-6  # NCCL's base latency of a ring or tree, Simple protocol (src/graph/tuning.cc)


def ring_seconds(nbytes, n, nodes, bw, lat_in, lat_out):
    """All-gather or reduce-scatter of an `nbytes` buffer over `n` ranks on `nodes` nodes in a
    ring, with NCCL's latency model."""
    steps = BASE_LATENCY + (n - nodes) * lat_in + (nodes - 1) * lat_out
    return np.where(n > 1, (n - 1) / n * nbytes / bw + steps, 0.0)


def allreduce_seconds(nbytes, n, nodes, bw, lat_in, lat_out):
    """All-reduce as NCCL picks it by size: a ring or a double binary tree."""
    ring = 2 * ring_seconds(nbytes, n, nodes, bw, lat_in, lat_out) - BASE_LATENCY
    tree = (2 * nbytes / bw + BASE_LATENCY
            + 2 * ((n / nodes - 1) * lat_in + np.log2(np.maximum(nodes, 1)) * lat_out))
    return np.where(n > 1, np.minimum(ring, tree), 0.0)


def dispatch_bytes(tokens, row_bytes, ep, local, n_experts, top_k, dispatcher, node_limit):
    """(NVLink bytes, network bytes) one rank sends in one all-to-all, `local` of the `ep` ranks
    on its node: "alltoall" one copy per (token, expert); "deepep" one per destination node."""
    copies = tokens * top_k * row_bytes
    if dispatcher == "alltoall":
        return copies * (local - 1) / ep, copies * (ep - local) / ep
    nodes = ep / local
    missed = 1.0  # P(none of a token's top_k experts lives on a given other node)
    for i in range(top_k):
        missed = missed * np.maximum(n_experts - n_experts / nodes - i, 0) / (n_experts - i)
    remote = (nodes - 1) * (1 - missed)
    if node_limit:
        remote = np.minimum(remote, node_limit)
    return copies * (local - 1) / local, tokens * remote * row_bytes
