"""Data mixing by domain: how much of each domain a training batch draws.

AquilaMoE mixes its bilingual corpus "in specified proportions" (arXiv 2408.06567, on its
training data); LLaMA-MoE (Zhu et al. 2024, arXiv 2406.16554) trains its experts with
Sheared-LLaMA's dynamic batch loading (Xia et al. 2023, arXiv 2310.06694, "Dynamic batch
loading"). Three mixes, written as `--mix`:

  size                          windows anywhere in the stream: each domain in proportion to
                                its tokens (the default, and the batches minimoe always drew)
  en-kjv=0.3,zh-pd1998=0.7      static weights, normalised to sum 1
  dynamic                       Sheared-LLaMA's rule, every `mix_every` steps:
                                    w_d <- w_d * exp(eta * max(0, val_loss_d - ref_d)), normalised
                                starting from the size proportions; the reference losses ref_d
                                come from a JSON file {domain: loss} or from a run's last
                                validation (its log.jsonl)

The weights in force are the only state the mix adds: the batch of step i is a pure function
of (seed, i, weights) (tokens.TokenData.train_batch), and the trainer keeps the weights in its
checkpoints and its log, so a resumed run draws exactly the batches of an unbroken one.
Sheared-LLaMA's code also blends a small uniform share into the weights after each update;
the rule here is the one written above, without it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from minimoe import files

SIZE, DYNAMIC = "size", "dynamic"
_PAIR = re.compile(r"\s*([^=,\s]+)\s*=\s*([^=,\s]+)\s*")


def parse_mix(text: str) -> str | dict[str, float]:
    """"size", "dynamic", or {domain: weight} normalised to sum 1 (domains are checked against
    the data later, in `resolve_mix`). A negative or non-numeric weight, weights summing to 0
    or a malformed pair raise ValueError naming it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"mix={text!r}: must be 'size', 'dynamic' or domain=weight pairs")
    if text.strip() in (SIZE, DYNAMIC):
        return text.strip()
    weights: dict[str, float] = {}
    for pair in text.split(","):
        match = _PAIR.fullmatch(pair)
        if match is None:
            raise ValueError(f"mix={text!r}: {pair!r} is not domain=weight "
                             "(e.g. en-kjv=0.3,zh-pd1998=0.7; or 'size', 'dynamic')")
        domain, value = match.groups()
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"mix={text!r}: weight {value!r} of {domain!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mix={text!r}: weight {value} of {domain!r} must be >= 0 and finite")
        if domain in weights:
            raise ValueError(f"mix={text!r}: domain {domain!r} is given twice")
        weights[domain] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix={text!r}: the weights sum to 0; at least one must be positive")
    return {domain: weight / total for domain, weight in weights.items()}


def size_weights(domain_tokens: dict[str, int]) -> dict[str, float]:
    """Each domain in proportion to its training tokens."""
    total = sum(domain_tokens.values())
    return {domain: n / total for domain, n in domain_tokens.items()}


def resolve_mix(text: str, domain_tokens: dict[str, int]) -> dict[str, float] | None:
    """The weights a run starts with: None for "size" (the plain sampler), the size
    proportions for "dynamic", the given weights for a static mix (every domain of the data
    named; an unknown domain is refused)."""
    mix = parse_mix(text)
    if mix == SIZE:
        return None
    if mix == DYNAMIC:
        return size_weights(domain_tokens)
    unknown = [domain for domain in mix if domain not in domain_tokens]
    if unknown:
        raise ValueError(f"mix={text!r}: unknown domain {unknown[0]!r}; the data has "
                         f"{', '.join(domain_tokens)}")
    return {domain: mix.get(domain, 0.0) for domain in domain_tokens}  # unnamed: weight 0


def dynamic_update(weights: dict[str, float], val_losses: dict[str, float],
                   references: dict[str, float], eta: float) -> dict[str, float]:
    """One step of Sheared-LLaMA's rule: the domains furthest above their reference loss gain
    weight; a domain at or below its reference keeps its (relative) weight."""
    raised = {domain: w * math.exp(eta * max(0.0, val_losses[domain] - references[domain]))
              for domain, w in weights.items()}
    total = sum(raised.values())
    return {domain: w / total for domain, w in raised.items()}


def load_references(source: str, domains: list[str]) -> dict[str, float]:
    """Reference loss per domain: a JSON file {domain: loss}, or a run folder (the last
    validation of its log.jsonl, keys val_<domain>)."""
    if not source:
        raise ValueError("mix_reference='': dynamic mixing needs reference losses "
                         "(a JSON file {domain: loss} or a run folder)")
    path = Path(source).expanduser()
    if path.is_dir():
        records = [r for r in files.read_jsonl(path / "log.jsonl") if "val_loss" in r] \
            if (path / "log.jsonl").exists() else []
        if not records:
            raise ValueError(f"mix_reference={source!r}: a run folder with validation losses "
                             "in log.jsonl is needed")
        found = {key[4:]: value for key, value in records[-1].items() if key.startswith("val_")}
    elif path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"mix_reference={source!r}: not JSON ({err.msg})") from None
        if not isinstance(found, dict):
            raise ValueError(f"mix_reference={source!r}: must hold a JSON object {{domain: loss}}")
    else:
        raise ValueError(f"mix_reference={source!r}: no such file or run folder")
    missing = [domain for domain in domains if not isinstance(found.get(domain), (int, float))]
    if missing:
        raise ValueError(f"mix_reference={source!r}: no reference loss for domain {missing[0]!r}")
    return {domain: float(found[domain]) for domain in domains}


def describe(mix: str, history: list[dict], domain_tokens: dict[str, int]) -> str:
    """The mix a run trained with, in words: its rule and the weights in force at the first and
    the last logged step ("size: en-kjv 0.29, zh-pd1998 0.71"; "dynamic: ... -> ...")."""
    weights = [r["mix"] for r in history if r.get("mix")] or [size_weights(domain_tokens)]
    shown = [", ".join(f"{d} {w:.2f}" for d, w in weights[i].items()) for i in (0, -1)]
    return f"{mix}: {shown[0]}" + (f" -> {shown[1]}" if shown[1] != shown[0] else "")


def plot_weights(history: list[dict], path: Path, title: str = ""):
    """The domain weights in force against tokens, one line per domain."""
    points = [(r["tokens"], r["mix"]) for r in history if r.get("mix")]
    if not points:
        return
    plt = files.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for domain in points[-1][1]:
        ax.plot([t for t, _ in points], [w[domain] for _, w in points], marker="o", ms=2,
                label=domain)
    ax.set_xlabel("tokens")
    ax.set_ylabel("domain weight")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    files.save_figure(fig, path)
