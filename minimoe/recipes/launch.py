"""Full-size launch recipes (scaling/full/*.toml): one run of the paper each, its layout (the
simulator's search, narrowed to this torchrun path), and the `minimoe` commands that run it
(scaling/launch.sh). docs/recipes.md#full-size-launch-recipes."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimoe import dist, files
from minimoe.checks import check_fields, from_table
from minimoe.config import get_preset
from minimoe.flops import RECOMPUTE
from minimoe.sim.cost import Options, simulate
from minimoe.sim.hardware import get_device
from minimoe.sim.layout import Layout, Workload
from minimoe.sim.search import search_layouts
from minimoe.tensor_parallel import check_tensor_parallel
from minimoe.train import TrainConfig

STAGES = ("pretrain", "scale-up", "scale-out")
ENGINE_OPTIONS = Options(weight_bytes=4, grad_bytes=4, optimizer_bytes=8, reduce_bytes=4,
                         memory_model="minimoe", reduce_every_micro_batch=True)


@dataclass(frozen=True)
class TrainPlan:
    tokens_b: float  # training tokens, billions (Table 3)
    batch_tokens: int  # tokens per optimizer step (Table 3's "12M" = 12 x 2^20)
    seq_len: int
    lr: float
    warmup: int = 2000  # not in the paper: our choice
    eval_every: int = 1000
    ckpt_every: int = 500
    bf16: bool = True

    def __post_init__(self):
        check_fields("train", self, {"tokens_b": ">0", "batch_tokens": "int[1, 1099511627776]",
                                     "seq_len": "int[1, 16777216]", "lr": ">0",
                                     "warmup": "int>=0", "eval_every": "int>0",
                                     "ckpt_every": "int>0", "bf16": "bool"})
        if self.tokens_b * 1e9 < self.batch_tokens or self.batch_tokens < self.seq_len:
            raise ValueError(f"train: tokens_b={self.tokens_b}, batch_tokens={self.batch_tokens}, "
                             f"seq_len={self.seq_len}: must make at least one step of a sequence")


@dataclass(frozen=True)
class LayoutPlan:
    gpus: int  # what the run uses: whole nodes, at most cluster_gpus
    cluster_gpus: int = 0  # the cluster the paper names (0: gpus)
    gpus_per_node: int = 8
    gpu: str = "h100"
    parallel: str = "fsdp"
    ep: int = 1
    tp: int = 1  # tensor parallel (with sequence parallel), a dense model under FSDP2
    micro_batch: int = 1
    activation_checkpointing: bool = False
    device: str = "cuda"  # cpu: the same launch on gloo (tests, a laptop)

    def __post_init__(self):
        check_fields("layout", self, {
            "gpus": "int[1, 1048576]", "cluster_gpus": "int[0, 1048576]", "gpu": "str",
            **dict.fromkeys(("gpus_per_node", "ep", "tp", "micro_batch"), "int[1, 65536]"),
            "parallel": ("fsdp", "ddp"), "device": ("cuda", "cpu"),
            "activation_checkpointing": "bool"})

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    def sim_layout(self) -> Layout:
        return Layout(tp=self.tp, pp=1, dp=self.dp, ep=self.ep,
                      zero=3 if self.parallel == "fsdp" else 0,
                      micro_batch=self.micro_batch,
                      recompute="full" if self.activation_checkpointing else "none")


@dataclass(frozen=True)
class LaunchRecipe:
    name: str
    stage: str
    preset: str  # the shape this run trains
    out: str
    train: TrainPlan
    layout: LayoutPlan
    source: str = ""  # scale-up / scale-out: the run it grows from
    data: str = ""  # pretrain: a shard folder of `minimoe tokenize`
    method: str = ""  # scale-up: aki-pro ...; scale-out: upcycle
    kv: str = "keep"  # scale-up: mean-pool when the target has fewer KV groups
    experts: int = 8
    top_k: int = 2

    def __post_init__(self):
        check_fields("", self, {**dict.fromkeys(("name", "preset", "out", "source", "data",
                                                  "method", "kv"), "str"), "stage": STAGES,
                                **dict.fromkeys(("experts", "top_k"), "int[1, 1024]")})
        needs = {"pretrain": ("data",), "scale-up": ("source", "method"), "scale-out": ("source",)}
        for key in needs[self.stage]:
            if not getattr(self, key):
                raise ValueError(f"{key}: a {self.stage} recipe needs it")
        cfg, layout = self.model_config, self.layout
        if self.stage == "scale-out" and (cfg.n_experts, cfg.top_k) != (self.experts, self.top_k):
            raise ValueError(f"experts={self.experts}, top_k={self.top_k}: preset {self.preset} "
                             f"has {cfg.n_experts} experts, top-{cfg.top_k}")
        if layout.tp > 1:
            check_tensor_parallel(cfg, layout.tp, self.train.seq_len)
            if layout.parallel != "fsdp" or layout.tp > layout.gpus_per_node:
                raise ValueError(f"[layout] tp={layout.tp}: runs with parallel = \"fsdp\", "
                                 f"inside a node of {layout.gpus_per_node}")
        self.simulated  # the simulator's layout rules
        if layout.gpus % layout.gpus_per_node:
            raise ValueError(f"[layout] gpus={layout.gpus}: must be whole nodes of "
                             f"{layout.gpus_per_node}")

    @property
    def model_config(self):
        """The shape trained: the preset, or for scale-out from a dense preset, that preset
        upcycled into `experts` experts, top-`top_k`."""
        cfg = get_preset(self.preset)
        if self.stage == "scale-out" and not cfg.is_moe:
            cfg = cfg.replace(n_experts=self.experts, top_k=self.top_k)
        return cfg

    @property
    def simulated(self):
        """The simulator's step of this layout, as this torchrun path runs it (ENGINE_OPTIONS)."""
        return simulate(self.workload, self.layout.sim_layout(), get_device(self.layout.gpu),
                        ENGINE_OPTIONS)

    @property
    def workload(self) -> Workload:
        return Workload.from_tokens(self.model_config, self.train.batch_tokens, self.train.seq_len)

    @property
    def steps(self) -> int:
        return round(self.train.tokens_b * 1e9 / self.train.batch_tokens)

    @property
    def grad_accum(self) -> int:
        return self.workload.global_batch // (self.layout.dp * self.layout.micro_batch)


