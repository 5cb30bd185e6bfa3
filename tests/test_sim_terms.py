"""Each term of the time model (minimoe.sim.kernels, minimoe.sim.cost) against a value worked out
by hand for a small case: GEMM tiles and waves, flash attention's exponentials, NCCL's ring and
tree, the two dispatchers, overlap windows, stragglers, context parallelism, uneven pipeline
stages, FP8, expert tensor parallelism, the vocabulary split, goodput and routing histograms."""

import json
import math

import numpy as np
import pytest

from minimoe.config import PRESETS, ModelConfig
from minimoe.sim.cost import Layout, Options, Workload, simulate
from minimoe.sim.hardware import get_device
from minimoe.sim.imbalance import histograms_from_log, imbalance_factor
from minimoe.sim.kernels import (BASE_LATENCY, LAUNCH, TILE_K0, allreduce_seconds, dispatch_bytes,
                                 flash_seconds, gemm_seconds, ring_seconds, train_gemm_seconds)
from minimoe.sim.options import goodput

H100, A100 = get_device("h100"), get_device("a100")
EFF, HBM = 0.7, 0.8
# no latencies, no hidden communication, no jitter: the terms alone
PLAIN = Options(latency_intra_us=0, latency_inter_us=0, overlap_dp=False, straggler_sigma=0.0)


# OpenXLA's measured H100 bf16 GEMMs (xla/service/gpu/model/matmul_interpolator_data.h, sm_90):
# (batch, m, n, k) -> TFLOP/s; the model's K0 and launch are fitted to its 43 largest
XLA_H100 = {(1, 4096, 4096, 4096): 783.3, (1, 2048, 2048, 2048): 632.0, (1, 4096, 512, 4096): 650.0,
            (4, 4096, 4096, 512): 619.9, (1, 4096, 1024, 1024): 488.1, (2, 4096, 1024, 4096): 750.6}


def test_a_gemm_runs_in_waves_of_tiles():
    # gemm_seconds is the simulator's *predicted* time, a pure function of the shape and the
    # device's catalogue figures: nothing here is timed, so the assertions hold on any machine
    for (count, m, n, k), measured in XLA_H100.items():  # main loop at 0.857 of peak (the fit)
        t = gemm_seconds(m, k, n, H100, H100.peak_flops, 0.857, HBM, count)
        assert 2 * count * m * n * k / t / 1e12 == pytest.approx(measured, rel=0.1)
    per_tile = 2 * 128 * 256 * (4096 + TILE_K0) / (EFF * H100.peak_flops / 132)
    wave = (512, 33 * 256)  # 4 x 33 output tiles of 128 x 256: one per SM
    t = gemm_seconds(wave[0], 4096, wave[1], H100, H100.peak_flops, EFF, HBM)
    assert t == pytest.approx(per_tile + LAUNCH, rel=1e-12)
    # one column more needs a second wave of 128 x 256 tiles, or three of 4 x 67 tiles of 128 x 128
    # that are half as long; fewer rows still fill 128-row tiles (tile quantisation)
    assert gemm_seconds(512, 4096, wave[1] + 1, H100, H100.peak_flops, EFF, HBM) == pytest.approx(
        1.5 * per_tile + LAUNCH, rel=1e-12)
    assert gemm_seconds(500, 4096, wave[1], H100, H100.peak_flops, EFF, HBM) == pytest.approx(t)
    # three experts in one grouped launch fill the wave together
    assert gemm_seconds(512, 4096, 11 * 256, H100, H100.peak_flops, EFF, HBM, count=3) \
        == pytest.approx(t)
    # 64 rows against a wide weight stream it at HBM speed (the roofline)
    streamed = (64 * 8192 + 8192 * 32768 + 64 * 32768) * 2 / (H100.hbm_bw * HBM)
    assert gemm_seconds(64, 8192, 32768, H100, H100.peak_flops, EFF, HBM) == pytest.approx(
        streamed + LAUNCH)
    # backward: the input's gradient and the weight's, whose inner dimension is the tokens
    fwd, bwd = train_gemm_seconds(512, 4096, 8192, H100, H100.peak_flops, EFF, HBM)
    assert bwd == pytest.approx(gemm_seconds(512, 8192, 4096, H100, H100.peak_flops, EFF, HBM)
                                + gemm_seconds(4096, 512, 8192, H100, H100.peak_flops, EFF, HBM))


