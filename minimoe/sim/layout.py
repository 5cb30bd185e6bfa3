"""Parallel layouts (`Layout`), the workload they cut (`Workload`; `WorkloadStats`, its per-token
figures), and `LAYOUT_RULES`, the one list of what makes a layout valid (arrays or one layout)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from minimoe.checks import check_fields
from minimoe.config import ModelConfig, get_preset
from minimoe.flops import RECOMPUTE, flops_per_token
from minimoe.sim.imbalance import histograms_from_log, imbalance_by_ep
from minimoe.sim.memory import MemoryStats


@dataclass(frozen=True)
class Layout:
    """How a model is cut over GPUs: n_gpus = tp * cp * pp * dp; EP groups fold into tp x cp x dp."""

    tp: int = 1  # tensor parallel (with sequence parallel)
    pp: int = 1  # pipeline stages
    dp: int = 1  # data parallel replicas
    ep: int = 1  # expert parallel: each EP rank holds n_experts / ep experts of every MoE layer
    zero: int = 1  # 0 DDP, 1 optimizer states sharded, 2 + gradients, 3 + weights (= FSDP)
    micro_batch: int = 1  # sequences per micro-batch per data-parallel rank
    recompute: str = "none"  # "none", "selective" (attention core) or "full" (every layer)
    # expert tensor parallel: the experts' own TP degree (MoE Parallel Folding, arXiv
    # 2504.14960 §3; Megatron's --expert-tensor-parallel-size). 0 means etp = tp
    etp: int = 0
    cp: int = 1  # context parallel: each sequence split over cp ranks (ring attention)
    # layers of the first and last pipeline stage (Megatron's --decoder-first/last-pipeline-
    # num-layers); 0: the even share. The stages between split the rest evenly
    pp_first: int = 0
    pp_last: int = 0

    @property
    def n_gpus(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def label(self) -> str:
        fold = f" etp{self.etp}" if self.etp and self.etp != self.tp else ""
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        stages = f"({self.pp_first or '='}..{self.pp_last or '='})" if self.pp_first or self.pp_last else ""
        return (f"tp{self.tp}{cp} pp{self.pp}{stages} dp{self.dp} ep{self.ep}{fold} "
                f"zero{self.zero} mb{self.micro_batch} rc-{self.recompute}")

    def columns(self) -> SimpleNamespace:
        """The fields as the rules and the cost model read them, and as the search's grid holds
        them: etp resolved (0 means tp), recompute as its index in RECOMPUTE (-1: unknown)."""
        rc = RECOMPUTE.index(self.recompute) if self.recompute in RECOMPUTE else -1
        return SimpleNamespace(**{**vars(self), "etp": self.etp or self.tp, "recompute": rc})


# what published models use that the step model does not hold: refused by name at the door
NOT_MODELLED = {"kv_lora_rank": "multi-head latent attention (MLA)",
                "q_lora_rank": "multi-head latent attention (MLA)",
                "mtp_num_layers": "multi-token prediction (MTP)"}


def model_config(preset: str | None, table: dict | None, where: str,
                 seq_len: int | None = None) -> ModelConfig:
    """A model from a file: a preset, an inline table of ModelConfig fields, or both (a `preset`
    key inside the table names the base, whose fields the table's replace)."""
    if table is not None and not isinstance(table, dict):
        raise ValueError(f"{where}.model={table!r}: must be a table of ModelConfig fields")
    table = dict(table or {})
    for key, what in NOT_MODELLED.items():
        if key in table:
            raise ValueError(f"{where}.model.{key}: {what} is not in the simulator's step model "
                             "(docs/simulator.md \"Not modelled\")")
    base = table.pop("preset", preset)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{where}.preset={base!r}: must be a preset name")
    try:
        if base:
            return get_preset(str(base)).replace(**table)
        return ModelConfig.from_dict({"max_seq_len": seq_len or 4096, **table})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}.model: {err}") from None


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
    """The per-token and per-layer figures `price` reads, once per (workload, options)."""

    READS = ("act_bytes", "pad_to_capacity", "attention", "imbalance_log", "flash_attention", "dtype")

    def __init__(self, w: Workload, opt):
        cfg, s, b = w.cfg, w.seq_len, opt.act_bytes
        self.cfg, self.s, self.global_batch = cfg, s, w.global_batch
        self.n_layers, self.n_moe, self.d, self.V = cfg.n_layers, cfg.n_moe_layers, cfg.d_model, cfg.vocab_size
        self.top_k, self.n_experts, self.n_heads = cfg.top_k, cfg.n_experts, cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q, self.kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.d_ffn, self.expert_d_ffn, self.shared_d_ffn = cfg.d_ffn, cfg.expert_d_ffn, cfg.shared_d_ffn
        # dense layers before the first MoE layer (DeepSeek's first_k_dense): on the first stage
        self.front_dense = next((i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)), 0)
        self.capacity = cfg.capacity_factor if (opt.pad_to_capacity and cfg.capacity_factor) else 1.0
        # a capacity factor drops what overflows it: no rank waits for more than its share x c;
        # padded to capacity, every rank computes c x its share whatever the routing
        self.imbalance_cap = (1.0 if self.capacity > 1 or opt.pad_to_capacity and cfg.capacity_factor
                              else cfg.capacity_factor or float("inf"))
        self.model_per_token = flops_per_token(cfg, s, attention=opt.attention).model
        self.imbalance_by_ep = {} if not (opt.imbalance_log and cfg.is_moe) else imbalance_by_ep(
            histograms_from_log(opt.imbalance_log), cfg.n_experts, "options.imbalance_log")
        counts = cfg.param_counts()
        self.expert_params = counts["experts"]  # all layers
        self.layer_params = (counts["total"] - counts["experts"] - counts["embedding"]
                             - counts["lm_head"]) / cfg.n_layers  # non-expert, incl. router and norms
        self.vocab_mats = 1 if cfg.tie_embeddings else 2
        self.memory = MemoryStats(cfg, opt)  # Options.memory_model "minimoe"
        # activation bytes per token per layer, the tensors the backward keeps (Korthikanti et
        # al. 2022 §4, recounted for RMSNorm, GQA, SwiGLU and MoE)
        h, a, q, kv = cfg.d_model, cfg.n_heads, self.q, self.kv
        core = 4 * a + (0 if opt.flash_attention else b * a * s)  # fp32 log-sum-exp, or the probabilities
        attn = b * (2 * h + 2 * q + 2 * kv) + core  # norm in, QKV in, Q, K, V, output
        dense = b * (2 * h + 3 * cfg.d_ffn)  # norm in, MLP in, gate, up, silu(gate)*up
        moe = (b * 2 * h + 4 * cfg.n_experts + cfg.top_k * b * (2 * h + 3 * cfg.expert_d_ffn)
               + b * 3 * cfg.shared_d_ffn)  # router in + fp32 logits, k routed copies, shared
        self.act_core = core
        self.act_layer = attn + (self.n_moe * moe + (cfg.n_layers - self.n_moe) * dense) / cfg.n_layers
        self.act_input = b * h
        # memory-bound bytes per token of a dense and of an MoE layer, forward and backward:
        # each elementwise kernel reads its inputs and writes its output once
        k, fe, fs, E = cfg.top_k, cfg.expert_d_ffn, cfg.shared_d_ffn, cfg.n_experts
        common_fwd = 2 * 2 * h + 2 * 3 * h + 2 * (q + kv)  # 2 RMSNorms, 2 residual adds, rotary
        common_bwd = 2 * 3 * h + 2 * (q + kv)
        self.membound_dense = b * (common_fwd + common_bwd + 8 * cfg.d_ffn)  # SwiGLU 3f + 5f
        # SwiGLU of k routed and the shared expert, permute/unpermute of k + 1 rows; fp32
        # router logits read and written by softmax and top-k, forward and backward
        self.membound_moe = (b * (common_fwd + common_bwd + 8 * (k * fe + fs) + 4 * (k + 1) * h)
                             + 4 * 4 * E)
        self.membound_fwd_share = 0.5  # of either, what full recompute runs again
        # cross-entropy per token on the last stage, Megatron's unfused vocab-parallel kernels
        # (megatron/core/tensor_parallel/cross_entropy.py): upcast to fp32 (2 + 4 B), max (4),
        # subtract (8), exp (8), sum (4), divide (8) forward; scale (8), cast back (4 + 2) backward
        self.membound_loss = 52 * cfg.vocab_size
        if opt.dtype == "fp8":  # Transformer Engine casts every GEMM input to fp8 (read 2 B, write 1)
            cast = 3 * 2 * (2 * h + q)
            self.membound_dense += cast + 3 * 2 * cfg.d_ffn
            self.membound_moe += cast + 3 * 2 * (k * fe + fs)
        if not opt.flash_attention:  # the s x s scores through HBM: 4 passes forward, 6 backward
            self.membound_dense += 10 * b * a * s  # (Dao et al. 2022 §2.2)
            self.membound_moe += 10 * b * a * s