def load_launch_recipe(path) -> LaunchRecipe:
    """A recipe file, every key known, held to the rules of its dataclasses."""
    path = Path(path)
    table = files.read_toml(path)
    try:
        parts = {}
        for key, cls in {"train": TrainPlan, "layout": LayoutPlan}.items():
            given = table.pop(key, None)
            if not isinstance(given, dict):
                raise ValueError(f"[{key}] is missing")
            parts[key] = from_table(cls, given, f"[{key}]")
        if "from" in table:
            table["source"] = table.pop("from")
        return from_table(LaunchRecipe, table, "", **parts)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def engine_plan(recipe: LaunchRecipe):
    """The fastest layout that fits among those this torchrun path runs and `minimoe dry-run`
    rehearses (FSDP2: DDP's reducer cannot run on fake tensors), on whole nodes of the recipe's
    cluster (ties: fewer GPUs), found by the simulator's search: (LayoutPlan, SimResult)."""
    w, layout = recipe.workload, recipe.layout
    cfg, per_node = w.cfg, layout.gpus_per_node
    device = dataclasses.replace(get_device(layout.gpu), gpus_per_node=per_node)
    # what this path runs: FSDP2 (ZeRO-3), no context or pipeline parallelism, recompute all or
    # nothing, experts split by the same tp as the rest (etp 0: no folding)
    axes = {"tp": [tp for tp in (1, 2, 4, 8) if tp == 1 or _splits(recipe, tp)], "cp": [1],
            "pp": [1], "zero": [3], "micro_batch": [1, 2, 4, 8],
            "recompute": [RECOMPUTE.index("none"), RECOMPUTE.index("full")], "etp": [0]}

    def keep(g):  # whole nodes; no expert weight FSDP2 would pad to a whole expert a rank
        shapes = ((cfg.n_experts // ep, cfg.expert_d_ffn or cfg.d_ffn, cfg.d_model, n // ep // tp)
                  for n, ep, tp in zip(g["n_gpus"], g["ep"], g["tp"]))
        even = [not cfg.n_experts or dist.even_dim(s[:3], s[3]) is not None for s in shapes]
        return (g["n_gpus"] % per_node == 0) & np.array(even, dtype=bool)

    cluster = layout.cluster_gpus or layout.gpus
    best = search_layouts(w, device, cluster, ENGINE_OPTIONS, axes=axes, keep=keep).fastest
    if best is None:
        raise ValueError(f"{recipe.name}: no layout of this torchrun path on up to {cluster} "
                         f"{layout.gpu} GPUs fits this model and divides its batch")
    plan = dataclasses.replace(layout, gpus=best.n_gpus, parallel="fsdp", ep=best.layout.ep,
                               tp=best.layout.tp, micro_batch=best.layout.micro_batch,
                               activation_checkpointing=best.layout.recompute == "full")
    return plan, best


def _splits(recipe: LaunchRecipe, tp: int) -> bool:
    """Whether engine_plan tries `tp`: inside a node, where the model splits (dense only)."""
    try:
        check_tensor_parallel(recipe.model_config, tp, recipe.train.seq_len)
    except ValueError:
        return False
    return tp <= recipe.layout.gpus_per_node


def train_config(r: LaunchRecipe) -> TrainConfig:
    """The training run of a recipe, on each rank (the global batch is dp x micro-batch)."""
    t, layout = r.train, r.layout
    return TrainConfig(steps=r.steps, batch_size=layout.dp * layout.micro_batch,
                       grad_accum=r.grad_accum, seq_len=t.seq_len, lr=t.lr, warmup_steps=t.warmup,
                       eval_every=t.eval_every, ckpt_every=t.ckpt_every, device=layout.device,
                       bf16=t.bf16, parallel=layout.parallel, ep=layout.ep, tp=layout.tp,
                       activation_checkpointing=layout.activation_checkpointing,
                       async_checkpoint=True)


# --- the commands -------------------------------------------------------------------------------
def commands(r: LaunchRecipe) -> dict[str, list[str] | None]:
    """`minimoe` arguments of the recipe's two steps: "prepare" (one process, streamed; None
    for a pretraining run) and "train" (every rank under torchrun)."""
    init = f"{r.out}-init"
    prepare = None
    if r.stage == "scale-up":
        prepare = ["scale-up", "--from", r.source, "--to", r.preset, "--method", r.method,
                   "--kv", r.kv, "--stream", "--out", init]
    elif r.stage == "scale-out":
        prepare = ["scale-out", "--from", r.source, "--experts", str(r.experts), "--top-k",
                   str(r.top_k), "--stream", "--out", init]
    tc = train_config(r)
    start = (["--preset", r.preset, "--data", r.data] if r.stage == "pretrain"
             else ["--init", init])
    train = ["pretrain", *start, "--out", r.out]
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "eval_every",
                 "ckpt_every", "device", "parallel", "ep", "tp"):
        train += [f"--{name.replace('_', '-')}", str(getattr(tc, name))]
    train += ["--warmup", str(tc.warmup_steps)]
    flags = {"bf16": tc.bf16, "activation-checkpointing": tc.activation_checkpointing}
    train += [f"--{flag}" for flag, on in flags.items() if on] + ["--async-checkpoint"]
    return {"prepare": prepare, "train": train}


def launch_args(r: LaunchRecipe, step: str) -> str:
    """What scaling/launch.sh reads: a step's arguments, shell-quoted, or "node" (the GPUs per
    node, the node count and the run's name)."""
    if step == "node":
        return f"{r.layout.gpus_per_node} {r.layout.gpus // r.layout.gpus_per_node} {r.name}"
    argv = commands(r)[step]
    return "" if argv is None else shlex.join(argv)
