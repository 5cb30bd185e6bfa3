"""The cost model: memory per GPU, step time and the price of a training run under a parallel layout.

One function, `price`, holds every formula. It is written on numpy arrays, so the same code
prices one layout (`simulate`, on 0-d arrays) and a grid of 10^5-10^6 layouts at once
(minimoe.sim.search). `WorkloadStats` holds the per-token numbers it needs; the layouts and
their rules live in minimoe.sim.layout, the knobs in minimoe.sim.options. docs/simulator.md
gives every formula with its source; in short:

* Memory: bf16 weights, fp32 gradients, fp32 master + Adam m and v, 2 + 4 + 12 = 18 B/param as
  Megatron (megatron/training/theoretical_memory_usage.py; 16 with bf16 gradients, the ZeRO
  paper's K = 12, arXiv 1910.02054 §3.1). ZeRO-1/2/3 shard optimizer states, then gradients,
  then weights over data parallel; experts are split over EP and sharded over dp / ep.
  Activations: Korthikanti et al. 2022 (arXiv 2205.05198 §4) for this architecture, divided by
  TP (sequence parallel). The first stage holds min(m, p) micro-batches (1F1B).
* Time of one micro-batch on the slowest pipeline stage (the one with the LM head):
  - compute: each GEMM group at the roofline min(gemm_efficiency x peak, intensity x HBM
    bandwidth) (Williams et al. 2009), the attention core at the compute ceiling (flash);
  - imbalance: the expert GEMMs again x (imbalance - 1): the layer waits for its busiest
    expert-parallel rank (a factor given, or measured per EP degree from a run's routing);
  - memory_bound: bytes the FLOP count leaves out (norms, SwiGLU, rotary, residuals, MoE
    permute/unpermute, router top-k, the cross-entropy over the vocabulary) at HBM speed;
  - tp_comm, ep_comm, pp_comm: latency x ring steps + bytes / link bandwidth, NVLink inside a
    node and the NIC across (the EP all-to-all split into its on-node and off-node parts),
    each exposed by (1 - overlap of its kind).
  A step = (m + (p - 1) / v) micro-batches (bubble (p - 1) / (v m), Narayanan 2021 §2.2) +
  exposed data-parallel reduce-scatter/all-gather + the optimizer update at HBM speed.
* Goodput (minimoe.sim.options.goodput): checkpoints and failures turn training days into
  wall-clock days; `SimResult.run` reports wall-clock days.

Experts may have their own tensor-parallel degree (`Layout.etp`, MoE Parallel Folding): their
weights split over EP x ETP, their MLP collectives in the ETP group, the EP group strided by ETP.

Not modelled (so a user knows what to add): context parallelism, FP8, offload, the embedding's
stage imbalance beyond the LM head, network contention between concurrent collectives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minimoe.flops import RECOMPUTE, flops_per_token
from minimoe.sim.hardware import Device
from minimoe.sim.imbalance import histograms_from_log, imbalance_by_ep
from minimoe.sim.layout import Layout, Workload, check_layout
from minimoe.sim.memory import MemoryStats, memory
from minimoe.sim.options import OVERLAPS, Options, goodput

__all__ = ["Layout", "Workload", "Options", "OVERLAPS", "WorkloadStats", "price", "SimResult",
           "priced_result", "simulate", "SECONDS_PER_DAY", "PF_DAY"]

SECONDS_PER_DAY = 86400.0
PF_DAY = 1e15 * SECONDS_PER_DAY  # FLOPs in one petaFLOP/s-day (EleutherAI, Transformer Math 101)
TIME_PARTS = ("compute", "imbalance", "memory_bound", "tp_comm", "ep_comm", "pp_comm", "bubble",
              "dp_comm", "optimizer_step")


class WorkloadStats:
    """Per-token, per-layer numbers of a workload that every formula of `price` needs (floats).

    Built once per (workload, options); `price` then evaluates any number of layouts with it.
    """

    def __init__(self, w: Workload, opt: Options):
        cfg, s = w.cfg, w.seq_len
        count = flops_per_token(cfg, s, attention="causal", pad_to_capacity=opt.pad_to_capacity)
        rows = {r.component: r for r in count.rows}
        L = cfg.n_layers
        self.n_layers, self.n_moe, self.d, self.V = L, cfg.n_moe_layers, cfg.d_model, cfg.vocab_size
        self.s, self.global_batch, self.top_k = s, w.global_batch, cfg.top_k
        self.n_heads, self.n_kv_heads, self.n_experts = cfg.n_heads, cfg.n_kv_heads, cfg.n_experts
        self.capacity = cfg.capacity_factor if (opt.pad_to_capacity and cfg.capacity_factor) else 1.0
        # forward FLOPs per token per layer (hardware: capacity padding included), split into
        # the attention core, the expert GEMMs and the rest (projections, dense MLP, router)
        self.core_fwd = rows["attn_core"].forward / L
        if not opt.flash_attention:  # an unfused kernel computes the whole masked square
            full = flops_per_token(cfg, s, attention="full", pad_to_capacity=opt.pad_to_capacity)
            self.core_fwd = next(r for r in full.rows if r.component == "attn_core").forward / L
        layer_total = sum(r.forward for r in count.rows if r.in_layers)
        pad = (count.hardware - count.model) / 3  # extra expert FLOPs per forward, if padded
        self.expert_fwd = (sum(r.forward for r in count.rows if r.component.startswith("expert")
                               or r.component.startswith("shared")) + pad) / L
        self.rest_fwd = (layer_total - rows["attn_core"].forward + pad) / L - self.expert_fwd
        self.lm_fwd = rows["lm_head"].forward
        self.model_per_token = flops_per_token(cfg, s, attention=opt.attention).model
        self.expert_d_ffn = cfg.expert_d_ffn or cfg.d_ffn
        self.shared_d_ffn = cfg.shared_d_ffn
        # {ep: busiest rank / mean} measured from a run's routing, or {} (Options.imbalance)
        self.imbalance_by_ep = {} if not (opt.imbalance_log and cfg.is_moe) else imbalance_by_ep(
            histograms_from_log(opt.imbalance_log), cfg.n_experts, "options.imbalance_log")
        # parameters
        counts = cfg.param_counts()
        self.expert_params = counts["experts"]  # all layers
        self.layer_params = (counts["total"] - counts["experts"] - counts["embedding"]
                             - counts["lm_head"]) / L  # non-expert, incl. router and norms
        self.vocab_mats = 1 if cfg.tie_embeddings else 2
        self.memory = MemoryStats(cfg, opt, counts, s)  # minimoe/sim/memory.py
        b, h, a = opt.act_bytes, cfg.d_model, cfg.n_heads
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        # memory-bound bytes per token per layer, forward and backward (docs/simulator.md
        # "Memory-bound work"): each elementwise kernel reads its inputs and writes its output once
        k, f, fe, E = cfg.top_k, cfg.d_ffn, self.expert_d_ffn, cfg.n_experts
        common_fwd = 2 * 2 * h + 2 * 3 * h + 2 * (q + kv)  # 2 RMSNorms, 2 residual adds, rotary
        common_bwd = 2 * 3 * h + 2 * (q + kv)
        moe_fwd = k * 3 * fe + 3 * cfg.shared_d_ffn + 2 * (k + 1) * h  # SwiGLU x k, permutes
        moe_bwd = k * 5 * fe + 5 * cfg.shared_d_ffn + 2 * (k + 1) * h
        moe_router = 4 * 4 * E  # fp32 logits: softmax and top-k read and write them (+ bwd)
        share = self.n_moe / L
        self.membound_fwd = b * (common_fwd + share * moe_fwd + (1 - share) * 3 * f) \
            + share * moe_router / 2
        self.membound_bwd = b * (common_bwd + share * moe_bwd + (1 - share) * 5 * f) \
            + share * moe_router / 2
        # cross-entropy per token on the last stage: the logits read twice forward (max,
        # exp-sum), read and written backward, plus Megatron's fp32 upcast written and read
        self.membound_loss = 4 * b * cfg.vocab_size + 8 * cfg.vocab_size
        if not opt.flash_attention:  # the s x s scores go through HBM: written by QK^T, read
            # and written by the softmax, read by AV (4 forward); 6 backward (Dao et al. 2022 §2.2)
            self.membound_fwd += 4 * b * a * s
            self.membound_bwd += 6 * b * a * s


def _roofline(st_bytes, peak, hbm, M, K, N):
    """Slowdown of a GEMM (M x K) @ (K x N) below the compute ceiling: max(1, ridge / intensity),
    intensity = 2MKN / (bytes of A, B and C) (Williams et al. 2009, "Roofline")."""
    intensity = 2 * M * K * N / (st_bytes * (M * K + K * N + M * N))
    return np.maximum(1.0, (peak / hbm) / intensity)


def price(st: WorkloadStats, dev: Device, opt: Options, tp, pp, dp, ep, zero, mb, rc,
          etp=None) -> dict:
    """Every formula, elementwise over arrays (or scalars) of layouts; rc is the index of the
    recompute level in minimoe.flops.RECOMPUTE (0 none, 1 selective, 2 full), etp the experts'
    tensor-parallel degree (None: etp = tp).

    Returns a dict of arrays: n_gpus, n_micro, the memory parts (bytes per GPU), `fits`, the time
    parts of TIME_PARTS (seconds per step), step_time, tokens_per_s, mfu and cost_per_mtok.
    Call it only on layouts minimoe.sim.layout.valid_layouts accepts: elsewhere the numbers are
    defined but meaningless.
    """
    etp = tp if etp is None else etp
    tp, pp, dp, ep, zero, mb, rc, etp = (np.asarray(x, dtype=np.float64)
                                         for x in (tp, pp, dp, ep, zero, mb, rc, etp))
    h, s, gpn, b = st.d, st.s, dev.gpus_per_node, opt.act_bytes
    n_gpus = tp * pp * dp
    n_micro = st.global_batch / (dp * mb)  # micro-batches per step (valid where integral)
    layers = st.n_layers / pp  # per stage
    moe_layers = st.n_moe / pp
    tokens = mb * s  # tokens in one micro-batch on one data-parallel rank
    out = {"n_gpus": n_gpus, "n_micro": n_micro}

    # --- memory per GPU, bytes (minimoe/sim/memory.py) ---------------------------------------
    vocab_tp = tp if opt.pad_vocab else np.where(st.V % tp == 0, tp, 1)
    # p_dense, p_expert: parameters per GPU before ZeRO (the data-parallel reduction's volume)
    vocab_mats = np.where(pp == 1, st.vocab_mats, 1)  # the first stage embeds, the last projects
    p_dense = layers * st.layer_params / tp + st.V * h * vocab_mats / vocab_tp
    p_expert = st.expert_params / pp / (ep * etp)
    dp_expert = tp * dp / (ep * etp)
    out.update(memory(st.memory, opt, tp, pp, dp, ep, zero, mb, rc, etp, s, n_micro,
                      opt.memory_usable * dev.hbm_bytes))

    # --- compute: GEMMs at the roofline, per micro-batch on the slowest stage ------------------
    ceiling = dev.peak_flops * opt.gemm_efficiency
    if opt.gemm_roofline:
        hbm = dev.hbm_bw * opt.hbm_efficiency
        # rows per local expert: the tokens of the ETP group (each rank holds tokens / tp) that
        # pick it
        per_expert = tokens / tp * etp * st.top_k * ep / max(st.n_experts, 1) * st.capacity
        slow_rest = _roofline(b, ceiling, hbm, tokens, h, h / tp)
        slow_expert = _roofline(b, ceiling, hbm, per_expert, h, st.expert_d_ffn / etp)
        slow_lm = _roofline(b, ceiling, hbm, tokens, h, st.V / vocab_tp)
    else:
        slow_rest = slow_expert = slow_lm = 1.0
    forward = st.core_fwd + st.rest_fwd * slow_rest + st.expert_fwd * slow_expert  # per token
    recompute = np.where(rc == 1, st.core_fwd, np.where(rc == 2, forward, 0))
    seconds = tokens / tp / ceiling  # per FLOP of one token's work on this rank
    t_compute = seconds * (layers * (3 * forward + recompute)
                           + 3 * st.lm_fwd * slow_lm * tp / vocab_tp)
    # the busiest EP rank's load over the mean: the layer waits for it (1 where ep = 1)
    imbalance = np.where(ep > 1, opt.imbalance, 1.0)
    for degree, factor in st.imbalance_by_ep.items():
        imbalance = np.where(ep == degree, factor, imbalance)
    expert_passes = 3 + np.where(rc == 2, 1, 0)
    t_imbalance = seconds * layers * expert_passes * st.expert_fwd * slow_expert * (imbalance - 1)
    if opt.memory_bound_work:
        membound = (layers * (st.membound_fwd * (1 + (rc == 2)) + st.membound_bwd)
                    + st.membound_loss * tp / vocab_tp)
        t_memory = tokens / tp * membound / (dev.hbm_bw * opt.hbm_efficiency)
    else:
        t_memory = 0.0

    # --- communication: latency x steps + bytes / bandwidth, exposed by (1 - overlap) ----------
    def link(span):  # NVLink while the group fits in a node, else the NIC
        inside = span <= gpn
        return (np.where(inside, dev.intra_node_bw * dev.intra_node_eff,
                         dev.inter_node_bw * dev.inter_node_eff),
                np.where(inside, opt.latency_intra_us, opt.latency_inter_us) * 1e-6)

    extra = np.where(rc == 2, 2, 0)  # full recompute repeats the forward's collectives
    # TP with sequence parallel: 2 all-gathers + 2 reduce-scatters per layer forward, the same
    # in backward (Korthikanti 2022 §4.2.2); bytes: what 4 ring all-reduces move, 2 (t-1)/t each
    # In an MoE layer the routed experts' pair runs in the ETP group on the dispatched tokens,
    # top_k copies of the group's etp x tokens / tp (Megatron's all-to-all dispatcher gathers
    # after the all-to-all): none with etp = 1. A shared expert is a dense MLP on TP
    # (Megatron's SharedExpertMLP) and keeps the dense pair
    def tp_collectives(group, n, group_tokens):
        bw, alpha = link(group)
        return n * ((group - 1) / group * group_tokens * h * b / bw + 2 * (group - 1) * alpha)

    half = 2 + extra / 2  # a layer's collectives: half around attention, half around the MLP
    dense_halves = 2 * layers - moe_layers + (moe_layers if st.shared_d_ffn else 0)
    t_tp = (tp_collectives(tp, half * dense_halves, tokens)
            + tp_collectives(etp, half * moe_layers,
                             tokens / tp * etp * st.top_k * st.capacity))
    # EP all-to-all: dispatch + combine forward, mirrored backward (DeepEP README); a rank's
    # peers on its own node go over NVLink, the rest over the NIC, both at once; the busiest
    # rank receives `imbalance` x the mean
    local = np.clip(np.floor(gpn / etp), 1, ep)  # EP peers per node (self included)
    volume = (moe_layers * (4 + extra) * (tokens / tp) * st.top_k * h * b * st.capacity
              * imbalance)
    intra_bw, alpha_intra = link(np.ones_like(tp))
    inter_bw, alpha_inter = link(np.full_like(tp, gpn + 1))
    t_ep = np.maximum(volume * (local - 1) / ep / intra_bw, volume * (ep - local) / ep / inter_bw)
    t_ep = t_ep + moe_layers * (4 + extra) * (ep - 1) * np.where(ep > local, alpha_inter,
                                                                 alpha_intra)
    # PP: one activation forward and one gradient back per micro-batch per stage boundary,
    # v times with interleaved stages
    bw, alpha = link(n_gpus)
    t_pp = np.where(pp > 1, opt.virtual_stages * (2 * tokens * h * b / tp / bw + 2 * alpha), 0)
    exposed = {kind: 1 - getattr(opt, f"overlap_{kind}") for kind in ("tp", "ep", "dp", "pp")}
    t_micro = (t_compute + t_imbalance + t_memory + exposed["tp"] * t_tp + exposed["ep"] * t_ep
               + exposed["pp"] * t_pp)
    bubble = (pp - 1) / opt.virtual_stages * t_micro

    # DP: reduce-scatter gradients + all-gather weights (= one all-reduce) per step; ZeRO-3
    # gathers the weights again in every micro-batch's forward and backward
    def dp_volume(params, group):
        per_pass = (group - 1) / group * params * opt.comm_bytes
        return np.where(zero >= 3, (1 + 2 * n_micro) * per_pass, 2 * per_pass)

    bw, alpha = link(tp * dp)
    t_dp = ((dp_volume(p_dense, dp) + dp_volume(p_expert, dp_expert)) / bw
            + (dp - 1) * alpha * np.where(zero >= 3, 1 + 2 * n_micro, 2))  # ring steps per pass
    # the reduction can hide only behind compute that runs beside it: the last micro-batch's
    # backward and the next step's first forward (one micro-batch), every micro-batch for ZeRO-3
    hidden = opt.overlap_dp * t_dp
    if opt.overlap_window:
        busy = t_compute + t_imbalance + t_memory
        hidden = np.minimum(hidden, busy * np.where(zero >= 3, n_micro, 1))
    t_optimizer = (out["weights"] + out["grads"] + out["optimizer"]) / dev.hbm_bw
    parts = dict(compute=n_micro * t_compute, imbalance=n_micro * t_imbalance,
                 memory_bound=n_micro * t_memory, tp_comm=n_micro * exposed["tp"] * t_tp,
                 ep_comm=n_micro * exposed["ep"] * t_ep, pp_comm=n_micro * exposed["pp"] * t_pp,
                 bubble=bubble, dp_comm=t_dp - hidden, optimizer_step=t_optimizer)
    out.update(parts)
    out["step_time"] = n_micro * t_micro + bubble + parts["dp_comm"] + t_optimizer
    tokens_step = st.global_batch * s
    out["tokens_per_s"] = tokens_step / out["step_time"]
    out["mfu"] = tokens_step * st.model_per_token / (n_gpus * dev.peak_flops * out["step_time"])
    out["cost_per_mtok"] = (n_gpus * out["step_time"] / 3600 * dev.price_per_hour / tokens_step
                            * 1e6)
    return out


@dataclass(frozen=True)
class SimResult:
    """One layout priced: memory (bytes per GPU) and time (seconds per step) with throughput.

    `time` holds the exposed seconds of each part of a step (TIME_PARTS, communication after
    its overlap); they add up to `step_time`. `tokens_per_s` is the steady-state throughput;
    `goodput` the share of wall-clock time that trains (checkpoints, failures and restarts),
    which `run` applies.
    """

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

    @property
    def tokens_per_day(self) -> float:
        """Steady-state tokens per day of training (no checkpoints, no failures)."""
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
        d = asdict(self)
        d["tokens_per_day"] = self.tokens_per_day
        d["wallclock_tokens_per_day"] = self.wallclock_tokens_per_day
        return d


def priced_result(st: WorkloadStats, dev: Device, opt: Options, layout: Layout,
                  values: dict) -> SimResult:
    """A SimResult from `price`'s output for one layout (0-d arrays)."""
    pick = {k: float(v) for k, v in values.items()}
    memory = {k: pick[k] for k in ("weights", "grads", "optimizer", "activations", "memory")}
    memory["usable"] = opt.memory_usable * dev.hbm_bytes
    states = memory["weights"] + memory["grads"] + memory["optimizer"]
    return SimResult(layout=layout, device=dev.name, memory=memory,
                     time={k: pick[k] for k in TIME_PARTS + ("step_time",)},
                     tokens_per_step=st.global_batch * st.s, tokens_per_s=pick["tokens_per_s"],
                     mfu=pick["mfu"], fits=bool(pick["fits"]), n_gpus=int(pick["n_gpus"]),
                     price_per_hour=dev.price_per_hour, power_w=dev.power_w, pue=opt.pue,
                     model_flops_per_token=st.model_per_token,
                     goodput=goodput(opt, int(pick["n_gpus"]), pick["step_time"], states))


def simulate(workload: Workload, layout: Layout, device: Device,
             options: Options = Options()) -> SimResult:
    """Price one layout. Raises ValueError if the layout cannot run; check `.fits` for memory."""
    check_layout(layout, workload)
    st = WorkloadStats(workload, options)
    values = price(st, device, options, layout.tp, layout.pp, layout.dp, layout.ep,
                   layout.zero, layout.micro_batch, RECOMPUTE.index(layout.recompute),
                   layout.expert_tp)
    return priced_result(st, device, options, layout, values)
