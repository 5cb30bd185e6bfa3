"""Running one stage: load the data a run was made with, build or load its model, train it.

A run folder remembers its data (`run.json` -> "data": paths, tokenizer, vocabulary size), so a
later stage grown from it (scale-up, scale-out, continued pretraining) sees exactly the same
token stream and validation set, and validation losses compare across stages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimoe import checkpoint as ckpt
from minimoe.config import ModelConfig, get_preset
from minimoe.data import load_data
from minimoe.model import build_model
from minimoe.train import RunResult, TrainConfig, evaluate, train


def data_spec(paths=None, vocab_size: int = 2048, tokenizer: str = "bpe") -> dict:
    paths = [str(Path(p).resolve()) for p in paths] if paths else None
    return {"paths": paths, "vocab_size": vocab_size, "tokenizer": tokenizer}


def load_run_data(spec: dict):
    """(TokenData, tokenizer) for a data spec (the demo corpus when paths is None)."""
    return load_data(spec["paths"], vocab_size=spec["vocab_size"], tokenizer=spec["tokenizer"])


def run_data_spec(run_dir) -> dict:
    meta = ckpt.read_json(Path(run_dir) / "run.json")
    if "data" not in meta:
        raise ckpt.CheckpointError(f"{run_dir}/run.json: has no data spec (not a minimoe run?)")
    return meta["data"]


def pretrain(cfg: ModelConfig | str, out, tc: TrainConfig, spec: dict | None = None,
             progress: bool = True, on_step=None) -> RunResult:
    """Train a freshly initialised model (the preparation phase, or a from-scratch baseline)."""
    spec = spec or data_spec()
    data, tok = load_run_data(spec)
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    cfg = cfg.replace(vocab_size=tok.vocab_size)  # the tokenizer decides the vocabulary
    torch.manual_seed(tc.seed)
    model = build_model(cfg)
    meta = {"stage": "pretrain", "data": spec, "init_from": None}
    return train(model, data, tc, out, meta=meta, progress=progress, on_step=on_step)


def continue_pretraining(init_from, out, tc: TrainConfig, stage: str = "continue",
                         progress: bool = True, on_step=None) -> RunResult:
    """Continue training the model of another run (grown, upcycled, or pretrained)."""
    init_from = Path(init_from)
    model, _ = ckpt.load_model(init_from)
    spec = run_data_spec(init_from)
    data, _ = load_run_data(spec)
    meta = {"stage": stage, "data": spec, "init_from": str(init_from.resolve())}
    return train(model, data, tc, out, meta=meta, progress=progress, on_step=on_step)


def validation_loss(model, spec: dict, tc: TrainConfig | None = None) -> dict[str, float]:
    """Validation losses of a model on a run's data (overall and per language)."""
    data, _ = load_run_data(spec)
    return evaluate(model, data, tc or TrainConfig())
