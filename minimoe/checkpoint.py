"""Checkpoints on disk: safetensors tensors + JSON, written atomically, read through their rules.

One process writes safetensors, several ranks torch.distributed.checkpoint shards; either
resumes in any layout, and the final model.safetensors is always the consolidated file. A
checkpoint folder is renamed from step_N.tmp only once complete. The folder layout and what
is checked on reading it: docs/method.md, "Run folders".
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from minimoe import files
from minimoe.config import ModelConfig
from minimoe.files import atomic_write
from minimoe.model import build_model
from minimoe.run_files import STEP_NAME, checked_state, step_of
from minimoe.stream import write_safetensors


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
    check_tensors(model, tensors, source)
    _copy(model, tensors)


def _copy(model, tensors):
    with torch.no_grad():
        for name, ref in model_tensors(model).items():
            ref.copy_(tensors[name])


def check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> dict:
    """The model's tensors, once `tensors` is known to hold each of them in its shape (a
    sharded model's DTensors have their global shapes)."""
    expected = model_tensors(model)
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model expects {tuple(ref.shape)}")
        if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
            raise CheckpointError(f"{source}: tensor {name} ({tensors[name].dtype}) must hold "
                                  "finite floating-point numbers")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]} (a different architecture?)")
    return expected


def save_model_tensors(path: Path, model: torch.nn.Module):
    """The consolidated model file from one process or from every rank (each must call it):
    one tensor at a time is gathered from its shards (DTensor.full_tensor) and rank 0 streams
    it to disk, so no rank ever holds the whole model (minimoe/stream.py)."""
    tensors = model_tensors(model)
    if not _several_ranks():
        save_tensors(path, tensors)
        return
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}

    def gathered(name):
        t = tensors[name].detach()
        return (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()

    if dist.get_rank() == 0:
        write_safetensors(path, specs, gathered, metadata={"format": "pt"})
    else:
        for name in specs:  # the same collectives in the same order as rank 0's writer
            gathered(name)
    dist.barrier()


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
    latest = latest_checkpoint(run_dir)
    sharded = (not (run_dir / "model.safetensors").exists() and latest is not None
               and is_sharded(latest))
    path = latest if sharded else model_file(run_dir)
    cfg = read_config(run_dir)
    if sharded:  # an unfinished run of several ranks: its last DCP checkpoint, in one process
        model = build_model(cfg, device=device)
        weights = {"model": get_model_state_dict(model)}
        _dcp_load(weights, path, no_dist=True)  # read by this process alone, whatever the rest do
        set_model_state_dict(model, weights["model"])
    else:
        tensors = load_tensors(path)  # checked on a model of no memory: the file, not
        check_tensors(build_model(cfg, device="meta"), tensors, path)  # config.json, sizes it
        model = build_model(cfg, device=device)
        _copy(model, tensors)
    meta = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    return model, meta


# --- resumable training checkpoints -----------------------------------------------------
_told: set[Path] = set()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ckpt/latest names, a folder of this run; with the pointer missing or
    dangling (a kill between the rename and the pointer, a hand), the newest complete one,
    said on stderr, never a restart from step 0 while a checkpoint exists."""
    root = Path(run_dir) / "ckpt"
    pointer = root / "latest"
    name = pointer.read_bytes().decode(errors="replace").strip() if pointer.is_file() else None
    if name is not None and not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: {name[:60]!r} must name a checkpoint of this run "
                              "(step_NNNNNN); fix or delete it")
    if name and (root / name / "state.json").is_file():
        return root / name
    done = [p for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name)
            and (p / "state.json").is_file()]
    if not done:
        return None
    newest = max(done, key=step_of)
    if pointer not in _told:
        _told.add(pointer)
        print(f"minimoe: {pointer} is {'missing' if name is None else f'dangling ({name})'}; "
              f"using {newest.name}, the newest complete checkpoint", file=sys.stderr)
    return newest


def is_sharded(path: Path) -> bool:
    """A checkpoint folder written by several ranks (torch.distributed.checkpoint)."""
    return (Path(path) / ".metadata").exists()


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier():
    if _several_ranks():
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2):
    """Write ckpt/step_N atomically, point ckpt/latest at it, keep the newest `keep`.
    Under torchrun every rank calls it (DCP is collective); rank 0 does the renaming."""
    ckpt_root = Path(run_dir) / "ckpt"
    name = f"step_{step:06d}"
    tmp, final = ckpt_root / (name + ".tmp"), ckpt_root / name
    main = not _several_ranks() or dist.get_rank() == 0
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if _several_ranks():
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        save_tensors(tmp / f"rng_{dist.get_rank()}.safetensors", rng_state())
        extra = {"format": "dcp", "world_size": dist.get_world_size()}
        _barrier()  # every rank's shards are on disk before the folder gets its name
    else:
        save_tensors(tmp / "model.safetensors", model_tensors(model))
        moments, hyper = _flatten_optimizer(model, optimizer)
        save_tensors(tmp / "optim.safetensors", moments)
        save_tensors(tmp / "rng.safetensors", rng_state())
        extra = {"optimizer": hyper}
    if main:
        files.write_json(tmp / "state.json", {**state, "step": step, **extra})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        files.write_text(ckpt_root / "latest", name)
        older = sorted((p for p in ckpt_root.glob("step_*") if STEP_NAME.fullmatch(p.name)
                        and step_of(p) < step), key=step_of)  # by step, never this one
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder of either format, into a
    model of any layout; returns its state.json."""
    path = Path(path)
    state = checked_state(read_json(path / "state.json"), path, is_sharded(path))
    if is_sharded(path):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        restored = {"model": model_sd, "optim": optim_sd}
        _dcp_load(restored, path)
        set_state_dict(model, optimizer, model_state_dict=restored["model"],
                       optim_state_dict=restored["optim"])
        rank = dist.get_rank() if _several_ranks() else 0
        rng = path / f"rng_{rank}.safetensors"
        if not rng.exists():  # fewer ranks wrote it: every rank takes rank 0's stream
            rng = path / "rng_0.safetensors"
    else:
        tensors = load_tensors(path / "model.safetensors")
        moments = load_tensors(path / "optim.safetensors")
        if _several_ranks():  # one process wrote it: a full state dict, sharded on loading
            _set_full_state(model, optimizer, tensors, moments, state["optimizer"], path)
        else:
            load_into(model, tensors, path / "model.safetensors")
            _unflatten_optimizer(model, optimizer, moments, state["optimizer"],
                                 path / "optim.safetensors")
        rng = path / "rng.safetensors"
    set_rng_state(load_tensors(rng), rng)
    return state


def rng_state() -> dict[str, torch.Tensor]:
    """The RNG streams a step draws from: torch's CPU stream and, once CUDA is in use, the
    current GPU's (router noise draws on the device its logits live on)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], source="rng state"):
    """Restore `rng_state()`'s streams; a GPU stream is skipped where no GPU is (the run goes on
    on the CPU, whose stream is restored)."""
    got, ref = state.get("torch"), torch.get_rng_state()
    if got is None or got.dtype != ref.dtype or got.shape != ref.shape:
        raise CheckpointError(f"{source}: tensor torch must be {ref.dtype} of shape "
                              f"{tuple(ref.shape)}, not {None if got is None else got.dtype}")
    torch.set_rng_state(got)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dcp_load(state: dict, path: Path, no_dist: bool = False):
    try:
        with warnings.catch_warnings():  # one process reading a DCP checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=no_dist or not _several_ranks())
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable distributed checkpoint "
                              f"({str(err).splitlines()[0]})") from None


def _set_full_state(model, optimizer, tensors, moments, hyper, path: Path):
    """A one-process checkpoint into a sharded model: checked by name and shape, then given to
    set_state_dict as full state dicts, which keeps each rank's shards."""
    check_tensors(model, tensors, path / "model.safetensors")
    tensors = dict(tensors)
    if model.cfg.tie_embeddings:  # stored once, expected under both names
        tensors["lm_head.weight"] = tensors["embed.weight"]
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state: dict = {}
    for key, value in moments.items():
        name, field = key.rsplit(".", 1)
        if name not in shapes or (field != "step" and value.shape != shapes[name]):
            raise CheckpointError(f"{path / 'optim.safetensors'}: tensor {key} does not fit "
                                  "the model")
        state.setdefault(name, {})[field] = value
    groups = [{**h, "params": names}
              for h, names in zip(hyper["param_groups"], hyper["group_params"])]
    set_state_dict(model, optimizer, model_state_dict=tensors,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True))


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