def rule_failures(w: Workload, c) -> dict[str, np.ndarray]:
    """Each rule's verdict over layout columns `c` (scalars or arrays, Layout.columns' names):
    field -> boolean array, True where the rule fails."""
    return {name: ~np.asarray(test(w.cfg, w, c), dtype=bool) for name, test, _ in LAYOUT_RULES}


def _stages_divide(cfg, w, c):
    middle = c.pp - (c.pp_first > 0) - (c.pp_last > 0)  # stages that share the other layers evenly
    rest = cfg.n_layers - c.pp_first - c.pp_last
    return np.where(middle > 0, (rest > 0) & (rest % np.maximum(middle, 1) == 0), rest == 0) \
        & ((c.pp > 1) | ((c.pp_first == 0) & (c.pp_last == 0)))


# Which layouts a framework can run: every split divides what it splits. (field, test on the
# config, workload and columns, the rule in words); & and % hold elementwise on arrays and ints.
LAYOUT_RULES = (
    ("tp", lambda cfg, w, c: (cfg.n_heads % c.tp == 0) & (cfg.n_kv_heads % c.tp == 0),
     "must divide n_heads={n_heads} and n_kv_heads={n_kv_heads}"),
    ("cp", lambda cfg, w, c: w.seq_len % (2 * c.cp) == 0,
     "2 x cp must divide seq_len={seq_len} (each rank takes two balanced causal chunks)"),
    ("pp", _stages_divide, "must split n_layers={n_layers}: the stages between the first and "
     "last (pp_first, pp_last layers) take the rest evenly"),
    ("ep", lambda cfg, w, c: ((c.tp * c.cp * c.dp) % (c.ep * c.etp) == 0)
     & ((cfg.n_experts % c.ep == 0) if cfg.n_experts else (c.ep == 1)),
     "must divide n_experts={n_experts} (1 for a dense model), and ep x etp must divide "
     "tp x cp x dp (with etp = tp: ep must divide cp x dp={dp})"),
    ("zero", lambda cfg, w, c: (c.zero >= 0) & (c.zero <= 3), "must be 0, 1, 2 or 3"),
    ("recompute", lambda cfg, w, c: (c.recompute >= 0) & (c.recompute < len(RECOMPUTE)),
     "must be one of " + ", ".join(RECOMPUTE)),
    ("micro_batch", lambda cfg, w, c: w.global_batch % (c.dp * c.micro_batch) == 0,
     "dp x micro_batch must divide the global batch of {global_batch} sequences"),
)


