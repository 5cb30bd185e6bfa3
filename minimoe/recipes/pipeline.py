"""EfficientScale end to end (`minimoe pipeline`): preparation -> Scale-Up -> Scale-Out, each
followed by continued pretraining, against a Mixture of Experts of the final shape trained from
scratch on the same total tokens (AquilaMoE §2, §4.3 and Table 6, at toy scale).

    1-prep       pretrain the small dense model on the demo corpus
    2-grown      scale_up(small -> large), AKI-Pro by default       (a transformation, no training)
    3-scale-up   continue pretraining the grown dense model
    4-upcycled   upcycle(large -> 8 experts, top-2)                  (a transformation)
    5-scale-out  continue pretraining the MoE
    6-scratch    the baseline: the same MoE shape from random init, all the tokens of 1+3+5
    report/      report.md, loss against tokens and cumulative FLOPs, savings factors

Every stage is a run folder. Re-running the command skips finished stages and resumes an
interrupted one from its last checkpoint, so a stage that fails leaves the others usable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minimoe import checkpoint as ckpt
from minimoe import dist
from minimoe import files
from minimoe.config import get_preset
from minimoe.flops import flops_per_token
from minimoe.recipes.config import RecipeConfig
from minimoe.recipes.report import write_pipeline_report
from minimoe.recipes.stages import continue_pretraining, data_spec, grow_run, pretrain, scale_out_run
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
            "flops": per_token * state["tokens"], "log": log}


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
    pretrain(moe_cfg, out / "6-scratch", pc.train_config(pc.total_steps, pc.lr, warm),
             spec, progress=progress)

    transitions = {f"{pc.scale_up_method} growth (2-grown)": grown,
                   "upcycling (4-upcycled)": upcycled}
    stages = [_stage_record(name, out / run, pc.seq_len) for name, run in
              (("preparation", "1-prep"), ("scale-up", "3-scale-up"),
               ("scale-out", "5-scale-out"), ("from scratch", "6-scratch"))]
    return dist.main_only(lambda: write_pipeline_report(out / "report", dataclasses.asdict(pc),
                                                        stages, transitions))


def _check_pipeline_folder(out: Path, pc: RecipeConfig):
    """A pipeline folder belongs to one RecipeConfig; a different one is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.json"
    settings = dataclasses.asdict(pc)
    if path.exists():
        old = ckpt.read_json(path)
        if old != settings:
            key = next(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"out={out}: holds a pipeline with {key}={old.get(key)!r} "
                             f"(now {settings[key]!r}); choose another --out")
    elif any(out.iterdir()):
        raise ValueError(f"out={out}: the folder is not empty and holds no minimoe pipeline")
    files.write_json(path, settings)
