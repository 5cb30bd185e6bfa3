"""EfficientScale end to end (`minimoe pipeline`, AquilaMoE §2 and Table 6): 1-prep, 2-grown,
3-scale-up, 4-upcycled, 5-scale-out against 6-scratch (the final MoE shape from random init on
the chain's tokens), each a run folder; a re-run skips finished stages and resumes the rest."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from minimoe import checkpoint as ckpt
from minimoe import dist
from minimoe import files
from minimoe.config import get_preset
from minimoe.flops import flops_per_token
from minimoe.recipes.config import RecipeConfig
from minimoe.recipes.findings import over_seeds, write_seeds_report
from minimoe.recipes.report import write_pipeline_report
from minimoe.recipes.speed import step_speeds
from minimoe.recipes.stages import (continue_pretraining, data_spec, evaluate_run, grow_run,
                                    mix_used, pretrain, scale_out_run, specialisation_run)
from minimoe.train import read_log


def stage_record(name: str, run_dir: Path, seq_len: int) -> dict:
    """What the report needs of a finished training stage: tokens, time, FLOPs, losses."""
    state = ckpt.read_json(ckpt.latest_checkpoint(run_dir) / "state.json")
    cfg = ckpt.read_config(run_dir)
    per_token = flops_per_token(cfg, seq_len).model
    log = read_log(run_dir)
    return {"stage": name, "run": str(run_dir), "params_total": cfg.param_counts()["total"],
            "params_active": cfg.param_counts()["active"], "tokens": state["tokens"],
            "train_time_s": state["train_time"], "flops_per_token": per_token,
            "flops": per_token * state["tokens"], "log": log, "mix": mix_used(run_dir, log)}


def train_stages(pc: RecipeConfig, out: Path, progress: bool = True, tag: str = "") -> dict:
    """Train (or resume) every stage into out. `tag` names the two folders that depend on the
    scale-out budget (5-scale-out{tag}, 6-scratch{tag}), so budgets share the stages before."""
    spec = data_spec(None, pc.vocab_size, "bpe")
    warm = max(1, pc.prep_steps // 10)
    pretrain(get_preset(pc.small), out / "1-prep", pc.train_config(pc.prep_steps, pc.lr, warm),
             spec, progress=progress)
    evals = pc.train_config(1, pc.lr, 0)  # the validation batches of every stage
    grown = grow_run(out / "1-prep", pc.large, out / "2-grown", method=pc.scale_up_method,
                     seed=pc.seed, tc=evals)
    continue_pretraining(out / "2-grown", out / "3-scale-up",
                         pc.train_config(pc.scale_up_steps, pc.cpt_lr, warm // 2),
                         stage="scale-up", progress=progress)
    upcycled = scale_out_run(out / "3-scale-up", out / "4-upcycled", "upcycle", pc.n_experts,
                             pc.top_k, seed=pc.seed, tc=evals)
    continue_pretraining(out / "4-upcycled", out / f"5-scale-out{tag}",
                         pc.train_config(pc.scale_out_steps, pc.cpt_lr, warm // 2),
                         stage="scale-out", progress=progress)
    runs = {"preparation": out / "1-prep", "scale-up": out / "3-scale-up",
            "scale-out": out / f"5-scale-out{tag}", "from scratch": out / f"6-scratch{tag}"}
    chain = [stage_record(name, runs[name], pc.seq_len) for name in list(runs)[:3]]
    moe_cfg = ckpt.read_config(out / "4-upcycled")
    scratch_tc = pc.train_config(pc.total_steps, pc.lr, warm)
    # the step at which the baseline's FLOPs first reach what the whole chain spent
    per_step = flops_per_token(moe_cfg, pc.seq_len).model * scratch_tc.tokens_per_step
    equal_step = math.ceil(sum(s["flops"] for s in chain) / per_step)
    snapshots = None if tag else {equal_step: out / "6-scratch-equal-compute"}
    pretrain(moe_cfg, runs["from scratch"], scratch_tc, spec, progress=progress, snapshots=snapshots)
    return {"runs": runs, "equal_step": equal_step, "transitions": {
        f"{pc.scale_up_method} growth (2-grown)": grown, "upcycling (4-upcycled)": upcycled}}


def measure_speeds(pc: RecipeConfig, runs: dict[str, Path], cache: Path) -> dict:
    """Each stage model's training-step speed here (recipes/speed.py), kept in `cache`."""
    return step_speeds(runs, pc.train_config(1, pc.lr), rounds=pc.bench_rounds, cache=cache)


def run_pipeline(pc: RecipeConfig, out, progress: bool = True) -> dict:
    """Run (or resume) every stage and write the report; returns the report's numbers."""
    out = Path(out)
    dist.main_only(lambda: check_folder(out, dataclasses.asdict(pc)))  # rank 0 writes
    trained = train_stages(pc, out, progress)
    runs, equal_step = trained["runs"], trained["equal_step"]
    models = {"small dense (1-prep)": runs["preparation"],
              "scaled-up dense (3-scale-up)": runs["scale-up"],
              "scaled-out MoE (5-scale-out)": runs["scale-out"],
              "MoE from scratch, equal tokens (6-scratch)": runs["from scratch"],
              f"MoE from scratch, equal compute (step {equal_step})": out / "6-scratch-equal-compute"}
    # LLaMA-MoE's routing by domain: the start and the end of scale-out, and the MoE from scratch
    routed = {"upcycled, start of scale-out (4-upcycled)": out / "4-upcycled",
              "upcycled, end of scale-out (5-scale-out)": runs["scale-out"],
              "MoE from scratch (6-scratch)": runs["from scratch"]}

    def report():  # evaluation, speeds, routing and the report: one process (rank 0)
        # the tasks are the measuring instrument: the same examples for every seed (seed 0)
        evaluation = {label: evaluate_run(run, limit=pc.eval_examples, ppl_chars=pc.eval_chars,
                                          cache=True, progress=progress)
                      for label, run in models.items()}
        specialisation = {label: specialisation_run(run, out / "report" / "experts" / run.name,
                                                    batch_size=pc.batch_size, seq_len=pc.seq_len,
                                                    title=label)
                          for label, run in routed.items()}
        stages = [stage_record(name, run, pc.seq_len) for name, run in runs.items()]
        return write_pipeline_report(out / "report", dataclasses.asdict(pc), stages,
                                     trained["transitions"], measure_speeds(pc, runs, out / "speed.json"),
                                     evaluation, specialisation)

    return dist.main_only(report)


def run_pipeline_seeds(pc: RecipeConfig, out, seeds: list[int], progress: bool = True) -> dict:
    """The pipeline once per seed (out/seed-N, each with its own report), then out/report:
    every figure over the seeds and the claims judged (recipes/findings.py)."""
    per_seed = over_seeds(lambda recipe, folder: run_pipeline(recipe, folder, progress), pc, out,
                          seeds)
    return dist.main_only(lambda: write_seeds_report(Path(out) / "report", "pipeline", per_seed,
                                                     dataclasses.asdict(pc)))


def check_folder(out: Path, settings: dict):
    """A folder belongs to one recipe (pipeline.json); a different one is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.json"
    if path.exists():
        old = ckpt.read_json(path)
        if old != settings:
            key = next(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"out={out}: holds a pipeline with {key}={old.get(key)!r} "
                             f"(now {settings[key]!r}); choose another --out")
    elif any(out.iterdir()):
        raise ValueError(f"out={out}: the folder is not empty and holds no minimoe pipeline")
    files.write_json(path, settings)
