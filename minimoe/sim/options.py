"""The cost model's knobs (`Options`: a scenario's `[options]`, `minimoe plan --set`), each default
a cited figure, an assumption or a fitted constant (docs/simulator.md "Options"); and goodput."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from minimoe.checks import check, check_fields, known_keys
from minimoe.files import tomllib
from minimoe.flops import ATTENTION

# Llama 3 (arXiv 2407.21783 §3.3.4): 419 unexpected interruptions in 54 days on 16,384 H100s
LLAMA3_FAILURES_PER_GPU_DAY = 419 / (54 * 16384)
# Fitted by `minimoe validate` on sims/validation (tests/test_sim_validate.py checks that it
# still fits these): the central value, and the range the sources' own fits span
GEMM_EFFICIENCY, GEMM_EFFICIENCY_RANGE = 0.70, [0.646, 0.757]
STRAGGLER_SIGMA, STRAGGLER_SIGMA_RANGE = 0.0, [0.0, 0.016]
DISPATCHERS = ("alltoall", "deepep")
DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class Options:
    """Knobs of the cost model (units in the names)."""

    # --- compute ---------------------------------------------------------------------------
    gemm_efficiency: float = GEMM_EFFICIENCY  # share of an SM's peak a GEMM tile's main loop reaches
    hbm_efficiency: float = 0.8  # assumption: STREAM-like kernels reach 80-90% of HBM peak
    dtype: str = "bf16"  # "fp8": GEMMs at the device's FP8 peak, inputs cast (Transformer Engine)
    flash_attention: bool = True  # no s x s score matrix in HBM (FlashAttention, SDPA)
    attention: str = "causal"  # FLOP convention of the reported model FLOPs and MFU
    # --- MoE -------------------------------------------------------------------------------
    # busiest expert-parallel rank / mean (1.0: balanced or dropped); uncertain up to 1.25 unless
    # set (an assumed aux-loss router: docs/simulator.md "Intervals")
    imbalance: float = 1.0
    imbalance_log: str = ""  # or measured: a minimoe run's log, its routing per EP degree
    pad_to_capacity: bool = False  # expert buffers padded to the capacity factor (GShard)
    dispatcher: str = "alltoall"  # or "deepep": one copy per node, NVLink fan-out (DeepEP)
    node_limit: int = 0  # each token reaches at most this many nodes (0: no limit)
    # --- communication ---------------------------------------------------------------------
    # hidden behind the compute beside it (docs/simulator.md "Overlap"); Megatron overlaps the
    # data-parallel reduction by default, the rest on request (--tp-comm-overlap, ...)
    overlap_tp: bool = False
    overlap_ep: bool = False
    overlap_dp: bool = True
    overlap_pp: bool = False
    # compute lost while a collective overlaps it: its kernels hold SMs (DeepEP's normal
    # kernels take 24 of an H800's 132, deepseek-ai/DeepEP README)
    overlap_slowdown: float = 0.18
    # one step of a collective inside a node and between nodes: NCCL's own tuning model for
    # large messages (Simple protocol, src/graph/tuning.cc: NVLink 3.4 us, network 14 us)
    latency_intra_us: float = 3.4
    latency_inter_us: float = 14.0
    virtual_stages: int = 1  # interleaved 1F1B (Narayanan 2021 §2.2)
    reduce_bytes: float = 4  # gradients reduced in fp32 (Megatron with bf16; FSDP2 with fp32 reduce)
    reduce_every_micro_batch: bool = False  # FSDP2's default: reduce-scatter after each backward
    straggler_sigma: float = STRAGGLER_SIGMA  # step-time jitter across nodes (fitted)
    # --- bytes -----------------------------------------------------------------------------
    weight_bytes: float = 2  # bf16
    grad_bytes: float = 4  # fp32 main gradients (Megatron); 2 for ZeRO's 16 B/param
    optimizer_bytes: float = 12  # fp32 master + Adam m + v (ZeRO's K = 12)
    act_bytes: float = 2  # bf16 activations
    # Megatron pads the vocabulary to a multiple of 128 x tp, so tp always splits it; False: a
    # vocabulary tp does not divide stays whole on each tp rank (minimoe's torchrun path)
    pad_vocab: bool = True
    memory_usable: float = 0.9  # assumption: share of HBM left after CUDA context and fragmentation
    # whose memory: "megatron" (Megatron-LM's, the published runs) or "minimoe" (this
    # project's FSDP2 path as `minimoe dry-run` measures it: minimoe/sim/memory.py)
    memory_model: str = "megatron"
    # --- goodput: days of training -> wall-clock days ---------------------------------------
    failures_per_gpu_day: float = LLAMA3_FAILURES_PER_GPU_DAY
    restart_minutes: float = 30.0  # assumption: detect, reschedule, reload a checkpoint
    checkpoint_minutes: float = 60.0  # assumption: interval between checkpoints
    checkpoint_gbs: float = 1.0  # assumption: GB/s each GPU writes its shard to storage
    pue: float = 1.0  # data-centre power usage effectiveness applied to GPU board power
    # --- what the interval spans: option -> [low, high] -------------------------------------
    uncertain: dict = field(default_factory=lambda: {
        "gemm_efficiency": GEMM_EFFICIENCY_RANGE, "straggler_sigma": STRAGGLER_SIGMA_RANGE,
        "imbalance": [1.0, 1.25]})

    def __post_init__(self):
        check_fields("options", self, RULES)
        if self.imbalance_log and self.imbalance != 1.0:
            raise ValueError(f"options.imbalance_log={self.imbalance_log!r}: give imbalance or "
                             "imbalance_log, not both")
        known_keys("options.uncertain", self.uncertain, {k for k, rule in RULES.items()
                                                         if not isinstance(rule, tuple) and rule != "str"})
        for key, pair in self.uncertain.items():
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"options.uncertain.{key}={pair!r}: must be [low, high]")
            for value in pair:
                check("options.uncertain", key, value, RULES[key])

    def replace(self, **changes) -> "Options":
        """A copy with `changes`. A value set here is no longer uncertain (its range becomes
        [value, value]: predictions from one base keep the same corners) unless `uncertain`,
        which adds ranges, gives it one."""
        known_keys("options", changes, {f.name for f in dataclasses.fields(self)})
        uncertain = {k: [changes[k]] * 2 if k in changes else v for k, v in self.uncertain.items()}
        uncertain.update(changes.pop("uncertain", {}) or {})
        return dataclasses.replace(self, **changes, uncertain=uncertain)

    def corners(self) -> list["Options"]:
        """These options at every combination of the ends of the uncertain ranges (a measured
        routing, imbalance_log, keeps the imbalance at its value: the same corners, repeated)."""
        keys = list(self.uncertain)
        ends = [[self.imbalance] * 2 if k == "imbalance" and self.imbalance_log else self.uncertain[k]
                for k in keys]
        return [dataclasses.replace(self, **dict(zip(keys, values)))
                for values in itertools.product(*ends)]


RULES = {  # minimoe/checks.py: every field but `uncertain`
    **dict.fromkeys(("gemm_efficiency", "hbm_efficiency", "memory_usable"), "(0, 1]"),
    **dict.fromkeys(("overlap_tp", "overlap_ep", "overlap_dp", "overlap_pp", "flash_attention",
                     "pad_to_capacity", "reduce_every_micro_batch", "pad_vocab"), "bool"),
    "imbalance": "[1, inf)", "pue": "[1, inf)", "overlap_slowdown": "[0, 1]",
    **dict.fromkeys(("latency_intra_us", "latency_inter_us", "optimizer_bytes", "straggler_sigma",
                     "failures_per_gpu_day", "restart_minutes"), "[0, inf)"),
    **dict.fromkeys(("weight_bytes", "grad_bytes", "act_bytes", "reduce_bytes",
                     "checkpoint_minutes", "checkpoint_gbs"), "(0, inf)"),
    "virtual_stages": "int[1, inf)", "node_limit": "int>=0", "attention": ATTENTION,
    "dtype": DTYPES, "dispatcher": DISPATCHERS, "imbalance_log": "str",
    "memory_model": ("megatron", "minimoe"),
}


def read_options(table, where: str, base: Options = Options(), folder: Path = Path(".")) -> Options:
    """`base` with a file's options table at `where`; an `imbalance_log` path is relative to the
    file's `folder`."""
    table = dict(known_keys(where, table, {f.name for f in dataclasses.fields(Options)}))
    if isinstance(table.get("imbalance_log"), str) and table["imbalance_log"]:
        table["imbalance_log"] = str(folder / table["imbalance_log"])
    try:
        return base.replace(**table)
    except ValueError as err:
        raise ValueError(f"{where}.{str(err).removeprefix('options.')}") from None


