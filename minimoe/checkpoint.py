"""Checkpoints on disk: safetensors tensors + JSON, written atomically, read with clear errors.

A run folder looks like this:

    runs/small/
      config.json            the ModelConfig
      run.json               what produced the run (stage, train config, data, parent run)
      model.safetensors      the final model (written when a stage finishes)
      ckpt/step_000100/      a resumable training checkpoint:
          model.safetensors    weights
          optim.safetensors    AdamW moments (flattened: optim.{param name}.{exp_avg,...})
          rng.safetensors      torch RNG state (router noise is the only randomness in a step)
          state.json           step, tokens seen, optimizer hyper-parameters
      ckpt/latest            the name of the newest complete checkpoint
      log.jsonl, loss.png    written by the training loop

Atomicity: every file is written to a temporary name and renamed into place, and a checkpoint
folder is renamed from `step_N.tmp` only once all its files are complete, so a run killed at
any instant leaves the previous checkpoint intact and usable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minimoe import files
from minimoe.config import ModelConfig
from minimoe.files import atomic_write
from minimoe.model import build_model


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not fit the model."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]):
    """A safetensors file, written atomically (contiguous CPU copies: safetensors' rule)."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def read_json(path: Path) -> dict:
    return files.read_json(path, CheckpointError)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err})") from None


# --- models -----------------------------------------------------------------------------
def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied LM head stored once (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path):
    """Copy tensors into the model, naming the first tensor that is missing or misshapen."""
    expected = model_tensors(model)
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model expects {tuple(ref.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]} (a different architecture?)")
    with torch.no_grad():
        for name, ref in expected.items():
            ref.copy_(tensors[name])


def read_config(run_dir: Path) -> ModelConfig:
    d = read_json(Path(run_dir) / "config.json")
    try:
        return ModelConfig.from_dict(d)
    except TypeError as err:
        raise CheckpointError(f"{run_dir}/config.json: {err}") from None


def save_model(run_dir: Path, model, meta: dict | None = None):
    """Write config.json, model.safetensors and (optionally) run.json into run_dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_text(run_dir / "config.json", model.cfg.to_json())
    save_tensors(run_dir / "model.safetensors", model_tensors(model))
    if meta is not None:
        files.write_json(run_dir / "run.json", meta)


def model_file(run_dir: Path) -> Path:
    """The newest weights of a run: the final model, else the latest training checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    if (run_dir / "model.safetensors").exists():
        return run_dir / "model.safetensors"
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"{run_dir}: holds no model.safetensors and no checkpoint")
    return latest / "model.safetensors"


def load_model(run_dir: Path, device="cpu"):
    """(model, run metadata) from a run folder."""
    run_dir = Path(run_dir)
    path = model_file(run_dir)
    cfg = read_config(run_dir)
    model = build_model(cfg, device=device)
    load_into(model, load_tensors(path), path)
    meta = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    return model, meta


# --- resumable training checkpoints -----------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "ckpt" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2):
    """Write ckpt/step_N atomically, point ckpt/latest at it, keep the newest `keep`."""
    ckpt_root = Path(run_dir) / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    tmp = ckpt_root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(tmp / "model.safetensors", model_tensors(model))
    moments, hyper = _flatten_optimizer(model, optimizer)
    save_tensors(tmp / "optim.safetensors", moments)
    save_tensors(tmp / "rng.safetensors", {"torch": torch.get_rng_state()})
    files.write_json(tmp / "state.json", {**state, "step": step, "optimizer": hyper})
    final = ckpt_root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    files.write_text(ckpt_root / "latest", name)
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and p.suffix != ".tmp")[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder; returns its state.json."""
    path = Path(path)
    state = read_json(path / "state.json")
    load_into(model, load_tensors(path / "model.safetensors"), path / "model.safetensors")
    _unflatten_optimizer(model, optimizer, load_tensors(path / "optim.safetensors"),
                         state["optimizer"], path / "optim.safetensors")
    torch.set_rng_state(load_tensors(path / "rng.safetensors")["torch"])
    return state


def _flatten_optimizer(model, optimizer):
    """AdamW state keyed by parameter name, so the file is readable and order-independent."""
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            moments[f"{names[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    return moments, {"param_groups": hyper, "group_params": groups}


def _unflatten_optimizer(model, optimizer, moments, hyper, source):
    params = dict(model.named_parameters())
    state = {}
    for key, value in moments.items():
        name, field = key.rsplit(".", 1)
        if name not in params:
            raise CheckpointError(f"{source}: optimizer state for unknown parameter {name}")
        if field != "step" and value.shape != params[name].shape:
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(params[name].shape)}")
        state.setdefault(name, {})[field] = value
    # rebuild torch's own layout: parameters numbered in group order, state by that number
    sd = {"state": {}, "param_groups": []}
    index = 0
    for group_hyper, names in zip(hyper["param_groups"], hyper["group_params"]):
        ids = []
        for name in names:
            if name in state:
                sd["state"][index] = state[name]
            ids.append(index)
            index += 1
        sd["param_groups"].append({**group_hyper, "params": ids})
    optimizer.load_state_dict(sd)
