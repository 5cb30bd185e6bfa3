"""bench time-factor: the time savings factor of a finished pipeline folder measured again now
(the step speeds of its four trained models, interleaved, one thread), with the machine's load.
Run it once on a quiet machine and once beside another job: the factor should hardly move,
where the wall time of training (printed beside it) moves with the load."""

from __future__ import annotations

from pathlib import Path

from minimoe import checkpoint as ckpt
from minimoe.recipes.config import RecipeConfig
from minimoe.recipes.pipeline import stage_record
from minimoe.recipes.report import measured_savings
from minimoe.recipes.speed import step_speeds

STAGES = {"preparation": "1-prep", "scale-up": "3-scale-up", "scale-out": "5-scale-out",
          "from scratch": "6-scratch"}


def bench_time_factor(args):
    run = Path(args.run or "runs/pipeline")
    if not (run / "pipeline.json").exists():
        raise ValueError(f"--run={run}: not a pipeline folder (no pipeline.json)")
    pc = RecipeConfig(**ckpt.read_json(run / "pipeline.json"))
    runs = {name: run / folder for name, folder in STAGES.items()}
    speeds = step_speeds(runs, pc.train_config(1, pc.lr), rounds=3 if args.quick else pc.bench_rounds)
    stages = [stage_record(name, folder, pc.seq_len) for name, folder in runs.items()]
    f = measured_savings(stages[:-1], stages[-1], speeds["tokens_per_s"])
    before, after = speeds["load_1min"]
    print(f"bench time-factor: {run}, batch {pc.batch_size} x {pc.seq_len}, one thread, "
          f"1-minute load average {before:.2f} -> {after:.2f} on {speeds['cpus']} CPUs")
    for name, v in speeds["tokens_per_s"].items():
        print(f"  {name:13s} {v:10,.0f} tokens/s")
    print(f"  time savings factor (equal tokens) {f['time_savings']:.3f}x, iso-loss "
          f"{'' if f['iso_loss_reached'] else '>= '}{f['time_savings_iso_loss']:.3f}x; "
          f"from the wall time of training {f['time_savings_wall']:.3f}x")
    return f
