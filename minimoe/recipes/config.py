"""One recipe config for the pipeline and the validation experiments, and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from minimoe import files
from minimoe.checks import check_fields, known_keys
from minimoe.config import PRESETS
from minimoe.grow import METHODS
from minimoe.train import TrainConfig


@dataclass(frozen=True)
class RecipeConfig:
    """The models, steps and batches of a recipe; every run in it trains with `train_config`."""

    small: str = "toy-small"  # the preparation phase's model (a preset name)
    large: str = "toy-large"  # the Scale-Up target
    scale_up_method: str = "aki-pro"
    n_experts: int = 8
    top_k: int = 2
    prep_steps: int = 300  # pretraining of the small model
    scale_up_steps: int = 100  # pipeline: continued pretraining after growth
    scale_out_steps: int = 80  # pipeline: continued pretraining after upcycling
    steps: int = 200  # experiments: continued training of every variant, the same for all
    batch_size: int = 12
    seq_len: int = 128
    lr: float = 3e-3
    cpt_lr: float = 1e-3  # continued pretraining starts from a trained model: a gentler rate
    vocab_size: int = 2048
    eval_every: int = 50
    eval_examples: int = 100  # examples per task of the evaluation table (minimoe/tasks.py)
    eval_chars: int = 10_000  # validation characters per language for bits per byte
    eval_batches: int = 8  # validation batches per evaluation (fewer: faster, noisier)
    bench_rounds: int = 5  # rounds of the step-speed measurement behind the time factor
    seed: int = 0

    def __post_init__(self):
        counts = {f.name: "int>0" for f in dataclasses.fields(self) if f.type == "int"}
        check_fields("RecipeConfig", self, {
            **counts, "seed": "int>=0", "vocab_size": "int[258, 16777216]", "lr": ">0",
            "cpt_lr": ">0", "small": tuple(PRESETS), "large": tuple(PRESETS),
            "scale_up_method": METHODS})
        self.train_config(self.prep_steps, self.lr)  # batch rules now, not at the stage

    @property
    def total_steps(self) -> int:
        """The pipeline's steps from preparation to the end of scale-out (the baseline's)."""
        return self.prep_steps + self.scale_up_steps + self.scale_out_steps

    def train_config(self, steps: int, lr: float, warmup: int | None = None) -> TrainConfig:
        """The TrainConfig of one run; warmup defaults to a tenth of its steps."""
        warmup = max(1, steps // 10) if warmup is None else warmup
        return TrainConfig(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=lr,
                           warmup_steps=warmup, eval_every=self.eval_every,
                           eval_batches=self.eval_batches, ckpt_every=50, seed=self.seed)


RECIPES = {
    # `minimoe pipeline`: about 10 minutes on 2 CPU cores, most of it the from-scratch baseline
    "toy": RecipeConfig(),
    # the validation experiments (`minimoe experiment`): batch 16, validation every 25 steps
    "experiment": RecipeConfig(batch_size=16, eval_every=25),
    # the tests and --quick: the same chain on models of ~0.2M and ~0.7M parameters
    "tiny": RecipeConfig(small="tiny", large="tiny-large", prep_steps=40, scale_up_steps=20,
                         scale_out_steps=20, steps=20, batch_size=8, seq_len=64, vocab_size=512,
                         eval_every=10, eval_examples=20, eval_chars=2_000, bench_rounds=3),
}


def get_recipe(name: str) -> RecipeConfig:
    """A named recipe, or a recipe file (scaling/*.toml): a `preset` plus the fields it changes."""
    if not name.endswith(".toml"):
        if name not in RECIPES:
            raise ValueError(f"preset={name!r}: unknown recipe; choose one of "
                             f"{', '.join(RECIPES)} or give a .toml recipe file")
        return RECIPES[name]
    path = Path(name)
    table = files.read_toml(path)
    base = table.pop("preset", "toy")
    if not isinstance(base, str) or base not in RECIPES:  # a file naming a file: a loop
        raise ValueError(f"{path}: preset={base!r}: must be one of {', '.join(RECIPES)}")
    base = RECIPES[base]
    known_keys(f"{path}: ", table, {f.name for f in dataclasses.fields(RecipeConfig)})
    try:
        return dataclasses.replace(base, **table)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
