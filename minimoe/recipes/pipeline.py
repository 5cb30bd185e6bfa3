"""EfficientScale end to end (`minimoe pipeline`): preparation -> Scale-Up -> Scale-Out, each
followed by continued pretraining, against a Mixture of Experts of the final shape trained from
scratch on the same total tokens (AquilaMoE §2, §4.3 and Table 6, at toy scale).

    1-prep       pretrain the small dense model on the demo corpus
    2-grown      scale_up(small -> large), AKI-Pro by default       (a transformation, no training)
    3-scale-up   continue pretraining the grown dense model
    4-upcycled   upcycle(large -> 8 experts, top-2)                  (a transformation)
    5-scale-out  continue pretraining the MoE
    6-scratch    the baseline: the same MoE shape from random init, all the tokens of 1+3+5
    6-scratch-equal-compute   the baseline's weights at the step where its FLOPs first reach
                 the chain's (1+3+5)
    report/      report.md, loss against tokens and cumulative FLOPs, savings factors, the
                 evaluation table laid out as the paper's Table 4 (tasks x models), the data
                 mix of every stage, and what the experts specialise in by domain (experts/)

Every stage is a run folder. Re-running the command skips finished stages and resumes an
interrupted one from its last checkpoint, so a stage that fails leaves the others usable.
"""

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
from minimoe.recipes.report import write_pipeline_report
from minimoe.recipes.stages import (
    continue_pretraining,
    data_spec,
    evaluate_run,
    grow_run,
    mix_used,
    pretrain,
    scale_out_run,
    specialisation_run,
)
from minimoe.train import read_log


def _stage_record(name: str, run_dir: Path, seq_len: int) -> dict:
    """What the report needs of a finished training stage: tokens, time, FLOPs, losses."""
    state = ckpt.read_json(ckpt.latest_checkpoint(run_dir) / "state.json")
    cfg = ckpt.read_config(run_dir)
    per_token = flops_per_token(cfg, seq_len).model
    log = read_log(run_dir)
    return {"stage": name, "run": str(run_dir), "params_total": cfg.param_counts()["total"],
            "params_active": cfg.param_counts()["active"], "tokens": state["tokens"],
            "train_time_s": state["train_time"], "flops_per_token": per_token,
            "flops": per_token * state["tokens"], "log": log, "mix": mix_used(run_dir, log)}


def run_pipeline(pc: RecipeConfig, out, progress: bool = True) -> dict:
    """Run (or resume) every stage and write the report; returns the report's numbers."""
    out = Path(out)
    dist.main_only(lambda: _check_pipeline_folder(out, pc))  # under torchrun: rank 0 writes
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
    continue_pretraining(out / "4-upcycled", out / "5-scale-out",
                         pc.train_config(pc.scale_out_steps, pc.cpt_lr, warm // 2),
                         stage="scale-out", progress=progress)
    moe_cfg = ckpt.read_config(out / "4-upcycled")
    chain = [_stage_record(name, out / run, pc.seq_len) for name, run in
             (("preparation", "1-prep"), ("scale-up", "3-scale-up"), ("scale-out", "5-scale-out"))]
    scratch_tc = pc.train_config(pc.total_steps, pc.lr, warm)
    # the step at which the baseline's FLOPs first reach what the whole chain spent
    per_step = flops_per_token(moe_cfg, pc.seq_len).model * scratch_tc.tokens_per_step
    equal_step = math.ceil(sum(s["flops"] for s in chain) / per_step)
    equal_dir = out / "6-scratch-equal-compute"
    pretrain(moe_cfg, out / "6-scratch", scratch_tc, spec, progress=progress,
             snapshots={equal_step: equal_dir})

    transitions = {f"{pc.scale_up_method} growth (2-grown)": grown,
                   "upcycling (4-upcycled)": upcycled}
    stages = chain + [_stage_record("from scratch", out / "6-scratch", pc.seq_len)]
    models = {"small dense (1-prep)": out / "1-prep",
              "scaled-up dense (3-scale-up)": out / "3-scale-up",
              "scaled-out MoE (5-scale-out)": out / "5-scale-out",
              "MoE from scratch, equal tokens (6-scratch)": out / "6-scratch",
              f"MoE from scratch, equal compute (step {equal_step})": equal_dir}
    # LLaMA-MoE's routing by domain, at the start and the end of scale-out, and for the MoE
    # from scratch
    routed = {"upcycled, start of scale-out (4-upcycled)": out / "4-upcycled",
              "upcycled, end of scale-out (5-scale-out)": out / "5-scale-out",
              "MoE from scratch (6-scratch)": out / "6-scratch"}

    def report():  # evaluation, routing and the report: one process (rank 0 under torchrun)
        evaluation = {label: evaluate_run(run, limit=pc.eval_examples, ppl_chars=pc.eval_chars,
                                          seed=pc.seed, cache=True, progress=progress)
                      for label, run in models.items() if (run / "model.safetensors").exists()}
        specialisation = {label: specialisation_run(run, out / "report" / "experts" / run.name,
                                                    batch_size=pc.batch_size, seq_len=pc.seq_len,
                                                    title=label)
                          for label, run in routed.items()}
        return write_pipeline_report(out / "report", dataclasses.asdict(pc), stages, transitions,
                                     evaluation, specialisation)

    return dist.main_only(report)


EVAL_ONLY = ("eval_examples", "eval_chars")  # RecipeConfig fields that change no training


def _check_pipeline_folder(out: Path, pc: RecipeConfig):
    """A pipeline folder belongs to one RecipeConfig; a different one is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.json"
    settings = dataclasses.asdict(pc)
    if path.exists():
        # a field added to RecipeConfig since the folder was made: the evaluation settings
        # change no training, so they take today's value; any other had its default then
        old = {**dataclasses.asdict(RecipeConfig()), **{k: settings[k] for k in EVAL_ONLY},
               **{k: v for k, v in ckpt.read_json(path).items() if k not in EVAL_ONLY}}
        if old != settings:
            key = next(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"out={out}: holds a pipeline with {key}={old.get(key)!r} "
                             f"(now {settings[key]!r}); choose another --out")
    elif any(out.iterdir()):
        raise ValueError(f"out={out}: the folder is not empty and holds no minimoe pipeline")
    files.write_json(path, settings)
