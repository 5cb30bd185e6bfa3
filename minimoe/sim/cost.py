"""The cost model: memory per GPU, step time and the price of a training run under a parallel layout.

One function, `price`, holds every formula. It is written on numpy arrays, so the same code
prices one layout (`simulate`, on 0-d arrays) and a grid of 10^5-10^6 layouts at once
(minimoe.sim.search). `WorkloadStats` holds the per-token numbers it needs, `LAYOUT_RULES` the
one list of which layouts can run. Formulas and their sources (docs/simulator.md has the details):

* FLOPs: minimoe.flops. Time uses the causal attention count, the work a flash kernel does.
* Weights, gradients, optimizer states: bf16 weights, fp32 gradients, fp32 master + Adam m and v,
  2 + 4 + 12 = 18 B/param as Megatron (megatron/training/theoretical_memory_usage.py) and
  llm-analysis default (16 with bf16 gradients, set `grad_bytes=2`, the ZeRO paper's K = 12,
  arXiv 1910.02054 §3.1). ZeRO-1 shards the optimizer states over data parallel, ZeRO-2 also
  the gradients, ZeRO-3 (= FSDP FULL_SHARD) also the weights. Expert weights are split over EP
  and their data-parallel group is dp / ep (Megatron's expert data parallel).
* Activations: Korthikanti et al. 2022's method (arXiv 2205.05198 §4), every tensor the backward keeps counted
  for this architecture (RMSNorm, GQA, SwiGLU, no dropout, MoE), all divided by TP because
  sequence parallelism is assumed with TP. Recompute `none` keeps everything, `selective` drops
  the attention core's tensors, `full` keeps only each layer's input. The first pipeline stage
  holds min(micro-batches, pp) micro-batches in flight (1F1B); the last holds the fp32 logits.
* Time per micro-batch = GEMM time at `gemm_efficiency` of peak + exposed TP collectives + exposed
  EP all-to-all (dispatch + combine, mirrored in backward: deepseek-ai/DeepEP README) + pipeline send/receive; a step = (m + p - 1) micro-batches (bubble
  (p - 1) / m, Narayanan 2021) + exposed data-parallel reduce-scatter/all-gather + the optimizer
  update (reads every state byte once, as llm-analysis does). `overlap` is the fraction of
  communication hidden behind compute (an assumption; docs/simulator.md "Overlap").

Not modelled (so a user knows what to add): interleaved pipeline stages, context parallelism,
FP8, offload, expert load imbalance, the embedding's pipeline-stage imbalance beyond the LM head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minimoe.config import ModelConfig
from minimoe.flops import ATTENTION, RECOMPUTE, flops_per_token
from minimoe.sim.hardware import Device

SECONDS_PER_DAY = 86400.0
PF_DAY = 1e15 * SECONDS_PER_DAY  # FLOPs in one petaFLOP/s-day (EleutherAI, Transformer Math 101)


@dataclass(frozen=True)
class Layout:
    """How a model is cut over GPUs: n_gpus = tp * pp * dp; EP groups live inside data parallel."""

    tp: int = 1  # tensor parallel (with sequence parallel)
    pp: int = 1  # pipeline stages
    dp: int = 1  # data parallel replicas
    ep: int = 1  # expert parallel: each EP rank holds n_experts / ep experts of every MoE layer
    zero: int = 1  # 0 DDP, 1 optimizer states sharded, 2 + gradients, 3 + weights (= FSDP)
    micro_batch: int = 1  # sequences per micro-batch per data-parallel rank
    recompute: str = "none"  # "none", "selective" (attention core) or "full" (every layer)

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} ep{self.ep} zero{self.zero} "
                f"mb{self.micro_batch} rc-{self.recompute}")


@dataclass(frozen=True)
class Options:
    """Knobs of the cost model; every default is a cited figure or a stated assumption."""

    # achieved / peak on the GEMMs. Calibrated: with 0.5 the dense Aquila 7B and 16B on 384-1024
    # H100s come out at 45-47% MFU, where Megatron-Core reports 41-48% for GPT models on up to
    # 6,144 H100s and 44-47% for Mixtral 8x7B (NVIDIA/Megatron-LM README.md and
    # megatron/core/transformer/moe/README.md)
    gemm_efficiency: float = 0.5
    overlap: float = 0.5  # assumption: share of communication hidden behind compute
    weight_bytes: float = 2  # bf16
    grad_bytes: float = 4  # fp32 main gradients (Megatron); 2 for ZeRO's 16 B/param
    optimizer_bytes: float = 12  # fp32 master + Adam m + v (ZeRO's K = 12)
    act_bytes: float = 2  # bf16 activations
    comm_bytes: float = 2  # gradients and weights travel in bf16
    flash_attention: bool = True  # no s x s score matrix is stored (SDPA, FlashAttention)
    memory_usable: float = 0.9  # assumption: share of HBM left after CUDA context and fragmentation
    attention: str = "causal"  # FLOP convention of the reported model FLOPs and MFU
    pad_to_capacity: bool = False  # MoE buffers padded to capacity_factor (GShard style)
    pue: float = 1.0  # data-centre power usage effectiveness applied to GPU board power

    def __post_init__(self):
        for name in ("gemm_efficiency", "memory_usable"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"options.{name}={getattr(self, name)!r}: must be in (0, 1]")
        if not 0 <= self.overlap <= 1:
            raise ValueError(f"options.overlap={self.overlap!r}: must be in [0, 1]")
        if self.pue < 1:
            raise ValueError(f"options.pue={self.pue!r}: must be >= 1")
        if self.attention not in ATTENTION:
            raise ValueError(f"options.attention={self.attention!r}: must be one of "
                             f"{', '.join(ATTENTION)}")


@dataclass(frozen=True)
class Workload:
    """A model, its sequence length and the global batch of one optimizer step."""

    cfg: ModelConfig
    seq_len: int
    global_batch: int  # sequences per optimizer step

    @classmethod
    def from_tokens(cls, cfg: ModelConfig, batch_tokens: int, seq_len: int | None = None):
        seq_len = seq_len or cfg.max_seq_len
        if batch_tokens <= 0 or batch_tokens % seq_len:
            raise ValueError(f"batch_tokens={batch_tokens}: must be a positive multiple of "
                             f"seq_len={seq_len}")
        return cls(cfg, seq_len, batch_tokens // seq_len)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


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
        # forward FLOPs per token per layer (hardware: capacity padding included)
        self.core_fwd = rows["attn_core"].forward / L
        layer_total = sum(r.forward for r in count.rows if r.in_layers)
        pad = (count.hardware - count.model) / 3  # extra expert FLOPs per forward, if padded
        self.rest_fwd = (layer_total - rows["attn_core"].forward + pad) / L
        self.lm_fwd = rows["lm_head"].forward
        self.model_per_token = flops_per_token(cfg, s, attention=opt.attention).model
        # parameters
        counts = cfg.param_counts()
        self.expert_params = counts["experts"]  # all layers
        self.layer_params = (counts["total"] - counts["experts"] - counts["embedding"]
                             - counts["lm_head"]) / L  # non-expert, incl. router and norms
        self.vocab_mats = 1 if cfg.tie_embeddings else 2
        # activation bytes per token per layer (the backward's saved tensors, see module doc)
        b, h, a = opt.act_bytes, cfg.d_model, cfg.n_heads
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        core = 4 * a  # flash keeps a fp32 log-sum-exp per head and query
        if not opt.flash_attention:
            core += b * a * s  # the softmax probabilities, one row of s per head
        attn = b * (2 * h + 2 * q + 2 * kv) + core  # norm in, QKV in, Q, K, V, output
        dense = b * (2 * h + 3 * cfg.d_ffn)  # norm in, MLP in, gate, up, silu(gate)*up
        moe = (b * 2 * h + 4 * cfg.n_experts  # norm in, router in, fp32 router logits
               + cfg.top_k * b * (2 * h + 3 * cfg.expert_d_ffn)  # k copies: in, gate, up, act, out
               + b * 3 * cfg.shared_d_ffn)
        self.act_core = core
        self.act_layer = attn + (self.n_moe * moe + (L - self.n_moe) * dense) / L
        self.act_input = b * h


def price(st: WorkloadStats, dev: Device, opt: Options, tp, pp, dp, ep, zero, mb, rc) -> dict:
    """Every formula, elementwise over arrays (or scalars) of layouts; rc is the index of the
    recompute level in minimoe.flops.RECOMPUTE (0 none, 1 selective, 2 full).

    Returns a dict of arrays: n_gpus, n_micro, the memory parts (bytes per GPU), `fits`, the time
    parts (seconds per step), step_time, tokens_per_s, mfu and cost_per_mtok. Call it only on
    layouts `valid_layouts` accepts: elsewhere the numbers are defined but meaningless.
    """
    tp, pp, dp, ep, zero, mb, rc = (np.asarray(x, dtype=np.float64)
                                    for x in (tp, pp, dp, ep, zero, mb, rc))
    h, s, gpn = st.d, st.s, dev.gpus_per_node
    n_gpus = tp * pp * dp
    n_micro = st.global_batch / (dp * mb)  # micro-batches per step (valid where integral)
    layers = st.n_layers / pp  # per stage
    moe_layers = st.n_moe / pp
    tokens = mb * s  # tokens in one micro-batch on one data-parallel rank
    out = {"n_gpus": n_gpus, "n_micro": n_micro}

    # --- memory per GPU, bytes -----------------------------------------------------------------
    vocab = st.V * h * np.where(pp == 1, st.vocab_mats, 1)  # first stage embeds, last has the head
    p_dense = (layers * st.layer_params + vocab) / tp
    p_expert = st.expert_params / pp / (ep * tp)  # expert TP = TP (Megatron's default ETP)
    dp_expert = dp / ep
    for name, nbytes, stage in (("weights", opt.weight_bytes, 3), ("grads", opt.grad_bytes, 2),
                                ("optimizer", opt.optimizer_bytes, 1)):
        out[name] = nbytes * (p_dense / np.where(zero >= stage, dp, 1)
                              + p_expert / np.where(zero >= stage, dp_expert, 1))
    full_layer = tokens * st.act_layer / tp
    kept = np.where(rc == 0, full_layer, np.where(rc == 1, full_layer - tokens * st.act_core / tp,
                                                  tokens * st.act_input / tp))
    rebuilt = np.where(rc == 2, full_layer, 0.0)  # full recompute rebuilds one layer at a time
    logits = 4 * tokens * st.V / tp  # fp32 logits for the cross-entropy, last stage
    first = layers * kept * np.minimum(n_micro, pp) + rebuilt
    last = layers * kept + rebuilt + logits
    out["activations"] = np.maximum(first, last)
    out["memory"] = out["weights"] + out["grads"] + out["optimizer"] + out["activations"]
    out["fits"] = out["memory"] <= opt.memory_usable * dev.hbm_bytes

    # --- time ----------------------------------------------------------------------------------
    recompute_fwd = np.where(rc == 1, st.core_fwd, np.where(rc == 2, st.core_fwd + st.rest_fwd, 0))
    layer_flops = 3 * (st.core_fwd + st.rest_fwd) + recompute_fwd  # per token
    stage_flops = tokens * (layers * layer_flops + 3 * st.lm_fwd) / tp  # slowest: has the LM head
    t_compute = stage_flops / (dev.peak_flops * opt.gemm_efficiency)

    def bandwidth(group_span):  # NVLink while the group fits in a node, else the NIC
        return np.where(group_span <= gpn, dev.intra_node_bw * dev.intra_node_eff,
                        dev.inter_node_bw * dev.inter_node_eff)

    extra = np.where(rc == 2, 2, 0)  # full recompute repeats the forward's collectives
    # TP with sequence parallel: 2 all-gathers + 2 reduce-scatters per layer forward, the same
    # in backward; together they move what 4 ring all-reduces do, 2 (t-1)/t of the activation
    tp_bytes = layers * (4 + extra) * (tp - 1) / tp * tokens * h * opt.act_bytes
    t_tp = tp_bytes / bandwidth(tp)
    # EP: dispatch + combine forward, mirrored in backward (DeepEP README); tokens split over TP
    a2a_bytes = (moe_layers * (4 + extra) * (tokens / tp) * st.top_k * h * opt.act_bytes
                 * (ep - 1) / ep * st.capacity)
    t_ep = a2a_bytes / bandwidth(tp * ep)
    # PP: one activation forward and one gradient back per micro-batch per stage boundary
    t_pp = np.where(pp > 1, 2 * tokens * h * opt.act_bytes / tp, 0) / bandwidth(n_gpus)
    t_micro = t_compute + (1 - opt.overlap) * (t_tp + t_ep) + t_pp
    t_pipeline = (n_micro + pp - 1) * t_micro
    # DP: reduce-scatter gradients + all-gather weights (= one all-reduce) per step; ZeRO-3
    # gathers the weights again in every micro-batch's forward and backward
    def dp_volume(params, group):
        per_pass = (group - 1) / group * params * opt.comm_bytes
        return np.where(zero >= 3, (1 + 2 * n_micro) * per_pass, 2 * per_pass)

    dp_bytes = dp_volume(p_dense, dp) + dp_volume(p_expert, dp_expert)
    t_dp = dp_bytes / bandwidth(tp * dp)
    t_optimizer = (out["weights"] + out["grads"] + out["optimizer"]) / dev.hbm_bw
    step = t_pipeline + (1 - opt.overlap) * t_dp + t_optimizer
    out.update(compute=n_micro * t_compute, bubble=(pp - 1) * t_micro,
               tp_comm=n_micro * (1 - opt.overlap) * t_tp,
               ep_comm=n_micro * (1 - opt.overlap) * t_ep, pp_comm=n_micro * t_pp,
               dp_comm=(1 - opt.overlap) * t_dp, optimizer_step=t_optimizer, step_time=step)
    tokens_step = st.global_batch * s
    out["tokens_per_s"] = tokens_step / step
    out["mfu"] = tokens_step * st.model_per_token / (n_gpus * dev.peak_flops * step)
    out["cost_per_mtok"] = n_gpus * step / 3600 * dev.price_per_hour / tokens_step * 1e6
    return out


class LayoutColumns:
    """A layout's fields as numbers, scalars or equal-length arrays: what the rules test."""

    def __init__(self, tp, pp, dp, ep, zero, micro_batch, recompute):
        self.tp, self.pp, self.dp, self.ep = tp, pp, dp, ep
        self.zero, self.micro_batch, self.recompute = zero, micro_batch, recompute  # recompute: index

    @classmethod
    def of(cls, layout: Layout) -> "LayoutColumns":
        rc = RECOMPUTE.index(layout.recompute) if layout.recompute in RECOMPUTE else -1
        return cls(layout.tp, layout.pp, layout.dp, layout.ep, layout.zero, layout.micro_batch, rc)


