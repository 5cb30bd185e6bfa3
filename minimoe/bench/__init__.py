"""Benchmarks (`minimoe bench NAME`): speed measured against a peer or a physical limit in the
same process, printed as ratios. Never a timed test: CI does not run these, and the library
never imports this package (the CLI loads it only for `minimoe bench`).

    train.py    our training step against transformers' Llama, and its model FLOP/s against
                the fp32 GEMM peak measured in the same process
    moe.py      our MoE layer against the FLOP-equal dense MLP and transformers' Mixtral
    grow.py     streamed Scale-Up of a real-size checkpoint: GB/s and peak memory
    upcycle.py  streamed Scale-Out of a real-size checkpoint: GB/s and peak memory
    dist.py     tokens/s of one process against 2 gloo ranks (torchrun)
    sim.py      the vectorised layout search against a plain loop
    generate.py KV-cached greedy generation against transformers' Llama generate()
    time_factor.py  a finished pipeline's time savings factor measured again, with the load
    step.py     a full-size recipe's step on one GPU against its rehearsal and the simulator

Each benchmark is a function taking the parsed CLI args and printing its table; `BENCHES`
maps the CLI name to it.
"""

from __future__ import annotations

import statistics
import time

import torch

from minimoe.model import build_model
from minimoe.stream import write_safetensors


def timeit(fn, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_random_checkpoint(cfg, path) -> tuple[int, float]:
    """A safetensors file of `cfg`'s tensors, random bf16 (unit norms), written one tensor at a
    time (as a real-size source checkpoint, never whole in memory): (bytes, seconds)."""
    specs = {name: (torch.bfloat16, tuple(t.shape))
             for name, t in build_model(cfg, device="meta").state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def random_tensor(name):
        shape = specs[name][1]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)

    t0 = time.perf_counter()
    written = write_safetensors(path, specs, random_tensor)
    return written, time.perf_counter() - t0


def peak_resident_gb() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), in GB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb * 1024 / 1e9


def reset_peak_resident():
    try:  # Linux: writing 5 to clear_refs resets VmHWM, so one phase can be measured alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# the benchmarks import `timeit` from here, so they are registered after it is defined
from minimoe.bench.dist import bench_dist  # noqa: E402
from minimoe.bench.generate import bench_generate  # noqa: E402
from minimoe.bench.grow import bench_grow  # noqa: E402
from minimoe.bench.moe import bench_moe  # noqa: E402
from minimoe.bench.sim import bench_sim  # noqa: E402
from minimoe.bench.time_factor import bench_time_factor  # noqa: E402
from minimoe.bench.step import bench_step  # noqa: E402
from minimoe.bench.train import bench_train  # noqa: E402
from minimoe.bench.upcycle import bench_upcycle  # noqa: E402

BENCHES = {"train": bench_train, "moe": bench_moe, "grow": bench_grow, "upcycle": bench_upcycle,
           "dist": bench_dist, "sim": bench_sim, "generate": bench_generate,
           "time-factor": bench_time_factor, "step": bench_step}


def add_bench(p):  # `minimoe bench NAME` (minimoe/cli/main.py loads this package only then)
    p.add_argument("name", choices=list(BENCHES))
    p.add_argument("--run", help="time-factor: a finished pipeline folder (default runs/pipeline)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    p.add_argument("--compile", action="store_true", help="train: also torch.compile each block")
    p.add_argument("--recipe", default="scaling/full/aquila-1.8b.toml",
                   help="step: a full-size recipe (scaling/full/), run on one GPU")
    p.add_argument("--micro-batch", type=int, help="step: default the recipe's")


def run_bench(args):
    BENCHES[args.name](args)
