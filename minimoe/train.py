"""The one training loop of every stage: AdamW, warmup then cosine, the MoE auxiliary losses,
validation, a JSONL log, and checkpoints a killed run resumes from bit-identically (docs/method.md,
"Run folders"). Under torchrun every rank runs it through one `dist.Parallel` handle."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

from minimoe import checkpoint as ckpt
from minimoe import dist, files, mixing
from minimoe.checks import SEED, check_fields
from minimoe.evaluate import evaluate
from minimoe.moe import AuxLossConfig, expert_load
from minimoe.run_files import log_records, plot_losses, resumed_weights


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    aux: AuxLossConfig = field(default_factory=AuxLossConfig)  # MoE losses (AquilaMoE's)
    mix: str = "size"  # "size", "dynamic" or "en-kjv=0.3,zh-pd1998=0.7" (minimoe/mixing.py)
    mix_every: int = 50  # dynamic: steps between weight updates
    mix_eta: float = 1.0  # dynamic: the step size eta of the update
    mix_reference: str = ""  # dynamic: reference losses, a JSON file or a run folder
    # the layout under torchrun (dist.Parallel); a run may resume under another layout
    parallel: str = "fsdp"  # "fsdp" (FSDP2) or "ddp"
    ep: int = 1  # expert-parallel ranks: each holds n_experts / ep experts of every MoE layer
    tp: int = 1  # tensor-parallel ranks: each holds 1 / tp of every matrix (a dense model)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each block
    # FSDP2: reduce-scatter gradients after every micro-batch, each rank keeping its shard
    # (torchtitan's); False: once per step, each gradient held whole until then (4 B/param)
    reduce_every_micro_batch: bool = True
    async_checkpoint: bool = False  # write checkpoints in the background (minimoe/checkpoint.py)

    def __post_init__(self):
        check_fields("TrainConfig", self, TRAIN_RULES)
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"TrainConfig.device={self.device!r}: must be cpu, cuda or cuda:N")
        if self.tp > 1 and (self.ep > 1 or self.parallel != "fsdp"):  # tp splits dense models
            raise ValueError(f"TrainConfig.tp={self.tp}: runs with ep=1 and parallel='fsdp'")
        if self.ep > 1 and self.parallel != "fsdp":  # DDP would average different experts
            raise ValueError(f"TrainConfig.ep={self.ep}: runs with parallel='fsdp'")
        try:
            mixing.parse_mix(self.mix)  # the domains are checked against the data in train()
        except ValueError as err:
            raise ValueError(f"TrainConfig.{err}") from None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


TRAIN_RULES = {  # minimoe/checks.py; bounds on what multiplies into memory
    **dict.fromkeys(("steps", "eval_every", "ckpt_every", "log_every", "mix_every"), "int>0"),
    **dict.fromkeys(("batch_size", "seq_len", "grad_accum", "eval_batches"), "int[1, 1048576]"),
    "seed": SEED,
    **dict.fromkeys(("ep", "tp"), "int[1, 65536]"),
    **dict.fromkeys(("lr", "mix_eta"), ">0"), "warmup_steps": "int>=0", "min_lr_ratio": "[0, 1]",
    **dict.fromkeys(("beta1", "beta2"), "[0, 1)"), **dict.fromkeys(("weight_decay", "grad_clip"), ">=0"),
    "parallel": ("fsdp", "ddp"), **dict.fromkeys(("bf16", "activation_checkpointing", "compile",
                                             "reduce_every_micro_batch", "async_checkpoint"), "bool"),
}


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to tc.lr, then cosine decay to tc.lr * min_lr_ratio at the last step."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def make_optimizer(model, tc: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on vectors (norm weights, biases), as in nanoGPT and LLaMA
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=False)


def train_step(parallel: dist.Parallel, optimizer, batch, tc: TrainConfig) -> dict:
    """One optimizer step over tc.grad_accum micro-batches, `batch(micro) -> (x, y)` on the
    device: forward, backward, clipping, AdamW. Returns {"loss", "grad_norm", MoE losses...}
    as 0-d tensors, left on the device: the caller copies them to the host once per step."""
    model, sums = parallel.model, {}
    autocast = tc.bf16 and not parallel.mixed_precision  # FSDP2 casts by its policy instead
    for micro in range(tc.grad_accum):
        x, y = batch(micro)
        with parallel.sync(last=micro == tc.grad_accum - 1), parallel.loss_context():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                if model.cfg.is_moe and tc.aux.max_z_on == "lm_head":  # needs every logit
                    logits = parallel.module(x)
                    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
                else:
                    logits, ce = None, parallel.module(x, targets=y)  # a chunked loss
                aux, parts = tc.aux.total(model, logits) if model.cfg.is_moe else (0.0, {})
            ((ce + aux) / tc.grad_accum).backward()
        for k, v in {"loss": ce.detach(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v / tc.grad_accum
    sums["grad_norm"] = parallel.clip_grad_norm_(tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums


LAYOUT_FIELDS = ("parallel", "ep", "tp", "activation_checkpointing", "compile",
                 "reduce_every_micro_batch", "async_checkpoint")  # not the run's identity


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    tokens: int
    train_time: float  # seconds spent in training steps (evaluation excluded), over resumes
    final_val: dict[str, float]
    history: list[dict] = field(default_factory=list)


def train(model, data, tc: TrainConfig, out_dir, meta: dict | None = None, progress: bool = True,
          on_step=None, tensorboard=None, init="seed") -> RunResult:
    """Train `model` for tc.steps steps, checkpointing into out_dir. `model` (on the meta device)
    is filled once placed, each rank with its blocks: from out_dir's checkpoint (resuming), else
    from `init` (a model file, or "seed"). `meta` goes to run.json; `on_step(step, record)` runs
    after each step; `tensorboard`: a folder for torch's SummaryWriter."""
    if tc.device.startswith("cuda") and not torch.cuda.is_available():  # a recipe may name it
        raise ValueError(f"TrainConfig.device={tc.device!r}: no GPU here; use cpu")
    par = dist.Parallel.from_env(tc)  # torchrun's process group and mesh; or one process
    weights, references = _start_mix(tc, data)  # weights None: in proportion to size
    dynamic = references is not None
    out_dir = Path(out_dir)
    if tc.batch_size % par.world:
        raise ValueError(f"TrainConfig.batch_size={tc.batch_size}: must be divisible by the "
                         f"{par.world} ranks (each takes an equal share of every batch)")
    run = {"train": dataclasses.asdict(tc), "model": model.cfg.to_dict(), **(meta or {})}
    par.main_only(lambda: _start_folder(out_dir, run, model.cfg, data.tokenizer))
    main = par.main

    latest = ckpt.latest_checkpoint(out_dir)
    par.parallelize(model, fill=lambda: ckpt.fill_model(model, par.device, None if latest else init,
                                                        tc.seed))
    model.train()
    optimizer = make_optimizer(model, tc)
    step, tokens, train_time = 0, 0, 0.0
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer)
        step, tokens, train_time = state["step"], state["tokens"], state["train_time"]
        weights = resumed_weights(state, latest, tc.steps, tc.tokens_per_step, weights)
    else:
        torch.manual_seed(tc.seed)
    log_path = out_dir / "log.jsonl"
    history = par.main_only(lambda: _truncate_log(log_path, step))
    board = None
    if tensorboard and main:  # the optional extra; a resumed run's later steps purged
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(str(tensorboard), purge_step=step + 1)
    if step >= tc.steps and (out_dir / "model.safetensors").exists():  # finished earlier
        return RunResult(out_dir, step, tokens, train_time, _final_val(history), history)
    if step == 0 and not any("val_loss" in r for r in history):
        history.append(_log(log_path, {"step": 0, "tokens": 0, **_evaluate(par, data, tc)},
                            main, board))

    bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True, leave=False,
               disable=not (progress and main))
    last_good = latest
    own_rows = par.rows(tc.batch_size)  # this rank's rows of every batch
    while step < tc.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def batch(micro, step=step):
            x, y = data.train_batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len,
                                    seed=tc.seed, weights=weights, rows=own_rows)
            return x.to(par.device), y.to(par.device)

        stats = train_step(par, optimizer, batch, tc)
        grad_norm = stats.pop("grad_norm").item()  # global already; the rest is this rank's
        parts = par.mean(stats)  # the logged numbers are the global batch's
        loss = parts.pop("loss")
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
            raise TrainingDiverged(f"step {step}: loss={loss}; training stopped ({where})")
        step += 1
        tokens += tc.tokens_per_step
        dt = time.perf_counter() - t0
        train_time += dt
        record = {"step": step, "tokens": tokens, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tok_per_s": tc.tokens_per_step / dt, **parts}
        # pairs per expert of this step's last batch (before evaluation routes more), all ranks
        load = par.sum(expert_load(model)).tolist() if model.cfg.is_moe else None
        update = dynamic and step % tc.mix_every == 0 and step < tc.steps
        if step % tc.eval_every == 0 or step == tc.steps or update:
            record.update(_evaluate(par, data, tc))
        if weights is not None:
            record["mix"] = weights  # the weights this step's batches were drawn with
        if update:  # Sheared-LLaMA: from the next step on, more of the lagging domains
            losses = {domain: record[f"val_{domain}"] for domain in weights}
            weights = mixing.dynamic_update(weights, losses, references, tc.mix_eta)
            record["mix_next"] = weights
        if step % tc.log_every == 0 or "val_loss" in record or step == tc.steps:
            record["load"] = load
            history.append(_log(log_path, record, main, board))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
        if on_step is not None:
            on_step(step, record)
        if step % tc.ckpt_every == 0 or step == tc.steps:
            ckpt.save_checkpoint(out_dir, step, model, optimizer,
                                 {"tokens": tokens, "train_time": train_time, "seed": tc.seed,
                                  "mix_weights": weights},
                                 background=tc.async_checkpoint and step < tc.steps)
            last_good = ckpt.latest_checkpoint(out_dir)
    bar.close()
    if board is not None:
        board.close()
    ckpt.wait_for_checkpoint()
    ckpt.save_tensors(out_dir / "model.safetensors", ckpt.model_tensors(model), model.cfg)
    if main:
        plot_losses(history, out_dir / "loss.png", title=str((meta or {}).get("stage", out_dir.name)))
        mixing.plot_weights(history, out_dir / "mix.png", title=f"domain weights ({tc.mix})")
    par.barrier()
    return RunResult(out_dir, step, tokens, train_time, _final_val(history), history)


def _evaluate(par: dist.Parallel, data, tc: TrainConfig) -> dict[str, float]:
    """Validation losses; under torchrun each rank takes its rows of every batch."""
    if not par.distributed:
        return evaluate(par.model, data, tc)
    return par.mean(evaluate(par.model, par.val_rows(data), tc))


def plan(model, tc: TrainConfig, mesh) -> dist.Parallel:
    """tc's layout on `mesh` (None: one process), for a step outside `train` (dry run, benches)."""
    return dist.Parallel(tc, mesh).parallelize(model)


def _start_folder(out_dir: Path, run: dict, cfg, tokenizer):
    """Refuse a folder that holds another run (resuming this one is fine), then write its
    config, run and tokenizer files (eval, generate and export read the tokenizer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    if not path.exists():
        if any(out_dir.iterdir()) and not (out_dir / "ckpt").exists():
            raise ValueError(f"out={out_dir}: the folder is not empty and holds no minimoe run; "
                             "choose another --out")
    else:
        old = ckpt.read_json(path)
        for key in ("model", "train", "stage", "data", "init_from"):
            a, b = old.get(key), run.get(key)
            if key == "train" and isinstance(a, dict):  # a run resumes under any layout
                a, b = ({k: v for k, v in t.items() if k not in LAYOUT_FIELDS} for t in (a, b))
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                raise ValueError(f"out={out_dir}: holds a different run ({key} differs); "
                                 "choose another --out or delete the folder")
    held = out_dir / "tokenizer.json"
    if held.exists() and held.read_text(encoding="utf-8") != tokenizer.json:
        raise ValueError(f"out={out_dir}: holds a run of another tokenizer than the data's "
                         f"{tokenizer.name}; choose another --out")
    files.write_text(out_dir / "config.json", cfg.to_json())
    files.write_json(out_dir / "run.json", run)
    tokenizer.save(out_dir)


def _start_mix(tc: TrainConfig, data) -> tuple[dict | None, dict | None]:
    """The domain weights a fresh run starts with, and the reference losses of a dynamic mix;
    checked against the data before anything is written."""
    try:
        weights = mixing.resolve_mix(tc.mix, data.domain_tokens())
    except ValueError as err:
        raise ValueError(f"TrainConfig.{err}") from None
    if tc.mix != mixing.DYNAMIC:
        return weights, None
    lacking = [d for d in data.domains if d not in data.val_domains]
    if lacking:
        raise ValueError(f"TrainConfig.mix='dynamic': domain {lacking[0]!r} has no validation "
                         "documents to measure its loss on")
    return weights, mixing.load_references(tc.mix_reference, data.domains)


def _final_val(history: list[dict]) -> dict[str, float]:
    last = next((r for r in reversed(history) if "val_loss" in r), {})
    return {k: v for k, v in last.items() if k.startswith("val_")}


def _truncate_log(path: Path, step: int) -> list[dict]:
    """Keep the log records up to `step` (a resumed run re-logs what came after)."""
    records = [r for r in log_records(path) if r["step"] <= step]
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _log(path: Path, record: dict, write: bool = True, board=None) -> dict:
    if write:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if board is not None:  # the record's numbers, and the domain weights as mix/<domain>
        numbers = {**record, **{f"mix/{d}": w for d, w in (record.get("mix") or {}).items()}}
        for key, value in numbers.items():
            if isinstance(value, (int, float)) and key != "step":
                board.add_scalar(key, value, record["step"])
    return record


def read_log(run_dir) -> list[dict]:
    """The records of a run's log.jsonl (every logged step, with its validation losses)."""
    return files.read_jsonl(Path(run_dir) / "log.jsonl")
