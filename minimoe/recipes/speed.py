"""Each stage model's training-step speed on this machine, as `minimoe bench` measures it: the
time factor's input (docs/recipes.md#step-speeds)."""

from __future__ import annotations

import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from minimoe import checkpoint as ckpt
from minimoe import files
from minimoe.recipes.stages import run_data
from minimoe.train import TrainConfig, make_optimizer, plan, train_step


def step_speeds(runs: dict[str, Path], tc: TrainConfig, rounds: int = 5, repeats: int = 3,
                cache: Path | None = None) -> dict:
    """Tokens/s of a training step (tc's batch) of each run's model, one thread, median of
    rounds (docs/recipes.md#step-speeds); `cache` keeps a result for the same settings."""
    settings = {"runs": {k: str(v) for k, v in runs.items()}, "batch": [tc.batch_size, tc.seq_len],
                "rounds": rounds, "repeats": repeats, "threads": 1,
                "models": [ckpt.model_file(r).stat().st_mtime_ns for r in runs.values()]}
    if cache and cache.exists() and ckpt.read_json(cache).get("settings") == settings:
        return ckpt.read_json(cache)
    data, _ = run_data(next(iter(runs.values())))  # in the runs' own tokenizer
    x, y = data.train_batch(0, tc.batch_size, tc.seq_len, seed=tc.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = {}
        for label, run in runs.items():  # one step as train() takes it, in one process
            model = ckpt.load_model(run)[0].train()
            parallel, optimizer = plan(model, tc, None), make_optimizer(model, tc)
            steps[label] = partial(train_step, parallel, optimizer, lambda micro: (x, y), tc)
        for step in steps.values():
            step()  # warm-up: first-call allocations are not the model's speed
        load_before, times = os.getloadavg()[0], {label: [] for label in steps}
        for _ in range(rounds):
            for label, step in steps.items():
                took = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    took.append(time.perf_counter() - t0)
                times[label].append(statistics.median(took))
    finally:
        torch.set_num_threads(threads)
    tokens = tc.batch_size * tc.seq_len
    result = {"settings": settings, "load_1min": [load_before, os.getloadavg()[0]],
              "cpus": os.cpu_count(),
              "tokens_per_s": {k: tokens / statistics.median(t) for k, t in times.items()}}
    if cache:
        files.write_json(cache, result)
    return result