def test_flash_attention_pays_its_exponentials():
    queries, keys, heads, hd = 4096, 2048, 132, 128  # 132 x 32 query tiles: 32 full waves
    matrix = 32 * 128 * 4 * hd * keys / (EFF * H100.peak_flops / 132)
    exps = heads * queries * keys / 3.9e12  # FlashAttention-3 §3.1: 3.9 TFLOPS of exp on H100
    assert flash_seconds(queries, keys, heads, hd, H100, EFF) == pytest.approx(matrix + exps + LAUNCH)
    assert flash_seconds(queries, keys, heads, hd, H100, EFF, backward=True) == pytest.approx(
        2.5 * matrix + exps + LAUNCH)
    # an A100 has twice the H100's exp per matrix FLOP (16 exp and 1,024 FMA per clock per SM;
    # the H100 2,048 FMA): its exponentials weigh less
    share = {d.name: heads * queries * keys / d.exp_per_s / flash_seconds(queries, keys, heads, hd, d, EFF)
             for d in (H100, A100)}
    assert share["a100"] < share["h100"]


def test_ring_and_tree_latency_follow_nccl():
    lat_in, lat_out = 3.4e-6, 14e-6  # NCCL tuning.cc, Simple protocol: NVLink and network steps
    t = ring_seconds(1e9, 16, 2, 40e9, lat_in, lat_out)
    assert t == pytest.approx(15 / 16 * 1e9 / 40e9 + BASE_LATENCY + 14 * lat_in + 1 * lat_out)
    assert ring_seconds(1e9, 1, 1, 40e9, lat_in, lat_out) == 0
    # all-reduce: a small message over many nodes takes the tree (log2 latency), a large one
    # over few nodes the ring (less than twice the buffer per rank)
    tree = 2 * 1e4 / 40e9 + BASE_LATENCY + 2 * 9 * lat_out
    assert allreduce_seconds(1e4, 512, 512, 40e9, lat_in, lat_out) == pytest.approx(tree)
    ring = 2 * ring_seconds(1e10, 16, 16, 40e9, lat_in, lat_out) - BASE_LATENCY
    assert allreduce_seconds(1e10, 16, 16, 40e9, lat_in, lat_out) == pytest.approx(ring)


def test_the_two_dispatchers_send_what_they_say():
    tokens, row, E, k = 4096, 7168 * 2, 64, 8
    nvl, net = dispatch_bytes(tokens, row, 16, 8, E, k, "alltoall", 0)  # 2 nodes of 8 EP ranks
    assert (nvl, net) == (tokens * k * row * 7 / 16, tokens * k * row * 8 / 16)
    nvl, net = dispatch_bytes(tokens, row, 16, 8, E, k, "deepep", 0)
    missed = math.comb(E - 32, k) / math.comb(E, k)  # none of the 8 experts on the other node
    assert net == pytest.approx(tokens * (1 - missed) * row)  # one copy per remote node
    assert nvl == pytest.approx(tokens * k * row * 7 / 8)  # fanned out inside the node
    # 8 nodes: a token reaches ~5 of the 7 others; node-limited routing caps it at 4
    _, free = dispatch_bytes(tokens, row, 64, 8, E, k, "deepep", 0)
    _, limited = dispatch_bytes(tokens, row, 64, 8, E, k, "deepep", 4)
    assert free > limited == pytest.approx(tokens * 4 * row)
    assert limited < dispatch_bytes(tokens, row, 64, 8, E, k, "alltoall", 0)[1]


MOE = ModelConfig(vocab_size=32000, n_layers=4, d_model=2048, n_heads=16, n_kv_heads=4,
                  d_ffn=1024, n_experts=64, top_k=8, max_seq_len=4096)