def rule_text(name: str, w: Workload, dp="dp") -> str:
    """The rule of field `name` in words, with this workload's numbers."""
    cfg = w.cfg
    return dict((n, r) for n, _, r in LAYOUT_RULES)[name].format(
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, n_layers=cfg.n_layers,
        n_experts=cfg.n_experts, global_batch=w.global_batch, seq_len=w.seq_len, dp=dp)


def check_layout(layout: Layout, workload: Workload, n_gpus: int | None = None,
                 where: str = "layout") -> None:
    """Raise ValueError naming the first field of `layout` that cannot work."""
    check_fields(where, layout, {**dict.fromkeys(("tp", "pp", "dp", "ep", "micro_batch", "cp"),
                                                 "int>0"),
                                 **dict.fromkeys(("zero", "etp", "pp_first", "pp_last"), "int>=0")})
    if n_gpus is not None and layout.n_gpus != n_gpus:
        raise ValueError(f"{where}.dp={layout.dp!r}: tp x cp x pp x dp = {layout.n_gpus} must "
                         f"equal the {n_gpus} GPUs")
    for name, failed in rule_failures(workload, layout.columns()).items():
        if failed:
            value = getattr(layout, name)
            raise ValueError(f"{where}.{name}={value!r}: {rule_text(name, workload, layout.dp)}")