@dataclass(frozen=True)
class Divisibles:
    """What a layout splits (heads, layers, experts, the batch): all the rules need to know.
    WorkloadStats carries the same names, so either can be given to the rules."""

    n_heads: int
    n_kv_heads: int
    n_layers: int
    n_experts: int
    global_batch: int

    @classmethod
    def of(cls, w: Workload) -> "Divisibles":
        c = w.cfg
        return cls(c.n_heads, c.n_kv_heads, c.n_layers, c.n_experts, w.global_batch)


# Which layouts a framework can run: every split divides what it splits. The one list of the
# rules: (field, test on LayoutColumns of scalars or arrays, the rule in words). The tests use
# & and %, so they hold elementwise on numpy arrays and on plain ints alike.
LAYOUT_RULES = (
    ("tp", lambda st, c: (st.n_heads % c.tp == 0) & (st.n_kv_heads % c.tp == 0),
     "must divide n_heads={n_heads} and n_kv_heads={n_kv_heads}"),
    ("pp", lambda st, c: st.n_layers % c.pp == 0, "must divide n_layers={n_layers}"),
    ("ep", lambda st, c: (c.dp % c.ep == 0) & ((st.n_experts % c.ep == 0) if st.n_experts
                                                else (c.ep == 1)),
     "must divide dp={dp} and n_experts={n_experts} (1 for a dense model)"),
    ("zero", lambda st, c: (c.zero >= 0) & (c.zero <= 3), "must be 0, 1, 2 or 3"),
    ("recompute", lambda st, c: (c.recompute >= 0) & (c.recompute < len(RECOMPUTE)),
     "must be one of " + ", ".join(RECOMPUTE)),
    ("micro_batch", lambda st, c: st.global_batch % (c.dp * c.micro_batch) == 0,
     "dp x micro_batch must divide the global batch of {global_batch} sequences"),
)