def test_a_capacity_factor_caps_what_the_busiest_rank_waits_for():
    work = Workload(MOE, 4096, 64)
    lay = Layout(dp=16, ep=16)
    capped = Workload(MOE.replace(capacity_factor=1.25), 4096, 64)
    skew = simulate(capped, lay, H100, PLAIN.replace(imbalance=2.0)).time["imbalance"]
    cap = simulate(capped, lay, H100, PLAIN.replace(imbalance=1.25)).time["imbalance"]
    assert skew == pytest.approx(cap) and cap > 0
    assert simulate(work, lay, H100, PLAIN.replace(imbalance=2.0)).time["imbalance"] > skew


def test_overlap_hides_only_behind_the_compute_beside_it():
    work = Workload(MOE, 4096, 64)
    lay = Layout(dp=16, ep=16, micro_batch=1)  # 4 micro-batches per step
    exposed = simulate(work, lay, H100, PLAIN)
    hidden = simulate(work, lay, H100, PLAIN.replace(overlap_ep=True))
    busy = exposed.time["compute"] + exposed.time["imbalance"]  # what runs beside the all-to-all
    ep = exposed.time["ep_comm"]
    assert hidden.time["ep_comm"] == pytest.approx(max(ep - busy, 0) + 0.18 * min(ep, busy))
    # with one micro-batch nothing else is in flight: nothing to hide behind
    one = Workload(MOE, 4096, 16)
    assert simulate(one, lay, H100, PLAIN.replace(overlap_ep=True)).time["ep_comm"] == \
        pytest.approx(simulate(one, lay, H100, PLAIN).time["ep_comm"])


def test_stragglers_grow_with_the_nodes():
    work = Workload.from_tokens(PRESETS["aquila-7b"], 512 * 4096)
    lay = Layout(tp=8, dp=64, zero=1)  # 64 nodes
    r = simulate(work, lay, H100, PLAIN.replace(straggler_sigma=0.01))
    base = r.time["step_time"] - r.time["stragglers"]
    assert r.time["stragglers"] == pytest.approx(base * 0.01 * math.sqrt(2 * math.log(64)))
    assert simulate(work, Layout(tp=8, dp=1), H100,
                    PLAIN.replace(straggler_sigma=0.01)).time["stragglers"] == 0  # one node


def test_context_parallel_splits_the_sequence_and_passes_kv_around():
    cfg = PRESETS["aquila-7b"].replace(max_seq_len=32768)
    work = Workload(cfg, 32768, 16)
    one = simulate(work, Layout(tp=8, dp=2, zero=1), H100, PLAIN)
    two = simulate(work, Layout(tp=8, cp=2, dp=1, zero=1), H100, PLAIN)
    assert two.memory["activations"] < 0.55 * one.memory["activations"]
    assert one.time["cp_comm"] == 0 < two.time["cp_comm"]
    # K and V of 16,384 tokens (kv 4,096 wide, split over tp 8) cross once forward, twice back;
    # the ring hides it behind the attention that consumes it, which it slows by 18%
    kv = 2 * 16384 * 4096 / 8 * 2
    comm = 3 * (kv / (H100.inter_node_bw * 0.9) + BASE_LATENCY)  # cp ranks sit 8 apart: 2 nodes
    attention = sum(flash_seconds(16384, 16384, 32 / 8, 128, H100, Options().gemm_efficiency, b)
                    for b in (False, True))
    per_micro = max(comm - attention, 0) + 0.18 * min(comm, attention)
    assert two.time["cp_comm"] == pytest.approx(16 * 32 * per_micro, rel=1e-9)


