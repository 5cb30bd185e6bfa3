"""Hugging Face folders in and out, one tensor in memory at a time: `export_run` writes a run as
a transformers checkpoint, `import_checkpoint` makes a run of one. The tensor table:
minimoe/interop.py; what each format holds: docs/method.md#interop."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch

from minimoe import files
from minimoe.checkpoint import CheckpointError, model_file, read_config, read_json
from minimoe.config import ModelConfig
from minimoe.interop import FORMATS, check_dropped, check_format, config_from_hf, hf_config, plan
from minimoe.stream import SafetensorsSource, write_safetensors
from minimoe.tokens import TOKENIZER_FILES, Tokenizer

EXPORTED = ("config.json", "generation_config.json", "model.safetensors", "README.md",
            *TOKENIZER_FILES)
DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Tensors(dict):
    """name -> the file holding it; reading a name reads that one tensor."""

    def __init__(self, paths):
        super().__init__((name, source) for source in map(SafetensorsSource, paths)
                         for name in source.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        return super().__getitem__(name)[name]

    def meta(self, name: str) -> torch.Tensor:  # shape and dtype, no data
        source = super().__getitem__(name)
        return torch.empty(source.shape(name), dtype=source.dtype(name), device="meta")


def convert_file(tensors: Tensors, cfg: ModelConfig, fmt: str, to_hf: bool, path: Path,
                 dtype: torch.dtype | None = None) -> int:
    """One safetensors file converted into another, tensor by tensor; returns its bytes."""
    check_dropped(tensors, cfg, fmt, to_hf)
    steps = plan(cfg, fmt, to_hf)
    missing = sorted({s for srcs, _, _ in steps.values() for s in srcs} - set(tensors))
    if missing:
        raise CheckpointError(f"tensor {missing[0]} is missing (a different architecture?)")

    def produce(name):
        srcs, fn, index = steps[name]
        tensor = fn(*(tensors[s] for s in srcs))[index]
        return (tensor if dtype is None else tensor.to(dtype)).contiguous()

    metas = {name: fn(*(tensors.meta(s) for s in srcs))[i] for name, (srcs, fn, i) in steps.items()}
    specs = {name: (dtype or meta.dtype, tuple(meta.shape)) for name, meta in metas.items()}
    return write_safetensors(path, specs, produce, metadata={"format": "pt"})


# --- out: a run as a transformers checkpoint -----------------------------------------------------
def choose_format(cfg: ModelConfig, fmt: str, tensors, tokenizer: Tokenizer) -> str:
    """"auto": Llama or Qwen2 (where transformers keeps the tokenizer) for a dense model,
    Mixtral or else Qwen2-MoE for an MoE; a named format is checked, refusing what it cannot hold."""
    if fmt == "auto" and not cfg.is_moe:
        fmt = "qwen2" if cfg.qkv_bias and _qwen2_keeps(tokenizer) else "llama"
    elif fmt == "auto":
        try:
            return choose_format(cfg, "mixtral", tensors, tokenizer)
        except ValueError:
            fmt = "qwen2_moe"
    check_format(cfg, fmt)
    check_dropped(tensors, cfg, fmt, to_hf=True)
    if fmt == "qwen2" and not _qwen2_keeps(tokenizer):
        raise ValueError(f"format='qwen2': transformers rebuilds a Qwen2 model's tokenizer with "
                         f"Qwen2's own pre-tokenizer, which splits this run's text differently "
                         f"(tokenizer {tokenizer.name}); use format 'llama'")
    return fmt


def _qwen2_keeps(tokenizer: Tokenizer) -> bool:
    """Whether transformers' Qwen2Tokenizer, which rebuilds the normaliser, pre-tokenizer and
    decoder whatever tokenizer.json says (models/qwen2/tokenization_qwen2.py), rebuilds ours."""
    from transformers import Qwen2Tokenizer  # optional dependency, heavy to import

    theirs = json.loads(Qwen2Tokenizer(vocab={"x": 0}, merges=[]).backend_tokenizer.to_str())
    ours = json.loads(tokenizer.json)
    return all(ours.get(k) == theirs[k] for k in ("normalizer", "pre_tokenizer", "decoder"))


def export_run(run, out, tokenizer: Tokenizer, fmt: str = "auto", dtype: str = "keep") -> dict:
    """Write run `run` as a transformers checkpoint into `out` (empty, or an earlier export)."""
    run, out = Path(run), Path(out)
    cfg, path = read_config(run), model_file(run)
    if not path.exists():
        raise CheckpointError(f"{run}: its newest weights are a multi-rank checkpoint; finish "
                              "the run (its model.safetensors) to export it")
    assert dtype in DTYPES, dtype  # the command's choices
    other = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED) if out.is_dir() else []
    if other or out.is_file():
        raise ValueError(f"--out={out}: holds {other[0] if other else 'a file'}, not an export; "
                         "choose an empty folder")
    tensors = Tensors([path])
    fmt = choose_format(cfg, fmt, tensors, tokenizer)
    hf = hf_config(cfg, fmt)
    hf.bos_token_id, hf.eos_token_id, hf.pad_token_id = tokenizer.start_id, tokenizer.eos_id, None
    hf.dtype = str(DTYPES[dtype] or tensors.meta("embed.weight").dtype).removeprefix("torch.")
    out.mkdir(parents=True, exist_ok=True)
    written = convert_file(tensors, cfg, fmt, True, out / "model.safetensors", DTYPES[dtype])
    files.write_text(out / "config.json", hf.to_json_string())
    files.write_json(out / "generation_config.json", {
        "bos_token_id": tokenizer.start_id, "eos_token_id": tokenizer.eos_id, "do_sample": False})
    tokenizer.save(out)
    files.write_text(out / "README.md", model_card(run, cfg, fmt, tokenizer))
    return {"format": fmt, "architecture": FORMATS[fmt], "bytes": written, "out": str(out)}


def model_card(run: Path, cfg: ModelConfig, fmt: str, tokenizer: Tokenizer) -> str:
    """A Hub model card: what the model is, and the chain of runs it came from."""
    chain, at = [], run
    while at is not None and (at / "run.json").exists() and len(chain) < 100:
        meta = read_json(at / "run.json")
        how = ", ".join(f"{k} {meta[k]}" for k in ("method", "target", "n_experts", "top_k",
                                                   "source") if meta.get(k) is not None)
        chain.append(f"- `{at}`: {meta.get('stage', 'run')}" + (f" ({how})" if how else ""))
        at = Path(meta["init_from"]) if meta.get("init_from") else None
    counts = cfg.param_counts()
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [minimoe, {fmt}]", "---", "", f"# {run.name}", "",
        f"Exported by `minimoe export` from the minimoe run `{run}` as `{FORMATS[fmt]}`: "
        f"{counts['total']:,} parameters ({counts['active']:,} active per token), tokenizer "
        f"{tokenizer.name}; documents were trained as `{tokenizer.bos or ''}text{tokenizer.eos}`.",
        "", "## The chain it came from (newest first)", "", *chain, ""])


# --- in: a transformers checkpoint as a run ------------------------------------------------------
def import_checkpoint(hf_dir, out, spec: dict) -> dict:
    """Make run `out` (its data: `spec`) of the transformers checkpoint in `hf_dir` and its
    tokenizer; returns run.json (a finished import of the same checkpoint as it is)."""
    from transformers import AutoConfig  # optional dependency, heavy to import

    hf_dir, out = Path(hf_dir), Path(out)
    meta = {"stage": "import", "source": str(hf_dir.resolve()), "init_from": None}
    if (out / "run.json").exists() and (out / "model.safetensors").exists():
        old = read_json(out / "run.json")
        if any(old.get(k) != v for k, v in meta.items()):
            raise ValueError(f"--out={out}: holds another run; choose an empty folder")
        return old
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out={out}: not an empty folder")
    try:
        hf = AutoConfig.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"--hf={hf_dir}: not a transformers checkpoint ({err})") from None
    cfg, fmt = config_from_hf(hf), hf.model_type
    tokenizer = _hub_tokenizer(hf_dir, hf)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"--hf={hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the "
                         f"model's vocab_size is {cfg.vocab_size}")
    tensors = Tensors(_weight_files(hf_dir))
    extra = sorted(set(tensors) - {s for srcs, _, _ in plan(cfg, fmt, False).values() for s in srcs}
                   - {"lm_head.weight"} - {n for n in tensors if "rotary_emb" in n})
    if extra:
        raise ValueError(f"--hf={hf_dir}: tensor {extra[0]} has no place in minimoe's model")
    out.mkdir(parents=True, exist_ok=True)
    convert_file(tensors, cfg, fmt, False, out / "model.safetensors")
    tokenizer.save(out)
    files.write_text(out / "config.json", cfg.to_json())
    meta = {**meta, "format": fmt, "data": {**spec, "vocab_size": tokenizer.vocab_size}}
    files.write_json(out / "run.json", meta)
    return meta


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / name for name in read_json(index)["weight_map"].values()})
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise ValueError(f"--hf={folder}: holds no model.safetensors (minimoe reads safetensors "
                     "only: a .bin file is a pickle, which can run code)")


def _hub_tokenizer(folder: Path, hf) -> Tokenizer:
    """The checkpoint's tokenizer.json, its end (and start) of text named by
    tokenizer_config.json, else by the model config's token ids."""
    if not (folder / TOKENIZER_FILES[0]).exists():
        raise ValueError(f"--hf={folder}: holds no tokenizer.json (save the tokenizer with "
                         "transformers' save_pretrained to write one)")
    vocab = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILES[0]))
    ids = {key: getattr(hf, f"{key}_token_id", None) for key in ("eos", "bos")}
    names = {key: vocab.id_to_token(i) for key, i in ids.items() if isinstance(i, int)}
    return Tokenizer.load(folder, **names)