def rule_failures(st: WorkloadStats | Divisibles, columns: LayoutColumns) -> dict[str, np.ndarray]:
    """Each rule's verdict over the columns: field -> boolean array, True where the rule fails."""
    return {name: ~np.asarray(test(st, columns), dtype=bool) for name, test, _ in LAYOUT_RULES}


def valid_layouts(st: WorkloadStats | Divisibles, columns: LayoutColumns) -> np.ndarray:
    """True where a layout passes every rule of LAYOUT_RULES."""
    fails = rule_failures(st, columns)
    return ~np.logical_or.reduce(list(fails.values()))


def rule_text(name: str, st: WorkloadStats | Divisibles, dp=None) -> str:
    """The rule of field `name` in words, with this workload's numbers."""
    rule = dict((n, r) for n, _, r in LAYOUT_RULES)[name]
    return rule.format(n_heads=st.n_heads, n_kv_heads=st.n_kv_heads, n_layers=st.n_layers,
                       n_experts=st.n_experts, global_batch=st.global_batch, dp=dp)


def check_layout(layout: Layout, workload: Workload, n_gpus: int | None = None,
                 where: str = "layout") -> None:
    """Raise ValueError naming the first field of `layout` that cannot work."""
    for name in ("tp", "pp", "dp", "ep", "micro_batch", "zero"):
        value = getattr(layout, name)
        smallest = 0 if name == "zero" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            rule = "must be 0, 1, 2 or 3" if name == "zero" else "must be a positive integer"
            raise ValueError(f"{where}.{name}={value!r}: {rule}")
    if n_gpus is not None and layout.n_gpus != n_gpus:
        raise ValueError(f"{where}.dp={layout.dp!r}: tp x pp x dp = {layout.n_gpus} must equal "
                         f"the {n_gpus} GPUs")
    st = Divisibles.of(workload)
    for name, failed in rule_failures(st, LayoutColumns.of(layout)).items():
        if failed:
            raise ValueError(f"{where}.{name}={getattr(layout, name)!r}: "
                             f"{rule_text(name, st, layout.dp)}")


