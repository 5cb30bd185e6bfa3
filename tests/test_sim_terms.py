"""Each term of the time model (minimoe.sim.cost) against a value worked out by hand for a small
case, and the model with its new terms switched to neutral against the figures it gave before
them (main a7ec55f: overlap 1.0, no imbalance)."""

import json

import pytest

from minimoe.config import PRESETS, ModelConfig
from minimoe.sim.cost import Layout, Options, Workload, simulate
from minimoe.sim.hardware import get_device
from minimoe.sim.imbalance import imbalance_factor, load_from_log
from minimoe.sim.options import goodput

H100 = get_device("h100")
# no roofline, no memory-bound work, no latency, everything hidden but the pipeline sends, the
# data-parallel reduction hidden whatever the compute beside it: the model before these terms
NEUTRAL = Options(overlap_tp=1.0, overlap_ep=1.0, overlap_dp=1.0, overlap_window=False,
                  gemm_roofline=False, memory_bound_work=False, latency_intra_us=0,
                  latency_inter_us=0)
# a small MHA model: h 64, 4 heads of 16, SwiGLU 128, vocabulary 100, 2 layers
SMALL = ModelConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ffn=128,
                    max_seq_len=32)


@pytest.mark.parametrize("preset, batch, layout, step", [
    ("aquila-16b", 256 * 4096, Layout(tp=4, pp=2, dp=16, zero=1), 1.858833813),
    ("aquilamoe-8x16b", 64 * 4096, Layout(tp=2, pp=4, dp=32, ep=8, zero=2, micro_batch=2,
                                          recompute="selective"), 1.596163528),
    ("aquila-8x1.8b", 256 * 2048, Layout(dp=64, ep=4, zero=3, recompute="full"), 0.3132947962),
])
def test_neutral_terms_reproduce_the_model_before_them(preset, batch, layout, step):
    r = simulate(Workload.from_tokens(PRESETS[preset], batch), layout, H100, NEUTRAL)
    assert r.time["step_time"] == pytest.approx(step, rel=1e-9)
    assert r.time["imbalance"] == r.time["memory_bound"] == r.time["dp_comm"] == 0


def test_memory_bound_bytes_of_a_small_dense_model():
    # per token and layer, bf16: forward 2 norms (2 x 2h) + 2 residual adds (2 x 3h) + rotary
    # 2 (q + kv) + SwiGLU 3f = 2 x (256 + 384 + 256 + 384) = 2,560 B; backward 2 x 3h + 2 (q + kv)
    # + 5f = 2 x (384 + 256 + 640) = 2,560 B; the loss 4 x 2 x V + 8 x V = 1,600 B per token
    per_token = 2 * (2560 + 2560) + 1600
    work = Workload(SMALL, 32, 8)
    r = simulate(work, Layout(dp=1, micro_batch=8), H100, Options(memory_bound_work=True))
    assert r.time["memory_bound"] == pytest.approx(8 * 32 * per_token / (H100.hbm_bw * 0.8))
    off = simulate(work, Layout(dp=1, micro_batch=8), H100, Options(memory_bound_work=False))
    assert off.time["memory_bound"] == 0


def test_roofline_slows_a_thin_gemm_by_ridge_over_intensity():
    # one micro-batch of 16 tokens: the projections are (16 x 64) @ (64 x 64) GEMMs, intensity
    # 2 MKN / (2 (MK + KN + MN)) = 131072 / 12288 = 10.67 FLOP/B against a ridge of
    # 0.5 x 989.4 TFLOP/s / (0.8 x 3,350 GB/s) = 184.6 FLOP/B: 17.3x slower than the ceiling
    cfg = SMALL.replace(vocab_size=64, max_seq_len=16)
    work = Workload(cfg, 16, 1)
    fast = simulate(work, Layout(), H100, Options(gemm_roofline=False, memory_bound_work=False))
    slow = simulate(work, Layout(), H100, Options(memory_bound_work=False))
    ridge = 0.5 * 989.4e12 / (0.8 * 3350e9)
    factor = ridge / (131072 / 12288)  # the same for the LM head here: V = h = 64
    core = 2 * 3 * 2 * 2 * 16 / 2 * 64 * 16 / 0.5 / 989.4e12  # attention: not slowed (flash)
    assert slow.time["compute"] - core == pytest.approx((fast.time["compute"] - core) * factor,
                                                        rel=1e-9)