def test_uneven_pipeline_stages():
    work = Workload.from_tokens(PRESETS["aquila-16b"], 64 * 4096)  # 40 layers
    even = simulate(work, Layout(tp=8, pp=4, dp=2), H100, PLAIN)
    same = simulate(work, Layout(tp=8, pp=4, dp=2, pp_first=10, pp_last=10), H100, PLAIN)
    assert same.time == even.time
    # the last stage holds the LM head: taking layers off it speeds the step up
    light = simulate(work, Layout(tp=8, pp=4, dp=2, pp_first=11, pp_last=9), H100, PLAIN)
    heavy = simulate(work, Layout(tp=8, pp=4, dp=2, pp_first=9, pp_last=11), H100, PLAIN)
    assert light.time["step_time"] < even.time["step_time"] < heavy.time["step_time"]
    with pytest.raises(ValueError, match=r"layout.pp=4: must split n_layers=40"):
        simulate(work, Layout(tp=8, pp=4, dp=2, pp_first=11, pp_last=10), H100)


def test_fp8_runs_the_gemms_at_the_fp8_peak():
    work = Workload.from_tokens(PRESETS["aquila-16b"], 64 * 4096)
    lay = Layout(tp=8, dp=8)
    bf16 = simulate(work, lay, H100, PLAIN)
    fp8 = simulate(work, lay, H100, PLAIN.replace(dtype="fp8"))
    assert 0.5 * bf16.time["compute"] < fp8.time["compute"] < 0.8 * bf16.time["compute"]
    assert fp8.time["memory_bound"] > bf16.time["memory_bound"]  # the casts to fp8
    assert fp8.mfu > bf16.mfu  # MFU stays against the BF16 peak
    with pytest.raises(ValueError, match="options.dtype='fp8': device a100 has no FP8 peak"):
        simulate(work, lay, A100, PLAIN.replace(dtype="fp8"))


def test_data_parallel_reduction_by_bucket_and_per_micro_batch():
    work = Workload.from_tokens(PRESETS["aquila-7b"], 64 * 4096)
    lay = Layout(tp=8, dp=8, zero=1)  # 8 ranks one per node: a NIC each
    once = simulate(work, lay, H100, PLAIN)
    params = PRESETS["aquila-7b"].param_counts()["total"] / 8
    nic = H100.inter_node_bw * 0.9
    buckets = math.ceil(params / 4e7)  # Megatron's bucket: max(40M, 1M x dp) parameters
    by_hand = 7 / 8 * params * (4 + 2) / nic + 2 * buckets * BASE_LATENCY
    assert once.time["dp_comm"] == pytest.approx(by_hand, rel=1e-9)
    every = simulate(work, lay, H100, PLAIN.replace(reduce_every_micro_batch=True))
    reduce = 7 / 8 * params * 4 / nic + buckets * BASE_LATENCY
    assert every.time["dp_comm"] - once.time["dp_comm"] == pytest.approx(7 * reduce, rel=1e-9)


def test_interleaved_stages_divide_the_bubble():
    work = Workload.from_tokens(PRESETS["aquila-16b"], 64 * 4096)
    lay = Layout(tp=8, pp=4, dp=4)
    one, two = (simulate(work, lay, H100, PLAIN.replace(virtual_stages=v)) for v in (1, 2))
    busy = (one.time["step_time"] - one.time["bubble"] - one.time["dp_comm"]
            - one.time["optimizer_step"] - one.time["stragglers"])
    # the fill and drain: the three stages before the slowest (the one with the LM head), once
    assert 0.8 * 3 * busy / 16 < one.time["bubble"] < 3 * busy / 16
    assert two.time["bubble"] == pytest.approx(one.time["bubble"] / 2, rel=0.01)  # v x the sends


def test_goodput_by_hand():
    opt = Options(failures_per_gpu_day=1e-3, restart_minutes=30, checkpoint_minutes=60,
                  checkpoint_gbs=1.0)
    g = goodput(opt, 1000, 10.0, 36e9)
    # a 36 s write every hour; one failure a day, each losing 30 min + half an hour + the step
    assert g["checkpoint_share"] == pytest.approx(36 / 3636)
    assert g["failure_share"] == pytest.approx(3610 / 86400)
    assert g["goodput"] == pytest.approx((1 - 36 / 3636) * (1 - 3610 / 86400))
    assert Options().failures_per_gpu_day == pytest.approx(419 / (54 * 16384))  # Llama 3


