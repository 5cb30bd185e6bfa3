"""Data mixing by domain (`--mix`): "size" (in proportion to tokens), static weights
("en-kjv=0.3,zh-pd1998=0.7"), or "dynamic", Sheared-LLaMA's rule as LLaMA-MoE trains with it
(docs/method.md#data-mixing). Its only state, the weights in force, is in checkpoint and log."""

from __future__ import annotations

import math
import re
from pathlib import Path

from minimoe import files
from minimoe.checks import problem

SIZE, DYNAMIC = "size", "dynamic"
_PAIR = re.compile(r"\s*([^=,\s]+)\s*=\s*([^=,\s]+)\s*")


def parse_mix(text: str) -> str | dict[str, float]:
    """"size", "dynamic", or {domain: weight} summing to 1 (domains checked in `resolve_mix`)."""
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
    top = max(weights.values())
    if top <= 0:
        raise ValueError(f"mix={text!r}: the weights sum to 0; at least one must be positive")
    return _normalised({domain: weight / top for domain, weight in weights.items()})


def _normalised(weights: dict[str, float]) -> dict[str, float]:
    total = math.fsum(weights.values())  # the largest is 1 by now: no overflow, no underflow to 0
    return {domain: w / total for domain, w in weights.items()}


def size_weights(domain_tokens: dict[str, int]) -> dict[str, float]:
    total = sum(domain_tokens.values())
    return {domain: n / total for domain, n in domain_tokens.items()}


def resolve_mix(text: str, domain_tokens: dict[str, int]) -> dict[str, float] | None:
    """The weights a run starts with: None for "size" (the plain sampler), the size
    proportions for "dynamic", the given weights (an unknown domain refused) for a static mix."""
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
    # in log space, shifted by the largest: exp never overflows, however large eta * gap
    logs = {domain: math.log(w) + eta * max(0.0, val_losses[domain] - references[domain])
            for domain, w in weights.items() if w > 0}
    top = max(logs.values())
    return _normalised({domain: math.exp(logs[domain] - top) if domain in logs else 0.0
                        for domain in weights})


def load_references(source: str, domains: list[str]) -> dict[str, float]:
    """Reference loss per domain: a JSON file {domain: loss}, or a run folder's last validation."""
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
        found = files.read_json(path)
    else:
        raise ValueError(f"mix_reference={source!r}: no such file or run folder")
    for domain in domains:
        why = problem(found.get(domain), ">=0")
        if why:
            raise ValueError(f"mix_reference={source!r}: the reference loss of domain "
                             f"{domain!r} is {found.get(domain)!r}; {why}")
    return {domain: float(found[domain]) for domain in domains}


def describe(mix: str, history: list[dict], domain_tokens: dict[str, int]) -> str:
    """The mix a run trained with, its first and last weights: "size: en-kjv 0.29, zh-pd1998 0.71"."""
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
    ax.set(xlabel="tokens", ylabel="domain weight", ylim=(0, 1), title=title)
    ax.legend()
    files.save_figure(fig, path)
