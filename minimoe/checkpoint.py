"""Run folders and resumable checkpoints: safetensors and JSON, one format for one process and
for many ranks (each writes and reads its blocks of every whole tensor), renamed into place once
complete (docs/method.md, "Run folders")."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from minimoe import files
from minimoe.config import ModelConfig
from minimoe.model import build_model, draw_as_built
from minimoe.run_files import STEP_NAME, checked_state, step_of
from minimoe.stream import (barrier, fill_block, local_block, model_tensors, rank, read_block,
                            world_size, write_blocks)


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not fit the model."""


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


def _blocks(tensors: dict) -> dict:
    """{name: (local block, offset)} of the blocks this rank writes."""
    blocks = {name: local_block(t.detach()) for name, t in tensors.items()}
    return {name: (local, offset) for name, (local, offset, writes) in blocks.items() if writes}


def _specs(tensors: dict, cfg) -> dict:
    return {name: (t.dtype, _stored_shape(name, t, cfg)) for name, t in tensors.items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], cfg=None):
    """A safetensors file, written into path.tmp and renamed into place: by every rank when the
    tensors are sharded, else by rank 0. cfg: a model's, whose unpadded vocabulary is stored."""
    path, main = Path(path), rank() == 0
    together = any(isinstance(t, DTensor) for t in tensors.values())
    if not (together or main):
        return
    tmp = path.with_name(path.name + ".tmp")
    if main:
        tmp.unlink(missing_ok=True)
    if together:
        barrier()
    write_blocks(tmp, _specs(tensors, cfg), _blocks(tensors).items(), {"format": "pt"}, header=main)
    if together:
        barrier()
    if main:
        os.replace(tmp, path)


# --- models -----------------------------------------------------------------------------
def _stored_shape(name: str, t: torch.Tensor, cfg) -> tuple[int, ...]:
    """A tensor's shape on disk: a vocabulary padded for tensor parallelism is stored unpadded."""
    vocab = getattr(cfg, "vocab_size", None) or t.shape[0]
    if name.split(".")[0] in ("embed", "lm_head") and t.dim() == 2:
        return (vocab, *t.shape[1:])
    return tuple(t.shape)


def load_into(model: torch.nn.Module, path: Path, tensors=None):
    """Fill every tensor of the model (each rank: the blocks it holds) from a safetensors file,
    naming the first that is missing or misshapen; reads only those blocks."""
    tensors = model_tensors(model) if tensors is None else tensors
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), "pt") as f:
            stored = set(f.keys())
            for name, t in tensors.items():
                expected = _stored_shape(name, t, model.cfg)
                if name not in stored:
                    raise CheckpointError(f"{path}: tensor {name} is missing")
                stored_slice = f.get_slice(name)
                shape, dtype = tuple(stored_slice.get_shape()), stored_slice.get_dtype()
                if shape != expected:
                    raise CheckpointError(f"{path}: tensor {name} has shape {shape}, the model "
                                          f"expects {expected}")
                if not dtype.startswith(("F", "BF")):
                    raise CheckpointError(f"{path}: tensor {name} ({dtype}) must hold "
                                          "floating-point numbers")
                local, offset, _ = local_block(t.detach())
                read_block(f, name, local, offset)
                if not torch.isfinite(local).all():
                    raise CheckpointError(f"{path}: tensor {name} must hold finite numbers")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err})") from None
    extra = sorted(stored - set(tensors))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (a different architecture?)")


def read_config(run_dir: Path) -> ModelConfig:
    return ModelConfig.from_dict(read_json(Path(run_dir) / "config.json"))


def save_model(run_dir: Path, model, meta: dict):
    """Write config.json, run.json (`meta`) and model.safetensors into run_dir; under torchrun
    every rank calls it."""
    run_dir = Path(run_dir)
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text(run_dir / "config.json", model.cfg.to_json())
        files.write_json(run_dir / "run.json", meta)
    save_tensors(run_dir / "model.safetensors", model_tensors(model), model.cfg)


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


