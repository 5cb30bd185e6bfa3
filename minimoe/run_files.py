"""What each file of a run folder must hold, checked where it is read, as any input is
(docs/method.md#run-folders): a file that breaks a rule is one line naming it."""

from __future__ import annotations

import re
from pathlib import Path

from minimoe import files
from minimoe.checks import check, problem

STEP_NAME = re.compile(r"step_\d{6,}")  # a checkpoint folder: ckpt/step_000100


def step_of(path: Path) -> int:
    return int(Path(path).name.split("_")[1])


def checked_state(state: dict, path: Path, n_groups: int) -> dict:
    """A checkpoint's state.json: its own step, counts, and the optimizer's n_groups groups."""
    where = f"{path / 'state.json'}: "
    check(where, "step", state.get("step"), "int>=0")
    if state["step"] != step_of(path):
        raise ValueError(f"{where}step={state['step']}: the folder is {path.name}")
    check(where, "tokens", state.get("tokens"), "int>=0")
    check(where, "train_time", state.get("train_time"), ">=0")
    hyper = state.get("optimizer")
    if not (isinstance(hyper, dict) and isinstance(hyper.get("param_groups"), list)
            and len(hyper["param_groups"]) == n_groups
            and all(isinstance(g, dict) for g in hyper["param_groups"])):
        raise ValueError(f"{where}optimizer: must hold a param_groups list of {n_groups} (this "
                         "run's optimizer's)")
    return state


def resumed_weights(state: dict, path: Path, steps: int, tokens_per_step: int, weights):
    """The domain weights a checkpoint resumes with, once its state fits the run resuming it."""
    where = f"{path / 'state.json'}: "
    if state["step"] > steps or state["tokens"] != state["step"] * tokens_per_step:
        raise ValueError(f"{where}step={state['step']}, tokens={state['tokens']}: this run has "
                         f"{steps} steps of {tokens_per_step} tokens")
    saved = state.get("mix_weights")
    fits = saved is None if weights is None else (
        isinstance(saved, dict) and sorted(saved) == sorted(weights)
        and all(problem(w, "[0, 1]") is None for w in saved.values()))
    if not fits:
        raise ValueError(f"{where}mix_weights={saved!r}: must weigh the run's domains "
                         f"({', '.join(weights or {}) or 'none: a size mix'}) in [0, 1]")
    return saved


def log_records(path: Path) -> list[dict]:
    """log.jsonl's records (a torn last line dropped): a step, its tokens and numbers each."""
    records = files.read_jsonl(path) if path.exists() else []
    for n, r in enumerate(records, 1):
        mix = r.get("mix") or {}
        numbers = [v for k, v in r.items() if k in ("loss", "lr") or k.startswith("val_")]
        if problem(r.get("step"), "int>=0") or problem(r.get("tokens"), "int>=0") \
                or not isinstance(mix, dict) or any(isinstance(v, bool) or not isinstance(
                    v, (int, float)) for v in numbers + list(mix.values())):
            raise ValueError(f"{path}: record {n} is not a training log record (step, tokens "
                             "and numbers)")
    return records


def data_spec(spec, where: str) -> dict:
    """run.json's "data": paths (None: the demo corpus), the tokenizer and its vocabulary."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}={spec!r}: names no data (not a minimoe run?)")
    paths = spec.get("paths")
    if paths is not None and not (isinstance(paths, list) and paths and all(
            isinstance(p, str) and p.strip() for p in paths)):
        raise ValueError(f"{where}.paths={paths!r}: must be null (the demo corpus) or a list "
                         "of paths")
    check(where, "tokenizer", spec.get("tokenizer"), ("bpe", "byte", "run"))
    check(where, "vocab_size", spec.get("vocab_size"),  # bpe: 256 bytes + eos and merges
          "int[258, 16777216]" if spec["tokenizer"] == "bpe" else "int[0, 16777216]")
    return spec


def transform_report(old: dict, path: Path) -> dict:
    """A finished transformation's transform.json, held to what its readers take from it."""
    counts = [old.get(k) for k in ("params_before", "params_after")]
    losses = [old.get(k, "missing") for k in ("val_before", "val_after")]
    growth = old.get("growth", {"depth": ""})
    if not (all(isinstance(c, dict) and not problem(c.get("total"), "int>=0")
                and not problem(c.get("active"), "int>=0") for c in counts)
            and all(v is None or isinstance(v, dict) and not problem(v.get("val_loss"), "")
                    and all(not problem(x, "") for x in v.values()) for v in losses)
            and isinstance(growth, dict) and isinstance(growth.get("depth"), str)):
        raise ValueError(f"{path}: not what a transformation reports (parameter counts, "
                         "validation losses); choose another folder")
    return old


def plot_losses(history: list[dict], path: Path, title: str = ""):
    """Training and validation loss against tokens, one PNG per run."""
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    train_pts = [(r["tokens"], r["loss"]) for r in history if "loss" in r]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train", alpha=0.6)
    for key in sorted({k for r in history for k in r if k.startswith("val_")}):
        pts = [(r["tokens"], r[key]) for r in history if key in r]
        ax.plot(*zip(*pts), marker="o", ms=3, label=key.replace("_", " "))
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats)", title=title)
    ax.legend()
    files.save_figure(fig, path)