def test_imbalance_waits_for_the_busiest_expert():
    cfg = PRESETS["aquila-8x1.8b"]
    work = Workload.from_tokens(cfg, 64 * 2048)
    # no collective latency: the all-to-all's bytes, which imbalance scales, are all of its time
    opt = Options(gemm_roofline=False, memory_bound_work=False, latency_intra_us=0)
    even = simulate(work, Layout(dp=8, ep=8), H100, opt)
    skew = simulate(work, Layout(dp=8, ep=8), H100, opt.replace(imbalance=1.5))
    # expert FLOPs per token: top-2 SwiGLU experts, 2 x 3 x h x f x 2 per MoE layer, x3 passes
    expert_flops = 3 * cfg.n_moe_layers * 2 * 2 * 3 * cfg.d_model * cfg.d_ffn
    tokens = 64 * 2048 / 8
    assert skew.time["imbalance"] == pytest.approx(0.5 * tokens * expert_flops / (0.5 * 989.4e12))
    assert even.time["imbalance"] == 0
    assert skew.time["ep_comm"] == pytest.approx(1.5 * even.time["ep_comm"], rel=1e-3)


def test_collective_latency_and_overlap_per_kind():
    work = Workload.from_tokens(PRESETS["aquila-16b"], 64 * 4096)
    lay = Layout(tp=2, dp=32)
    none = simulate(work, lay, H100, Options(latency_intra_us=0))
    five = simulate(work, lay, H100, Options(latency_intra_us=5))
    # 2 all-gathers + 2 reduce-scatters per layer, forward and backward: 8 rings of tp - 1 steps
    n_micro = 64 / 32
    assert five.time["tp_comm"] - none.time["tp_comm"] == pytest.approx(n_micro * 40 * 8 * 5e-6)
    quarter = simulate(work, lay, H100, Options(latency_intra_us=0, overlap_tp=0.25))
    assert quarter.time["tp_comm"] == pytest.approx(0.75 * none.time["tp_comm"])


def test_interleaved_stages_divide_the_bubble():
    work = Workload.from_tokens(PRESETS["aquila-16b"], 64 * 4096)
    lay = Layout(tp=8, pp=4, dp=4)
    one = simulate(work, lay, H100)
    two = simulate(work, lay, H100, Options(virtual_stages=2))
    per_micro = lambda r: (r.time["step_time"] - r.time["bubble"] - r.time["dp_comm"]  # noqa: E731
                           - r.time["optimizer_step"]) / 16
    assert one.time["bubble"] == pytest.approx(3 * per_micro(one))
    assert two.time["bubble"] == pytest.approx(3 / 2 * per_micro(two))


def test_data_parallel_reduction_hides_only_behind_one_micro_batch():
    work = Workload.from_tokens(PRESETS["aquila-1.8b"], 256 * 2048)
    lay = Layout(dp=64, zero=1)
    windowed = simulate(work, lay, H100, Options(overlap_dp=1.0))
    free = simulate(work, lay, H100, Options(overlap_dp=1.0, overlap_window=False))
    busy = (windowed.time["compute"] + windowed.time["memory_bound"]) / 4  # 4 micro-batches
    exposed_total = simulate(work, lay, H100, Options(overlap_dp=0.0)).time["dp_comm"]
    assert free.time["dp_comm"] == 0
    assert windowed.time["dp_comm"] == pytest.approx(max(0.0, exposed_total - busy))


def test_goodput_by_hand():
    opt = Options(failures_per_gpu_day=1e-3, restart_minutes=30, checkpoint_minutes=60,
                  checkpoint_gbs=1.0)
    g = goodput(opt, 1000, 10.0, 36e9)
    # a 36 s write every hour; one failure a day, each losing 30 min + half an hour + the step
    assert g["checkpoint_share"] == pytest.approx(36 / 3636)
    assert g["failure_share"] == pytest.approx(3610 / 86400)
    assert g["goodput"] == pytest.approx((1 - 36 / 3636) * (1 - 3610 / 86400))
    # Llama 3's rate: 419 interruptions in 54 days on 16,384 GPUs
    assert Options().failures_per_gpu_day == pytest.approx(419 / (54 * 16384))


