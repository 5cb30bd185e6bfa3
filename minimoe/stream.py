"""Safetensors one tensor at a time, so a checkpoint bigger than memory can be transformed.

`safetensors.torch.save_file` needs every tensor in memory at once, and 7B parameters in bf16
are 14 GB. The file format is simple enough to write ourselves
(https://github.com/huggingface/safetensors, "Format"):

    8 bytes        little-endian u64: N, the length of the header
    N bytes        JSON {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}}
    the rest       every tensor's raw bytes, back to back, at its data_offsets

so we compute every shape first, write the header, then stream the bytes tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable

import torch
from safetensors import safe_open

from minimoe.config import ModelConfig
from minimoe.files import atomic_write
from minimoe.model import build_model

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class SafetensorsSource:
    """A read-only `name -> tensor` mapping over a .safetensors file that reads on demand.

    safe_open memory-maps the whole file, and every page read through the map stays resident
    (and counts in the process's RSS) until the file is closed. Opening the file per tensor
    keeps the resident set at about one tensor, whatever the file's size.
    """

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
        if name not in self._dtypes:
            raise KeyError(f"{name!r} is not in {self.path}")
        with safe_open(self.path, "pt") as f:
            return f.get_tensor(name)


def write_safetensors(path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict | None = None) -> int:
    """Write `produce(name)` for each name of `specs` ({name: (dtype, shape)}), one at a time.

    The file appears atomically (minimoe/files.py). Returns the bytes written.
    """
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype={dtype} is not supported by this writer")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad as the reference writer does, so the data is 8-aligned

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape) in specs.items():
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"header says {dtype} {tuple(shape)}")
            # write the tensor's own memory through the buffer protocol: no bytes copy
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
    return 8 + len(blob) + offset


def stored_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a model file of `cfg`, in model order (meta tensors: nothing allocated;
    a tied LM head is stored once, as the embedding)."""
    tensors = build_model(cfg, device="meta").state_dict()
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight")
    return {name: tuple(t.shape) for name, t in tensors.items()}


def transform_file(src_path, src_cfg: ModelConfig, out_path, tgt_cfg: ModelConfig,
                   make: Callable, dtype_of: Callable) -> int:
    """Write the model file of `tgt_cfg` tensor by tensor, `make(name, source)` reading the few
    tensors of `src_path` it needs (`source` reads on demand), so neither model is ever in
    memory. The source's shapes are checked against `src_cfg` first. Returns the bytes written.
    This is the whole of "streamed": growth and upcycling run the same per-tensor functions on
    a state dict in memory (minimoe/grow.py, minimoe/upcycle.py)."""
    source = SafetensorsSource(src_path)
    for name, shape in stored_shapes(src_cfg).items():
        if name not in source or source.shape(name) != shape:
            found = source.shape(name) if name in source else "no such tensor"
            raise ValueError(f"{src_path}: {name} must have shape {shape} for the source "
                             f"config, found {found}")
    specs = {name: (dtype_of(source, name), shape) for name, shape in stored_shapes(tgt_cfg).items()}
    return write_safetensors(out_path, specs, lambda name: make(name, source),
                             metadata={"format": "pt"})
