"""Parallel layouts and which of them can run.

A `Layout` says how a model is cut over GPUs (tensor, pipeline, data and expert parallel, ZeRO
stage, micro-batch, recompute). `LAYOUT_RULES` is the one list of what makes a layout valid
(every split divides what it splits): the vectorised search evaluates it on arrays of layouts
(`valid_layouts`, `rule_failures`), `check_layout` on one layout, with a message naming the
field, its value and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minimoe.checks import check_fields
from minimoe.config import ModelConfig
from minimoe.flops import RECOMPUTE


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
    # expert tensor parallel: the experts' own TP degree, their EP x ETP groups folded over the
    # tp x dp ranks of a stage (MoE Parallel Folding, arXiv 2504.14960 §3; Megatron's
    # --expert-tensor-parallel-size). 0 means etp = tp, Megatron's default
    etp: int = 0

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    def label(self) -> str:
        fold = f" etp{self.etp}" if self.etp and self.etp != self.tp else ""
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} ep{self.ep}{fold} zero{self.zero} "
                f"mb{self.micro_batch} rc-{self.recompute}")


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


class LayoutColumns:
    """A layout's fields as numbers, scalars or equal-length arrays: what the rules test."""

    def __init__(self, tp, pp, dp, ep, zero, micro_batch, recompute, etp=None):
        self.tp, self.pp, self.dp, self.ep = tp, pp, dp, ep
        self.zero, self.micro_batch, self.recompute = zero, micro_batch, recompute  # recompute: index
        self.etp = tp if etp is None else etp

    @classmethod
    def of(cls, layout: Layout) -> "LayoutColumns":
        rc = RECOMPUTE.index(layout.recompute) if layout.recompute in RECOMPUTE else -1
        return cls(layout.tp, layout.pp, layout.dp, layout.ep, layout.zero, layout.micro_batch, rc,
                   layout.expert_tp)


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
    ("ep", lambda st, c: ((c.tp * c.dp) % (c.ep * c.etp) == 0)
     & ((st.n_experts % c.ep == 0) if st.n_experts else (c.ep == 1)),
     "must divide n_experts={n_experts} (1 for a dense model), and ep x etp must divide tp x dp "
     "(with etp = tp: ep must divide dp={dp})"),
    ("zero", lambda st, c: (c.zero >= 0) & (c.zero <= 3), "must be 0, 1, 2 or 3"),
    ("recompute", lambda st, c: (c.recompute >= 0) & (c.recompute < len(RECOMPUTE)),
     "must be one of " + ", ".join(RECOMPUTE)),
    ("micro_batch", lambda st, c: st.global_batch % (c.dp * c.micro_batch) == 0,
     "dp x micro_batch must divide the global batch of {global_batch} sequences"),
)


def rule_failures(st: Divisibles, columns: LayoutColumns) -> dict[str, np.ndarray]:
    """Each rule's verdict over the columns: field -> boolean array, True where the rule fails."""
    return {name: ~np.asarray(test(st, columns), dtype=bool) for name, test, _ in LAYOUT_RULES}


def valid_layouts(st: Divisibles, columns: LayoutColumns) -> np.ndarray:
    """True where a layout passes every rule of LAYOUT_RULES."""
    fails = rule_failures(st, columns)
    return ~np.logical_or.reduce(list(fails.values()))


def rule_text(name: str, st: Divisibles, dp=None) -> str:
    """The rule of field `name` in words, with this workload's numbers."""
    rule = dict((n, r) for n, _, r in LAYOUT_RULES)[name]
    return rule.format(n_heads=st.n_heads, n_kv_heads=st.n_kv_heads, n_layers=st.n_layers,
                       n_experts=st.n_experts, global_batch=st.global_batch, dp=dp)


def check_layout(layout: Layout, workload: Workload, n_gpus: int | None = None,
                 where: str = "layout") -> None:
    """Raise ValueError naming the first field of `layout` that cannot work."""
    check_fields(where, layout, {**dict.fromkeys(("tp", "pp", "dp", "ep", "micro_batch"), "int>0"),
                                 "zero": "int>=0", "etp": "int>=0"})
    if n_gpus is not None and layout.n_gpus != n_gpus:
        raise ValueError(f"{where}.dp={layout.dp!r}: tp x pp x dp = {layout.n_gpus} must equal "
                         f"the {n_gpus} GPUs")
    st = Divisibles.of(workload)
    for name, failed in rule_failures(st, LayoutColumns.of(layout)).items():
        if failed:
            raise ValueError(f"{where}.{name}={getattr(layout, name)!r}: "
                             f"{rule_text(name, st, layout.dp)}")