def test_imbalance_from_a_histogram_and_a_run_log(tmp_path):
    assert imbalance_factor([[1, 1, 1, 5]]) == pytest.approx(2.5)  # 5 / mean 2
    assert imbalance_factor([[1, 1, 1, 5]], ranks=2) == pytest.approx(1.5)  # 6 / mean 4
    assert imbalance_factor([[2, 2], [1, 3]]) == pytest.approx((1.0 + 1.5) / 2)
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "load": [[9, 1]]}) + "\n"
                   + json.dumps({"step": 2, "loss": 3.0}) + "\n"
                   + json.dumps({"step": 3, "load": [[3, 1], [2, 2]]}) + "\n")
    assert load_from_log(tmp_path) == [[3, 1], [2, 2]]  # the last histogram logged
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
    opt = Options(latency_intra_us=0, latency_inter_us=0)
    tp4 = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8), H100, opt)
    etp1 = simulate(MOE_WORK, Layout(tp=4, pp=2, dp=32, ep=8, etp=1), H100, opt)
    # expert weights per GPU: experts / (pp x ep x etp) over the expert data parallel
    # tp x dp / (ep x etp) under ZeRO-1 (only the optimizer states are sharded)
    experts = cfg.param_counts()["experts"]
    dense = tp4.memory["weights"] - 2 * experts / (2 * 8 * 4)
    assert etp1.memory["weights"] - dense == pytest.approx(2 * experts / (2 * 8 * 1))
    # every layer is an MoE layer, and its experts' collectives move the dispatched tokens, top_k
    # copies: with tp 4 they are top_k x the attention's; with etp 1 they are gone
    assert cfg.top_k == 2 and not cfg.shared_d_ffn
    assert etp1.time["tp_comm"] == pytest.approx(tp4.time["tp_comm"] / (1 + cfg.top_k), rel=1e-12)
    # the EP group is strided by etp, not tp: 8 EP peers share a node instead of 2, so less of
    # the all-to-all crosses the network
    assert etp1.time["ep_comm"] < tp4.time["ep_comm"]


def test_folding_lets_ep_span_tensor_parallel_ranks():
    # ep 8 on dp 4 breaks Megatron's default rule (ep | dp) but folds into tp x dp = 8 with etp 1
    with pytest.raises(ValueError, match="with etp = tp: ep must divide dp=4"):
        simulate(MOE_WORK, Layout(tp=2, pp=8, dp=4, ep=8), H100)
    r = simulate(MOE_WORK, Layout(tp=2, pp=8, dp=4, ep=8, etp=1), H100)
    assert r.layout.label().startswith("tp2 pp8 dp4 ep8 etp1")


def test_a_shared_expert_keeps_the_dense_tp_collectives_under_folding():
    cfg = PRESETS["aquilamoe-8x16b"].replace(shared_d_ffn=5120)
    work = Workload.from_tokens(cfg, 64 * 4096)
    opt = Options(latency_intra_us=0, latency_inter_us=0)
    tp4 = simulate(work, Layout(tp=4, pp=2, dp=32, ep=8), H100, opt)
    etp1 = simulate(work, Layout(tp=4, pp=2, dp=32, ep=8, etp=1), H100, opt)
    # per layer: attention 1, shared expert 1, routed experts top_k (0 with etp 1), in units of
    # the attention's collectives
    assert etp1.time["tp_comm"] == pytest.approx(tp4.time["tp_comm"] * 2 / (2 + cfg.top_k),
                                                 rel=1e-12)


def test_an_unpadded_vocabulary_tp_does_not_divide_stays_whole_on_each_rank():
    cfg = PRESETS["aquila-16b"]  # 151,851 tokens: odd
    work = Workload.from_tokens(cfg, 64 * 4096)
    lay = Layout(tp=2, dp=32, zero=1)
    opt = Options(gemm_roofline=False, memory_bound_work=False)
    padded = simulate(work, lay, H100, opt)
    whole = simulate(work, lay, H100, opt.replace(pad_vocab=False))
    vocab_params = 2 * cfg.vocab_size * cfg.d_model  # embedding and LM head
    assert whole.memory["weights"] - padded.memory["weights"] == pytest.approx(
        2 * vocab_params / 2)  # bf16, half of it more per rank
    # each rank computes the whole LM head: its 3 x 2hV FLOPs per token, once more than its half
    lm = 3 * 2 * cfg.d_model * cfg.vocab_size * (64 * 4096 / 32) / 2
    assert whole.time["compute"] - padded.time["compute"] == pytest.approx(lm / (0.5 * 989.4e12))
    # a vocabulary tp divides is split either way
    even = Workload.from_tokens(cfg.replace(vocab_size=151_852), 64 * 4096)
    assert simulate(even, lay, H100, opt).time == simulate(even, lay, H100,
                                                             opt.replace(pad_vocab=False)).time
