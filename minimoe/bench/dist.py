"""bench dist: tokens/s of a training step of toy-small in one process against 2 gloo ranks
under torchrun (FSDP2, DDP, and FSDP2 with tensor + sequence parallel 2), the same global batch; the ratio is what distribution costs
(or gains) on this machine. One process uses every core for its matmuls; each rank gets an
equal share of them (OMP_NUM_THREADS), so on a single machine the ideal ratio is 1.0. Beside
each, rank 0's peak memory in one step, tracked as `minimoe dry-run` tracks it.

The step is the training loop's own (train.train_step: the rows of a rank, the chunked loss,
DTensor-aware clipping, AdamW) on random tokens, timed after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minimoe import dist
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.recipes.dry_run import measure
from minimoe.train import TrainConfig, make_optimizer, plan, train_step


def _step_times(mode: str, batch: int, seq: int, steps: int) -> tuple[list[float], int]:
    """Seconds per training step on this process (one of the ranks under torchrun), and the
    peak bytes of one more step."""
    dist.init_from_env()
    torch.manual_seed(0)
    cfg = get_preset("toy-small")
    model = build_model(cfg)
    tp = 2 if mode == "tp" else 1  # both ranks split every matrix and read the same rows
    tc = TrainConfig(batch_size=batch, seq_len=seq, parallel="ddp" if mode == "ddp" else "fsdp",
                     tp=tp)
    parallel = plan(model, tc, dist.build_mesh(1, tp=tp) if dist.is_distributed() else None)
    optimizer = make_optimizer(model, tc)
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps):
        x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=generator)
        x, y = dist.rows(x[:, :-1], tp), dist.rows(x[:, 1:], tp)
        t0 = time.perf_counter()
        train_step(parallel, optimizer, lambda micro: (x, y), tc)
        times.append(time.perf_counter() - t0)
    peak = measure(parallel, optimizer, lambda micro: (x, y), tc)["total"]
    dist.barrier()
    return times, peak


def _worker(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="single")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    a = p.parse_args(argv)
    times, peak = _step_times(a.mode, a.batch, a.seq, a.steps)
    if dist.is_main():
        Path(a.out).write_text(json.dumps({"times": times, "peak": peak}))
    dist.shutdown()


def _launch(ranks: int, mode: str, batch: int, seq: int, steps: int, threads: int):
    """(median seconds per step after 3 warm-up steps, rank 0's peak bytes) of a fresh process
    or torchrun job."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        worker = ["-m", "minimoe.bench.dist", "--mode", mode, "--batch", str(batch), "--seq",
                  str(seq), "--steps", str(steps), "--out", str(out)]
        if ranks > 1:
            worker = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                      "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *worker]
        done = subprocess.run([sys.executable, *worker], env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench dist: {' '.join(worker)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(out.read_text())
    return statistics.median(result["times"][3:]), result["peak"]


def bench_dist(args):
    batch, seq = (8, 128) if args.quick else (16, 256)
    steps = 8 if args.quick else 20
    cores = os.cpu_count() or 1
    tokens = batch * seq
    print(f"bench dist: toy-small AdamW step, global batch {batch} x {seq} tokens, {cores} cores "
          f"(one process: {cores} threads; 2 ranks: {max(1, cores // 2)} each), gloo")
    seconds, peak = _launch(1, "single", batch, seq, steps, cores)
    one = tokens / seconds
    print(f"  1 process        {one:10,.0f} tokens/s   peak {peak / 2**20:6.1f} MiB")
    # on a shared machine a process's threads wait for one another at every kernel, so one
    # thread is the steadier reference: what each rank gets
    single = tokens / _launch(1, "single", batch, seq, steps, 1)[0]
    print(f"  1 process, 1 thread {single:7,.0f} tokens/s")
    result = {"one_process": one, "one_thread": single, "peak_bytes": {"one_process": peak}}
    for mode in ("fsdp", "ddp", "tp"):
        seconds, peak = _launch(2, mode, batch, seq, steps, max(1, cores // 2))
        two = tokens / seconds
        result[mode], result["peak_bytes"][mode] = two, peak
        print(f"  2 ranks, {mode:5s}   {two:10,.0f} tokens/s   peak {peak / 2**20:6.1f} MiB   ratio "
              f"{two / one:.2f} to 1 process, {two / single:.2f} to 1 thread")
    return result

if __name__ == "__main__":
    _worker(sys.argv[1:])
