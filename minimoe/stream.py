"""Safetensors written and read a piece at a time: one tensor (a checkpoint bigger than memory,
transformed), or one rank's block of each tensor (a sharded model). The format
(huggingface/safetensors, "Format"): a u64 header size, the JSON header, then the bytes."""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from minimoe.config import ModelConfig
from minimoe.files import atomic_write
from minimoe.model import build_model

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class SafetensorsSource:
    """A read-only `name -> tensor` mapping over a .safetensors file that reads on demand,
    opening the file per tensor: safe_open's map keeps every page it read resident until
    closed, so the resident set stays at about one tensor whatever the file's size."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with safe_open(self.path, "pt") as f:  # reads the header only
            slices = {name: f.get_slice(name) for name in f.keys()}
            self._dtypes = {name: _DTYPES[s.get_dtype()] for name, s in slices.items()}
            self._shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def keys(self) -> list[str]:
        return list(self._dtypes)

    def __contains__(self, name) -> bool:
        return name in self._dtypes

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(name)


def _header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
    """(the header's bytes, {name: where its data starts in the file}, the file's size)."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad as the reference writer does, so the data is 8-aligned
    blob = struct.pack("<Q", len(blob)) + blob
    starts = {name: len(blob) + h["data_offsets"][0] for name, h in header.items()
              if name != "__metadata__"}
    return blob, starts, len(blob) + offset


def write_safetensors(path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict | None = None) -> int:
    """Write `produce(name)` for each name of `specs` ({name: (dtype, shape)}), one at a time;
    the file appears atomically. Returns the bytes written."""
    whole = ((name, (produce(name), (0,) * len(shape))) for name, (_, shape) in specs.items())
    with atomic_write(path) as tmp:
        return write_blocks(tmp, specs, whole, metadata, header=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied LM head stored once (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def stored_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a model file of `cfg`, in model order (on meta: nothing allocated)."""
    tensors = model_tensors(build_model(cfg, device="meta"))
    return {name: tuple(t.shape) for name, t in tensors.items()}


def transform_file(src_path, src_cfg: ModelConfig, out_path, tgt_cfg: ModelConfig,
                   make: Callable, dtype_of: Callable) -> int:
    """Write the model file of `tgt_cfg` tensor by tensor, `make(name, source)` reading the few
    tensors of `src_path` it needs, so neither model is ever in memory; the source's shapes are
    checked against `src_cfg` first. Returns the bytes written."""
    source = SafetensorsSource(src_path)
    for name, shape in stored_shapes(src_cfg).items():
        if name not in source or source.shape(name) != shape:
            found = source.shape(name) if name in source else "no such tensor"
            raise ValueError(f"{src_path}: {name} must have shape {shape} for the source "
                             f"config, found {found}")
    specs = {name: (dtype_of(source, name), shape) for name, shape in stored_shapes(tgt_cfg).items()}
    return write_safetensors(out_path, specs, lambda name: make(name, source),
                             metadata={"format": "pt"})


# --- one rank's blocks of sharded tensors ---------------------------------------------------
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier(group=None) -> None:
    if world_size() > 1:
        dist.barrier(group=group)


def local_block(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(this rank's part of t, its offset in the whole, whether this rank writes it): a DTensor's
    shard (one holder of each replica writes), or all of a plain tensor (rank 0 writes)."""
    if not isinstance(t, DTensor):
        return t, (0,) * t.dim(), rank() == 0
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    coordinate = t.device_mesh.get_coordinate()
    writes = all(c == 0 for c, p in zip(coordinate, t.placements) if p.is_replicate())
    return t.to_local(), tuple(offset), writes


def _clip(local: torch.Tensor, offset, shape) -> torch.Tensor:
    """The part of a block inside a tensor of `shape` (a padded vocabulary's rows are not)."""
    return local[tuple(slice(0, max(0, min(n, s - o))) for n, o, s in zip(local.shape, offset, shape))]


def write_blocks(path, specs: dict, blocks, metadata: dict | None = None,
                 header: bool | None = None) -> int:
    """Every rank calls it for the same file and `specs` ({name: (dtype, shape)}), with the
    blocks it writes ((name, (local tensor, offset)) pairs): the header by rank 0 (or `header`),
    each rank its blocks in place, run by run, so no rank holds more than its own. The caller
    waits for every rank before using the file. Returns the file's size."""
    blob, starts, size = _header(specs, metadata)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if rank() == 0 if header is None else header:
            os.pwrite(fd, blob, 0)
            os.ftruncate(fd, size)  # only grows the file: the other ranks' bytes stay
        for name, (local, offset) in blocks:
            dtype, shape = specs[name]
            local = _clip(local.detach(), offset, shape).to("cpu", dtype)
            for at, run in _runs(local, offset, shape) if local.numel() else ():
                data = run.contiguous().reshape(-1).view(torch.uint8).numpy()  # no bytes copy
                os.pwrite(fd, data, starts[name] + at * local.element_size())
            local = run = data = None  # one tensor in memory at a time (write_safetensors streams)
    finally:
        os.close(fd)
    return size


def _runs(local: torch.Tensor, offset, shape):
    """(element offset in the whole tensor, contiguous piece) for each run of a block: it spans
    whole rows of the dims after k, so each index of the dims before k is one run."""
    k = len(shape) - 1
    while k > 0 and local.shape[k] == shape[k]:
        k -= 1
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    for index in itertools.product(*(range(n) for n in local.shape[:k])):
        at = sum((o + i) * st for o, i, st in zip(offset, index, strides)) + (
            offset[k] * strides[k] if shape else 0)
        yield at, local[index] if index else local


def read_block(f, name: str, local: torch.Tensor, offset) -> None:
    """Fill `local`, the block of tensor `name` at `offset`, from an open safe_open file, reading
    only its bytes; rows past the stored tensor (a padded vocabulary's) become zeros."""
    shape = f.get_slice(name).get_shape()
    part = _clip(local, offset, shape)
    with torch.no_grad():
        if part.numel() < local.numel():
            local.zero_()
        if part.numel():
            window = tuple(slice(o, o + n) for o, n in zip(offset, part.shape))
            part.copy_(f.get_slice(name)[window] if shape else f.get_tensor(name))


def fill_block(param: torch.Tensor, draw, rows: int | None = None) -> None:
    """Model.reset_parameters' `fill` for a sharded model: each tensor drawn whole on the CPU
    (its first `rows` rows, the rest zeros) as one process would, and this rank's block kept."""
    whole = torch.zeros(param.shape, dtype=param.dtype)
    draw(whole[:rows] if rows else whole)
    local, offset, _ = local_block(param.data)
    window = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
    with torch.no_grad():
        local.copy_(whole[window])
