"""The cost model's knobs: every default a cited figure or a stated assumption.

`Options` is what a scenario's `[options]` table, a phase's `options` and `minimoe plan --set`
set. Each field is checked for its type and range on construction, so a wrong value is one line
naming the key, the value and the rule. docs/simulator.md explains each term the options feed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from minimoe.checks import check_fields, known_keys
from minimoe.flops import ATTENTION

# Llama 3 (arXiv 2407.21783 §3.3.4): 419 unexpected interruptions in a 54-day snapshot of
# pre-training on 16,384 H100 GPUs
LLAMA3_FAILURES_PER_GPU_DAY = 419 / (54 * 16384)
OVERLAPS = ("overlap_tp", "overlap_ep", "overlap_dp", "overlap_pp")


@dataclass(frozen=True)
class Options:
    """Knobs of the cost model (units in the names; see the module doc)."""

    # --- compute -------------------------------------------------------------------------------
    # achievable share of peak on large GEMMs, the roofline's compute ceiling. 0.5 is the
    # uncalibrated default; `minimoe validate` fits one value per device family on dense runs
    gemm_efficiency: float = 0.5
    gemm_roofline: bool = True  # a GEMM of low arithmetic intensity runs at HBM speed instead
    # achievable share of HBM bandwidth for streaming kernels (assumption: STREAM-like kernels
    # reach 80-90% of peak on HBM GPUs)
    hbm_efficiency: float = 0.8
    memory_bound_work: bool = True  # time the norms, activations, rotary, softmax, permutes...
    # --- MoE -----------------------------------------------------------------------------------
    # max / mean tokens of the busiest expert-parallel rank: 1.0 is perfect balance, the value
    # for a capacity-factor-1 run that drops overflow. It applies where ep > 1: with every
    # expert on one rank, that rank does the same work however the tokens split
    imbalance: float = 1.0
    # or measured: a minimoe run's folder or log.jsonl; its logged routing histograms give the
    # factor of each EP degree (minimoe.sim.imbalance.imbalance_by_ep), so ep trades against it
    imbalance_log: str = ""
    pad_to_capacity: bool = False  # MoE buffers padded to capacity_factor (GShard style)
    # --- communication: share of each kind hidden behind compute -----------------------------
    # Megatron (2024) overlaps the data-parallel reduce-scatter / all-gather with backward and
    # forward (--overlap-grad-reduce, --overlap-param-gather: all but the last bucket), leaves
    # the TP collectives, the EP all-to-all and the 1F1B pipeline sends on the critical path
    # (NVIDIA/Megatron-LM megatron/core/distributed and moe READMEs)
    overlap_tp: float = 0.0
    overlap_ep: float = 0.0
    overlap_dp: float = 0.9
    overlap_pp: float = 0.0
    # the data-parallel reduction hides only behind the compute beside it (one micro-batch;
    # every micro-batch under ZeRO-3), not behind the whole step
    overlap_window: bool = True
    # start-up latency of one collective step (assumption: the order of nccl-tests small-message
    # latencies, a few us on NVLink and ~10 us across InfiniBand)
    latency_intra_us: float = 5.0
    latency_inter_us: float = 15.0
    virtual_stages: int = 1  # interleaved 1F1B: bubble / v, v x the pipeline sends (Narayanan 2021)
    # --- bytes ---------------------------------------------------------------------------------
    weight_bytes: float = 2  # bf16
    grad_bytes: float = 4  # fp32 main gradients (Megatron); 2 for ZeRO's 16 B/param
    optimizer_bytes: float = 12  # fp32 master + Adam m + v (ZeRO's K = 12)
    act_bytes: float = 2  # bf16 activations
    comm_bytes: float = 2  # gradients and weights travel in bf16
    flash_attention: bool = True  # no s x s score matrix is stored (SDPA, FlashAttention)
    # Megatron pads the vocabulary to a multiple of 128 x tp, so tp always splits it; False: a
    # vocabulary tp does not divide stays whole on each tp rank (minimoe's torchrun path)
    pad_vocab: bool = True
    memory_usable: float = 0.9  # assumption: share of HBM left after CUDA context and fragmentation
    # whose memory (minimoe/sim/memory.py): "megatron" (Megatron-LM, the published runs) or
    # "minimoe" (this project's FSDP2 path, as `minimoe dry-run` measures it)
    memory_model: str = "megatron"
    # gradients reduce-scattered after every micro-batch (FSDP2's way, sharded between them)
    # or once per step (Megatron's: held whole until then); and their bytes in the reduction
    reduce_every_micro_batch: bool = False
    reduce_bytes: float = 2
    attention: str = "causal"  # FLOP convention of the reported model FLOPs and MFU
    # --- goodput: days of training -> wall-clock days ----------------------------------------
    failures_per_gpu_day: float = LLAMA3_FAILURES_PER_GPU_DAY
    restart_minutes: float = 30.0  # assumption: detect, reschedule, reload a checkpoint
    checkpoint_minutes: float = 60.0  # assumption: interval between checkpoints
    checkpoint_gbs: float = 1.0  # assumption: GB/s each GPU writes its shard to storage
    pue: float = 1.0  # data-centre power usage effectiveness applied to GPU board power

    def __post_init__(self):
        check_fields("options", self, {f.name: RULES.get(f.name, f.type.replace("float", ""))
                                       for f in dataclasses.fields(self)})
        if self.imbalance_log and self.imbalance != 1.0:
            raise ValueError(f"options.imbalance_log={self.imbalance_log!r}: give imbalance or "
                             "imbalance_log, not both")

    def replace(self, **changes) -> "Options":
        """A copy with `changes`; an unknown name is a ValueError listing the known ones."""
        known_keys("options", changes, {f.name for f in dataclasses.fields(self)})
        return dataclasses.replace(self, **changes)


RULES = {  # minimoe/checks.py; a field not named here need only have its type
    **dict.fromkeys(("gemm_efficiency", "hbm_efficiency", "memory_usable"), "(0, 1]"),
    **dict.fromkeys(OVERLAPS, "[0, 1]"), "imbalance": "[1, inf)", "pue": "[1, inf)",
    **dict.fromkeys(("latency_intra_us", "latency_inter_us", "optimizer_bytes",
                     "failures_per_gpu_day", "restart_minutes"), "[0, inf)"),
    **dict.fromkeys(("weight_bytes", "grad_bytes", "act_bytes", "comm_bytes",
                     "checkpoint_minutes", "checkpoint_gbs"), "(0, inf)"),
    "virtual_stages": "int[1, inf)", "attention": ATTENTION,
    "memory_model": ("megatron", "minimoe"), "reduce_bytes": "(0, inf)",
}


def parse_assignments(pairs: list[str], base: Options = Options()) -> Options:
    """Options from `key=value` strings (`minimoe plan --set`): values read as TOML scalars
    (0.4, 2, true, "causal"); a bare word is taken as a string."""
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: must be key=value")
        changes[key.strip()] = _scalar(text.strip())
    return base.replace(**changes)


def _scalar(text: str):
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip('"')


def goodput(opt: Options, n_gpus: int, step_seconds: float, state_bytes_per_gpu: float) -> dict:
    """Share of wall-clock time that trains, with checkpoints and failures (Young/Daly style):

    checkpoint overhead = write time / interval (the job waits for a synchronous write);
    failures per day = failures_per_gpu_day x GPUs, each losing the restart and, on average,
    half a checkpoint interval of work (plus the step in flight).
    """
    write_s = state_bytes_per_gpu / (opt.checkpoint_gbs * 1e9)
    interval_s = opt.checkpoint_minutes * 60
    checkpoint_share = write_s / (interval_s + write_s)
    failures_per_s = opt.failures_per_gpu_day * n_gpus / 86400
    lost_s = opt.restart_minutes * 60 + interval_s / 2 + step_seconds
    failure_share = min(1.0, failures_per_s * lost_s)
    return {"goodput": (1 - checkpoint_share) * (1 - failure_share),
            "checkpoint_share": checkpoint_share, "failure_share": failure_share,
            "failures_per_day": failures_per_s * 86400}