@dataclass(frozen=True)
class SimResult:
    """One layout priced: memory (bytes per GPU) and time (seconds per step) with throughput.

    `time` holds the exposed seconds of each part of a step (communication after `overlap`);
    compute + bubble + tp_comm + ep_comm + pp_comm + dp_comm + optimizer_step = step_time.
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

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_s * SECONDS_PER_DAY

    def run(self, tokens: float) -> dict:
        """Days, GPU-days, PF-days, energy and money to train on `tokens` tokens."""
        seconds = tokens / self.tokens_per_s
        gpu_hours = self.n_gpus * seconds / 3600
        return {"tokens": tokens, "days": seconds / SECONDS_PER_DAY,
                "gpu_days": gpu_hours / 24, "gpu_hours": gpu_hours,
                "pf_days": tokens * self.model_flops_per_token / PF_DAY,
                "energy_kwh": gpu_hours * self.power_w * self.pue / 1000,
                "cost_usd": gpu_hours * self.price_per_hour}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_day"] = self.tokens_per_day
        return d


def priced_result(st: WorkloadStats, dev: Device, opt: Options, layout: Layout,
                  values: dict) -> SimResult:
    """A SimResult from `price`'s output for one layout (0-d arrays)."""
    pick = {k: float(v) for k, v in values.items()}
    memory = {k: pick[k] for k in ("weights", "grads", "optimizer", "activations", "memory")}
    memory["usable"] = opt.memory_usable * dev.hbm_bytes
    time_keys = ("compute", "bubble", "tp_comm", "ep_comm", "pp_comm", "dp_comm",
                 "optimizer_step", "step_time")
    return SimResult(layout=layout, device=dev.name, memory=memory,
                     time={k: pick[k] for k in time_keys},
                     tokens_per_step=st.global_batch * st.s, tokens_per_s=pick["tokens_per_s"],
                     mfu=pick["mfu"], fits=bool(pick["fits"]), n_gpus=int(pick["n_gpus"]),
                     price_per_hour=dev.price_per_hour, power_w=dev.power_w, pue=opt.pue,
                     model_flops_per_token=st.model_per_token)


def simulate(workload: Workload, layout: Layout, device: Device,
             options: Options = Options()) -> SimResult:
    """Price one layout. Raises ValueError if the layout cannot run; check `.fits` for memory."""
    check_layout(layout, workload)
    st = WorkloadStats(workload, options)
    values = price(st, device, options, layout.tp, layout.pp, layout.dp, layout.ep,
                   layout.zero, layout.micro_batch, RECOMPUTE.index(layout.recompute))
    return priced_result(st, device, options, layout, values)
