"""Expert load imbalance from routing histograms (a minimoe run's logged `load`, tokens per expert
per layer): the busiest expert or expert-parallel rank over the mean (docs/simulator.md "MoE")."""

from __future__ import annotations

import math
from pathlib import Path

from minimoe import files


def imbalance_factor(load: list[list[float]], ranks: int | None = None, where: str = "load") -> float:
    """Mean over layers of (busiest expert or rank) / mean; 1.0 for perfectly even routing."""
    if not isinstance(load, list) or not load:
        raise ValueError(f"{where}={load!r}: must be a non-empty list of layers")
    factors = []
    for i, layer in enumerate(load):
        if (not isinstance(layer, list) or not layer
                or any(isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n)
                       or n < 0 for n in layer)):
            raise ValueError(f"{where}[{i}]={layer!r}: must be a list of token counts >= 0")
        groups = ranks or len(layer)
        if len(layer) % groups:
            raise ValueError(f"{where}[{i}]: {len(layer)} experts do not split over {groups} ranks")
        size = len(layer) // groups
        per_group = [sum(layer[g * size:(g + 1) * size]) for g in range(groups)]
        if not sum(per_group):
            raise ValueError(f"{where}[{i}]={layer!r}: no tokens routed")
        factors.append(max(per_group) * groups / sum(per_group))
    return sum(factors) / len(factors)


def imbalance_by_ep(histograms: list[list[list[float]]], n_experts: int,
                    where: str = "imbalance_log") -> dict[int, float]:
    """{ep degree: the busiest rank's factor} for every EP degree that divides n_experts, each
    the mean over the histograms (one per logged step: a step waits for each of its layers)."""
    widths = {len(layer) for h in histograms for layer in h}
    if widths != {n_experts}:
        raise ValueError(f"{where}: the run routed over {sorted(widths)} experts; the model has "
                         f"{n_experts}")
    return {ep: sum(imbalance_factor(h, ranks=ep, where=where) for h in histograms) / len(histograms)
            for ep in range(1, n_experts + 1) if n_experts % ep == 0}


def histograms_from_log(path: str | Path) -> list[list[list[float]]]:
    """Every `load` histogram a minimoe run logged (its log.jsonl, or the run directory)."""
    path = Path(path) / "log.jsonl" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such run log")
    found = [r["load"] for r in files.read_jsonl(path) if r.get("load")]
    for n, load in enumerate(found):
        imbalance_factor(load, where=f"{path}: load of record {n + 1}")
    if not found:
        raise ValueError(f"{path}: no record has a 'load' histogram (a dense run?)")
    return found