def parse_assignments(pairs: list[str], base: Options = Options()) -> Options:
    """Options from `key=value` strings (`minimoe plan --set`), each value read as TOML (0.4, 2,
    true, "causal", [1.0, 1.3]; a bare word is a string); `uncertain.KEY=[low, high]` marks a
    range."""
    changes, uncertain = {}, {}
    for pair in pairs:
        key, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: must be key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if key.startswith("uncertain."):
            uncertain[key.removeprefix("uncertain.")] = value
        else:
            changes[key] = value
    return base.replace(**changes, **({"uncertain": uncertain} if uncertain else {}))


def goodput(opt: Options, n_gpus: int, step_seconds: float, state_bytes_per_gpu: float) -> dict:
    """Share of wall-clock time that trains (Young/Daly): a synchronous checkpoint write per
    interval; failures_per_gpu_day x GPUs failures, each losing the restart, half an interval
    and the step in flight."""
    write_s = state_bytes_per_gpu / (opt.checkpoint_gbs * 1e9)
    interval_s = opt.checkpoint_minutes * 60
    checkpoint_share = write_s / (interval_s + write_s)
    failures_per_s = opt.failures_per_gpu_day * n_gpus / 86400
    lost_s = opt.restart_minutes * 60 + interval_s / 2 + step_seconds
    failure_share = min(1.0, failures_per_s * lost_s)
    return {"goodput": (1 - checkpoint_share) * (1 - failure_share),
            "checkpoint_share": checkpoint_share, "failures_per_day": failures_per_s * 86400,
            "failure_share": failure_share}
