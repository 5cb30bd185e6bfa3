"""The cost model: memory per GPU, step time and the price of a training run under a layout.
One function on numpy arrays, `price`, prices one layout (`simulate`) or 10^5-10^6 at once
(minimoe.sim.search); docs/simulator.md "The step" derives every term and gives its source."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from minimoe.sim.hardware import Device
from minimoe.sim.kernels import (BASE_LATENCY, allreduce_seconds, dispatch_bytes, flash_seconds,
                                 gemm_seconds, ring_seconds, train_gemm_seconds)
from minimoe.sim.layout import Layout, Workload, WorkloadStats, check_layout
from minimoe.sim.memory import torchrun_memory
from minimoe.sim.options import Options, goodput

SECONDS_PER_DAY = 86400.0
PF_DAY = 1e15 * SECONDS_PER_DAY  # FLOPs in one petaFLOP/s-day (EleutherAI, Transformer Math 101)
TIME_PARTS = ("compute", "imbalance", "memory_bound", "tp_comm", "cp_comm", "ep_comm", "pp_comm",
              "bubble", "dp_comm", "optimizer_step", "stragglers")
_STAGE_PARTS = TIME_PARTS[:7]  # what one micro-batch spends on one stage


def price(st: WorkloadStats, dev: Device, opt: Options, c, efficiency=None) -> dict:
    """Every formula, elementwise over layout columns `c` (Layout.columns' names) the rules
    accept: memory parts (bytes per GPU), TIME_PARTS (seconds per step), throughput and price.
    `efficiency`, an array, replaces opt.gemm_efficiency and broadcasts (the fit's grid)."""
    eff = opt.gemm_efficiency if efficiency is None else efficiency
    tp, pp, dp, ep, zero, mb, rc, etp, cp, first, last = (  # in Layout's field order
        np.asarray(getattr(c, f.name), dtype=np.float64) for f in dataclasses.fields(Layout))
    h, s, gpn, b, L = st.d, st.s, dev.gpus_per_node, opt.act_bytes, st.n_layers
    n_gpus = tp * cp * pp * dp
    n_micro = st.global_batch / (dp * mb)  # micro-batches per step (valid where integral)
    middle = pp - (first > 0) - (last > 0)  # stages that split the other layers evenly
    even = (L - first - last) / np.maximum(middle, 1)
    first, last = np.where(first > 0, first, even), np.where(last > 0, last, even)
    layers = first  # the first stage holds the most micro-batches in flight (1F1B)
    tokens = mb * s / cp  # tokens of one micro-batch on one rank
    dp_dense = dp * cp  # the gradients of the dense weights are reduced over dp x cp
    out = {"n_gpus": n_gpus, "n_micro": n_micro}

    # --- memory per GPU, bytes -----------------------------------------------------------------
    vocab = st.V * h * np.where(pp == 1, st.vocab_mats, 1)  # first stage embeds, last has the head
    # the vocabulary's split: tp, or 1 where tp does not divide an unpadded vocabulary
    vocab_tp = tp if opt.pad_vocab else np.where(st.V % tp == 0, tp, 1)
    p_dense = layers * st.layer_params / tp + vocab / vocab_tp
    # experts: split over EP x ETP, replicated over the expert data parallel of the stage's
    # tp x cp x dp ranks (dp x cp / ep with etp = tp)
    p_expert = st.expert_params / pp / (ep * etp)
    dp_expert = tp * cp * dp / (ep * etp)
    for name, nbytes, stage in (("weights", opt.weight_bytes, 3), ("grads", opt.grad_bytes, 2),
                                ("optimizer", opt.optimizer_bytes, 1)):
        out[name] = nbytes * (p_dense / np.where(zero >= stage, dp_dense, 1)
                              + p_expert / np.where(zero >= stage, dp_expert, 1))
    full_layer = tokens * st.act_layer / tp
    kept = np.where(rc == 0, full_layer, np.where(rc == 1, full_layer - tokens * st.act_core / tp,
                                                  tokens * st.act_input / tp))
    rebuilt = np.where(rc == 2, full_layer, 0.0)  # full recompute rebuilds one layer at a time
    logits = 4 * tokens * st.V / vocab_tp  # fp32 logits for the cross-entropy, last stage
    head_first = layers * kept * np.minimum(n_micro, pp) + rebuilt
    head_last = last * kept + rebuilt + logits
    out["activations"] = np.maximum(head_first, head_last)
    if opt.memory_model == "minimoe":  # this project's FSDP2 path instead (minimoe/sim/memory.py)
        out.update(torchrun_memory(st, opt, tp, dp, ep, zero, mb, rc, n_micro))
    out["memory"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    out["fits"] = out["memory"] <= opt.memory_usable * dev.hbm_bytes

    # --- compute of one micro-batch: GEMMs by shape, attention, memory-bound kernels ----------
    peak = dev.peak_fp8_flops if opt.dtype == "fp8" else dev.peak_flops

    full = rc == 2  # full recompute runs every forward again before its backward

    def gemms(*shapes):  # a weight's GEMMs, forward, backward and the recomputed forward
        f, b = zip(*(train_gemm_seconds(*shape[:3], dev, peak, eff, opt.hbm_efficiency,
                                        *shape[3:]) for shape in shapes))
        return sum(f) * (1 + full) + sum(b)

    attn = gemms((tokens, h, (st.q + 2 * st.kv) / tp), (tokens, st.q / tp, h))
    mlp = gemms((tokens, h, 2 * st.d_ffn / tp), (tokens, st.d_ffn / tp, h))  # gate+up, down
    # rows of each local expert: the ETP group's dispatched tokens (top_k copies) over its experts
    E = max(st.n_experts, 1)
    rows = tokens / tp * etp * st.top_k * ep / E * st.capacity
    experts = gemms((rows, h, 2 * st.expert_d_ffn / etp, E / ep),
                    (rows, st.expert_d_ffn / etp, h, E / ep))
    moe = gemms((tokens, h, st.n_experts)) + (
        gemms((tokens, h, 2 * st.shared_d_ffn / tp), (tokens, st.shared_d_ffn / tp, h))
        if st.shared_d_ffn else 0.0)
    heads = st.n_heads / tp * mb
    if opt.flash_attention:  # causal: each rank's balanced chunks see s/2 keys on average
        core_f, core_b = (flash_seconds(s / cp, s / 2, heads, st.head_dim, dev, eff, bwd)
                          for bwd in (False, True))
    else:  # the full square as two batched GEMMs per head (Megatron 2021), backward twice
        core_f = sum(gemm_seconds(*shape, dev, peak, eff, opt.hbm_efficiency, heads)
                     for shape in ((s, st.head_dim, s), (s, s, st.head_dim)))
        core_b = 2 * core_f
    core = core_f * (1 + (rc >= 1)) + core_b  # selective and full recompute redo the forward
    dense_layer = attn + mlp + core
    moe_layer = attn + moe + experts + core
    imbalance = np.where(ep > 1, opt.imbalance, 1.0)  # the busiest EP rank over the mean
    for degree, factor in st.imbalance_by_ep.items():
        imbalance = np.where(ep == degree, factor, imbalance)
    imbalance = np.minimum(imbalance, st.imbalance_cap)
    hbm = dev.hbm_bw * opt.hbm_efficiency
    membound = (1 + st.membound_fwd_share * (rc == 2)) * tokens / tp / hbm
    # the LM head is not recomputed (Megatron recomputes the transformer layers only)
    lm_head = (sum(train_gemm_seconds(tokens, h, st.V / vocab_tp, dev, peak, eff, opt.hbm_efficiency))
               + tokens * st.membound_loss / vocab_tp / hbm)

    # --- communication of one micro-batch, one layer ------------------------------------------
    nvlink, nic = dev.intra_node_bw * dev.intra_node_eff, dev.inter_node_bw * dev.inter_node_eff
    lat_in, lat_out = opt.latency_intra_us * 1e-6, opt.latency_inter_us * 1e-6

    def group(n, stride=1):
        """(nodes, bandwidth) of a collective over n ranks `stride` apart: NVLink inside a node;
        across nodes one NIC per member on a node (NCCL runs a ring per NIC), up to NVLink."""
        per_node = np.clip(gpn / stride, 1, n)
        bw = np.where(stride * n <= gpn, nvlink, np.minimum(nvlink, per_node * nic))
        return np.maximum(n / per_node, 1), bw

    pairs = 2 + (rc == 2)  # an all-gather + reduce-scatter pair forward and backward (+ recompute)
    # TP: a pair around attention and the MLP (Korthikanti 2022 §4.2.2); an MoE layer's experts
    # pair in the ETP group on the dispatched tokens, never overlapped (docs "Collectives")
    tp_pair = 2 * ring_seconds(tokens * h * b, tp, *group(tp), lat_in, lat_out)
    etp_pair = pairs * 2 * ring_seconds(rows * E / ep * h * b, etp, *group(etp), lat_in, lat_out)
    tp_dense = pairs * 2 * tp_pair
    tp_moe = pairs * (1 + bool(st.shared_d_ffn)) * tp_pair
    # CP: ring attention passes K, V (and backward their gradients), behind the attention
    kv_bytes = 2 * tokens * st.kv / tp * b
    cp_comm = 3 * ring_seconds(cp * kv_bytes, cp, *group(cp, tp), lat_in, lat_out)
    cp_exposed = np.maximum(cp_comm - core_f - core_b, 0) + opt.overlap_slowdown * np.minimum(
        cp_comm, core_f + core_b)
    # EP: dispatch + combine forward, mirrored backward (DeepEP README), + forward again under
    # full recompute; the busiest rank moves `imbalance` x the mean
    local = np.clip(np.floor(gpn / (etp * np.where(etp == tp, cp, 1))), 1, ep)  # EP ranks per node
    a2a = 0.0
    for row_bytes in ((1 + 4 / 128) if opt.dtype == "fp8" else b, b):  # dispatch, combine
        nvl, net = dispatch_bytes(tokens / tp * st.capacity, h * row_bytes, ep, local,
                                  st.n_experts, st.top_k, opt.dispatcher, opt.node_limit)
        alpha = BASE_LATENCY + np.where(ep > local, lat_out, lat_in)  # every peer at once
        a2a = a2a + np.where(ep > 1, np.maximum(nvl / nvlink, net / nic) + alpha, 0)
    ep_comm = pairs * a2a * imbalance
    # PP: an activation forward and a gradient back per micro-batch per stage (scattered over
    # tp), v times with interleaved stages
    neighbour = np.where(tp * cp * dp >= gpn, nic, nvlink)  # the next stage is tp x cp x dp ranks on
    pp_comm = np.where(pp > 1, opt.virtual_stages * 2 * (tokens * h * b / tp / neighbour
                                                         + BASE_LATENCY + lat_out), 0.0)

    def exposed(comm, window, on):  # hidden up to the compute beside it, which it slows
        hidden = np.minimum(comm, window) if on else 0.0
        return comm - hidden + opt.overlap_slowdown * hidden

    share = st.n_moe / (L - st.front_dense)  # MoE layers among those after the front dense ones

    def stage(n, head, front=0):  # one micro-batch on a stage of n layers (+ the LM head)
        n_moe = np.maximum(n - front, 0) * share
        n_dense = n - n_moe
        busy = n_dense * dense_layer + n_moe * moe_layer + head * lm_head
        matmuls = n_dense * (attn + mlp) + n_moe * (attn + moe)  # TE's linear layers
        return {"compute": busy, "imbalance": n_moe * experts * (imbalance - 1),
                "memory_bound": membound * (n_dense * st.membound_dense + n_moe * st.membound_moe),
                "tp_comm": exposed(n_dense * tp_dense + n_moe * tp_moe, matmuls, opt.overlap_tp)
                + n_moe * etp_pair,
                "cp_comm": n * cp_exposed,
                "ep_comm": exposed(n_moe * ep_comm, np.where(n_micro > 1, busy, 0), opt.overlap_ep),
                "pp_comm": exposed(pp_comm, busy, opt.overlap_pp)}

    stages = [stage(first, pp == 1, st.front_dense), stage(even, 0.0), stage(last, 1.0)]
    t_first, t_mid, t_last = (sum(p.values()) for p in stages)
    t_mid = np.where(pp > 2, t_mid, 0.0)
    t_max = np.where(pp == 1, t_first, np.maximum(np.maximum(t_first, t_mid), t_last))
    slowest = np.where((pp == 1) | (t_first >= t_max), 0, np.where(t_last >= t_max, 2, 1))
    parts = {k: n_micro * np.choose(slowest, [p[k] for p in stages]) for k in _STAGE_PARTS}
    total = np.where(pp == 1, t_first, t_first + (pp - 2) * t_mid + t_last)
    parts["bubble"] = (total - t_max) / opt.virtual_stages  # fill and drain (Narayanan 2021 §2.2)

    # --- data parallel: gradients reduced, weights gathered, in Megatron's buckets -------------
    def dp_seconds(params, n, stride):  # each bucket pays its collective's latency
        nodes, bw = group(n, stride)
        buckets = np.maximum(np.ceil(params / np.maximum(4e7, 1e6 * n)), 1)  # Megatron's default
        bucket = params / buckets
        args = (n, nodes, bw, lat_in, lat_out)
        reduce = buckets * np.where(zero >= 1, ring_seconds(bucket * opt.reduce_bytes, *args),
                                    allreduce_seconds(bucket * opt.reduce_bytes, *args))
        gather = buckets * ring_seconds(bucket * opt.weight_bytes, *args)
        gathers = np.where(zero >= 3, 2 * n_micro, np.where(zero >= 1, 1, 0))  # ZeRO-3: fwd + bwd
        return (n_micro if opt.reduce_every_micro_batch else 1) * reduce + gathers * gather

    # the dense gradients' group is every tp-th rank (Megatron orders tp, cp, dp); the experts'
    # every (ep x etp)-th of the tp x cp x dp block
    t_dp = dp_seconds(p_dense, dp_dense, tp) + np.where(
        st.expert_params > 0, dp_seconds(p_expert, dp_expert, ep * etp), 0)
    # hidden behind one micro-batch (the last backward, the next step's first forward), or every
    # micro-batch when the reduction or the gathers run in each of them
    busy = parts["compute"] / n_micro
    per_micro = (zero >= 3) | opt.reduce_every_micro_batch
    parts["dp_comm"] = exposed(t_dp, busy * np.where(per_micro, n_micro, 1), opt.overlap_dp)
    parts["optimizer_step"] = (out["weights"] + out["grads"] + out["optimizer"]) / dev.hbm_bw
    base = n_micro * t_max + parts["bubble"] + parts["dp_comm"] + parts["optimizer_step"]
    # every step waits for its slowest node: the expected maximum of n node times with jitter
    # sigma (Gaussian, sqrt(2 ln n))
    nodes = np.ceil(n_gpus / gpn)
    parts["stragglers"] = base * opt.straggler_sigma * np.sqrt(2 * np.log(np.maximum(nodes, 1)))
    out.update(parts)
    out["step_time"] = base + parts["stragglers"]
    tokens_step = st.global_batch * s
    out["tokens_per_s"] = tokens_step / out["step_time"]
    out["mfu"] = tokens_step * st.model_per_token / (n_gpus * dev.peak_flops * out["step_time"])
    out["cost_per_mtok"] = (n_gpus * out["step_time"] / 3600 * dev.price_per_hour / tokens_step
                            * 1e6)
    return out


@dataclass(frozen=True)
class SimResult:
    """One layout priced: memory (bytes per GPU), time (seconds per step, TIME_PARTS), `goodput`
    (`run` applies it), `interval` (low, high) tokens/s over the uncertain inputs' corners."""

    layout: Layout
    device: str
    memory: dict
    time: dict
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    fits: bool
    n_gpus: int
    price_per_hour: float
    power_w: float
    pue: float
    model_flops_per_token: float
    goodput: dict
    interval: tuple | None = None

    @property
    def tokens_per_day(self) -> float:
        """Steady state: no checkpoints, no failures."""
        return self.tokens_per_s * SECONDS_PER_DAY

    @property
    def wallclock_tokens_per_day(self) -> float:
        return self.tokens_per_day * self.goodput["goodput"]

    def run(self, tokens: float) -> dict:
        """Wall-clock days, GPU-days, PF-days, energy and money to train on `tokens` tokens."""
        seconds = tokens / (self.tokens_per_s * self.goodput["goodput"])
        gpu_hours = self.n_gpus * seconds / 3600
        return {"tokens": tokens, "days": seconds / SECONDS_PER_DAY,
                "gpu_days": gpu_hours / 24, "gpu_hours": gpu_hours,
                "pf_days": tokens * self.model_flops_per_token / PF_DAY,
                "energy_kwh": gpu_hours * self.power_w * self.pue / 1000,
                "cost_usd": gpu_hours * self.price_per_hour}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"tokens_per_day": self.tokens_per_day,
                                           "wallclock_tokens_per_day": self.wallclock_tokens_per_day}


def check_options(opt: Options, dev: Device) -> None:
    """What the options ask of the device: FP8 GEMMs need an FP8 peak."""
    if opt.dtype == "fp8" and not dev.peak_fp8_flops:
        raise ValueError(f"options.dtype='fp8': device {dev.name} has no FP8 peak "
                         "(peak_fp8_tflops)")


def simulate(workload: Workload, layout: Layout, device: Device,
             options: Options = Options()) -> SimResult:
    """Price one layout, with its interval. Raises ValueError if the layout cannot run; `.fits`
    says whether it fits in memory."""
    check_layout(layout, workload)
    check_options(options, device)
    st = WorkloadStats(workload, options)
    pick = {k: float(v) for k, v in price(st, device, options, layout.columns()).items()}
    memory = {k: pick[k] for k in ("weights", "grads", "optimizer", "activations", "memory")}
    states = memory["weights"] + memory["grads"] + memory["optimizer"]
    speeds = corner_speeds(workload, layout, device, options, st)
    return SimResult(layout=layout, device=device.name,
                     memory=memory | {"usable": options.memory_usable * device.hbm_bytes},
                     time={k: pick[k] for k in TIME_PARTS + ("step_time",)},
                     tokens_per_step=workload.tokens_per_step, tokens_per_s=pick["tokens_per_s"],
                     mfu=pick["mfu"], fits=bool(pick["fits"]), n_gpus=int(pick["n_gpus"]),
                     price_per_hour=device.price_per_hour, power_w=device.power_w, pue=options.pue,
                     model_flops_per_token=st.model_per_token,
                     goodput=goodput(options, int(pick["n_gpus"]), pick["step_time"], states),
                     interval=(float(speeds.min()), float(speeds.max())))


def corner_speeds(workload: Workload, layout: Layout, device: Device, options: Options,
                  st: WorkloadStats | None = None) -> np.ndarray:
    """Tokens/s at the options (element 0), then at every corner of their uncertain ranges
    (docs/simulator.md "Intervals"): a ratio of two predictions is taken corner by corner."""
    def reads(o):  # a corner rebuilds the per-token figures only if it changes what they read
        return tuple(getattr(o, k) for k in WorkloadStats.READS)

    stats = {} if st is None else {reads(options): st}
    speeds = []
    for o in [options] + options.corners():
        if reads(o) not in stats:
            stats[reads(o)] = WorkloadStats(workload, o)
        speeds.append(float(price(stats[reads(o)], device, o, layout.columns())["tokens_per_s"]))
    return np.array(speeds)