def fill_model(model, device, init, seed: int = 0):
    """Give a meta model memory on `device` and values: the model file `init`, or drawn from
    `seed` (init "seed": as one process would, each rank keeping its blocks), or none (None: a
    checkpoint fills it). A model that has its values (one process) is only moved."""
    if not any(p.is_meta for p in model.parameters()):
        return model.to(device)
    model.to_empty(device=device)
    for buffer in model.buffers():  # the MoE's routing statistics
        buffer.zero_()
    if init == "seed":
        torch.manual_seed(seed)
        draw_as_built(model.cfg)
        model.reset_parameters(fill=fill_block)
    elif init is not None:
        load_into(model, init)
    return model


def load_model(run_dir: Path, device="cpu"):
    """(model, run metadata) from a run folder, filled from its newest weights."""
    run_dir = Path(run_dir)
    path = model_file(run_dir)
    model = fill_model(build_model(read_config(run_dir), device="meta"), device, path)
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


class _Pending:
    """The checkpoint being written in the background, and its own gloo group (collectives
    of a second thread must not share the training's group)."""
    thread: threading.Thread | None = None
    error: BaseException | None = None
    group = None


def wait_for_checkpoint():
    """Block until a background checkpoint is complete; re-raise what it failed with."""
    if _Pending.thread is not None:
        _Pending.thread.join()
        _Pending.thread = None
    if _Pending.error is not None:
        error, _Pending.error = _Pending.error, None
        raise error


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int = 2,
                    background: bool = False):
    """Write ckpt/step_N atomically, point ckpt/latest at it, keep the newest `keep`. Under
    torchrun every rank calls it. background: each rank copies its blocks to host memory and
    returns; a thread writes them and completes the checkpoint (torchtitan's async save)."""
    wait_for_checkpoint()
    root = Path(run_dir) / "ckpt"
    name = f"step_{step:06d}"
    tmp = root / (name + ".tmp")
    main, world = rank() == 0, world_size()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    tensors = {"model": model_tensors(model), "optim": _optimizer_tensors(model, optimizer)}
    specs = {part: _specs(ts, model.cfg) for part, ts in tensors.items()}
    blocks = {part: _blocks(ts) for part, ts in tensors.items()}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    extra = {"optimizer": {"param_groups": hyper}, "world_size": world}
    rng, rng_file = rng_state(), f"rng_{rank()}.safetensors"  # each rank its own
    if background:
        blocks = {part: {n: (local.to("cpu", copy=True), offset)
                         for n, (local, offset) in b.items()} for part, b in blocks.items()}
        if _Pending.group is None and world > 1:
            _Pending.group = dist.new_group(backend="gloo")

    def write(group=None):
        for part in tensors:
            write_blocks(tmp / f"{part}.safetensors", specs[part], blocks[part].items())
        save_file(rng, tmp / rng_file)
        barrier(group)  # every rank's blocks are on disk before the folder gets its name
        if main:
            files.write_json(tmp / "state.json", {**state, "step": step, **extra})
            final = root / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            files.write_text(root / "latest", name)
            older = sorted((p for p in root.glob("step_*") if STEP_NAME.fullmatch(p.name)
                            and step_of(p) < step), key=step_of)  # by step, never this one
            for old in older[:max(0, len(older) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(group)

    if not background:
        write()
        return

    def run():
        try:
            write(_Pending.group)
        except BaseException as err:  # re-raised by the next wait_for_checkpoint
            _Pending.error = err

    _Pending.thread = threading.Thread(target=run, name=f"checkpoint {name}", daemon=True)
    _Pending.thread.start()


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG from a checkpoint folder into a model of any layout;
    returns its state.json."""
    path = Path(path)
    state = checked_state(read_json(path / "state.json"), path, len(optimizer.param_groups))
    load_into(model, path / "model.safetensors")
    moments = _optimizer_tensors(model, optimizer, create=True)
    load_into(model, path / "optim.safetensors", tensors=moments)
    for group, hyper in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    rng = path / f"rng_{rank()}.safetensors"
    if not rng.exists():  # fewer ranks wrote it: every rank takes rank 0's stream
        rng = path / "rng_0.safetensors"
    set_rng_state(load_tensors(rng), rng)
    return state


def _optimizer_tensors(model, optimizer, create: bool = False) -> dict[str, torch.Tensor]:
    """AdamW's state keyed "{parameter name}.{exp_avg,exp_avg_sq,step}"; create=True makes it
    first (zeros, of each parameter's layout), to be filled from a file."""
    out = {}
    for name, p in model.named_parameters():
        if create:
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


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