def test_imbalance_from_a_histogram_and_a_run_log(tmp_path):
    assert imbalance_factor([[1, 1, 1, 5]]) == pytest.approx(2.5)  # 5 / mean 2
    assert imbalance_factor([[1, 1, 1, 5]], ranks=2) == pytest.approx(1.5)  # 6 / mean 4
    assert imbalance_factor([[2, 2], [1, 3]]) == pytest.approx((1.0 + 1.5) / 2)
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "load": [[9, 1]]}) + "\n"
                   + json.dumps({"step": 2, "loss": 3.0}) + "\n"
                   + json.dumps({"step": 3, "load": [[3, 1], [2, 2]]}) + "\n")
    assert histograms_from_log(tmp_path) == [[[9, 1]], [[3, 1], [2, 2]]]
    with pytest.raises(ValueError, match=r"load\[0\]=\[0, 0\]: no tokens routed"):
        imbalance_factor([[0, 0]])


# --- expert tensor parallel (MoE Parallel Folding, arXiv 2504.14960) ------------------------
MOE_WORK = Workload.from_tokens(PRESETS["aquilamoe-8x16b"], 64 * 4096)


def test_etp_equal_to_tp_is_the_default_layout():
    default = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8), H100)
    explicit = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8, etp=4), H100)
    assert explicit.time == default.time and explicit.memory == default.memory
    assert explicit.layout.label() == default.layout.label()  # etp shown only where it folds


def test_folded_experts_split_over_ep_x_etp_and_lose_their_tp_collectives():
    cfg = MOE_WORK.cfg
    tp4 = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8), H100, PLAIN)
    etp1 = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8, etp=1), H100, PLAIN)
    experts = cfg.param_counts()["experts"]
    dense = tp4.memory["weights"] - 2 * experts / (2 * 8 * 4)
    assert etp1.memory["weights"] - dense == pytest.approx(2 * experts / (2 * 8 * 1))
    # the experts' collectives move top_k copies of the tokens: with etp 1 they are gone, and
    # only the attention's pair (the same in both) is left
    assert cfg.top_k == 2 and not cfg.shared_d_ffn
    per_copy = (tp4.time["tp_comm"] - etp1.time["tp_comm"]) / cfg.top_k
    assert etp1.time["tp_comm"] == pytest.approx(per_copy, rel=0.05)  # up to NCCL's base latency
    # the EP group is strided by etp, not tp: 8 EP peers share a node instead of 2
    assert etp1.time["ep_comm"] < tp4.time["ep_comm"]


def test_folding_lets_ep_span_tensor_parallel_ranks():
    with pytest.raises(ValueError, match=r"with etp = tp: ep must divide cp x dp=4"):
        simulate(MOE_WORK, Layout(tp=2, pp=8, dp=4, ep=8), H100)
    r = simulate(MOE_WORK, Layout(tp=2, pp=8, dp=4, ep=8, etp=1), H100)
    assert r.layout.label().startswith("tp2 pp8 dp4 ep8 etp1")


def test_an_unpadded_vocabulary_tp_does_not_divide_stays_whole_on_each_rank():
    cfg = PRESETS["aquila-16b"]  # 151,851 tokens: odd
    work = Workload.from_tokens(cfg, 64 * 4096)
    lay = Layout(tp=2, dp=32, zero=1)
    padded = simulate(work, lay, H100, PLAIN)
    whole = simulate(work, lay, H100, PLAIN.replace(pad_vocab=False))
    vocab_params = 2 * cfg.vocab_size * cfg.d_model  # embedding and LM head
    assert whole.memory["weights"] - padded.memory["weights"] == pytest.approx(vocab_params)
    assert whole.time["compute"] > padded.time["compute"]  # each rank runs the whole LM head
    even = Workload.from_tokens(cfg.replace(vocab_size=151_852), 64 * 4096)
    assert simulate(even, lay, H100, PLAIN).time == simulate(even, lay, H100,
                                                             PLAIN.replace(pad_vocab=False)).time
    assert np.isfinite(whole.time["step_time"])
