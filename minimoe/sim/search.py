"""Layout search (`minimoe plan`): every way to cut a model over up to N GPUs priced in one
vectorised pass; the fastest and the cheapest, or what stands in the way (docs/simulator.md)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd

from minimoe.config import ModelConfig
from minimoe.flops import RECOMPUTE
from minimoe.sim.cost import Options, SimResult, WorkloadStats, check_options, price, simulate
from minimoe.sim.layout import Layout, Workload, rule_failures, rule_text
from minimoe.sim.hardware import Device
from minimoe.tables import fmt_value


@dataclass(frozen=True)
class SearchResult:
    n_candidates: int  # layouts priced
    n_valid: int  # that divide evenly
    n_feasible: int  # that also fit in memory
    seconds: float
    attention: str  # FLOP convention of the MFU figures
    fastest: SimResult | None
    cheapest: SimResult | None  # lowest $ per token; may use fewer GPUs than offered
    table: list[dict]  # the best feasible layouts by step time
    why_none: str = ""  # when n_feasible == 0: what stands in the way
    options: dict | None = None  # the cost model's options the search used


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def search_axes(workload: Workload, max_gpus: int) -> dict[str, list[int]]:
    """The values each layout column (Layout.columns) takes in a search (docs/simulator.md
    "Which layouts are valid"); for an MoE etp = tp (0) or folded (1)."""
    cfg = workload.cfg
    return {"tp": [t for t in (1, 2, 4, 8, 16) if t <= max_gpus],
            "cp": [c for c in (1, 2, 4, 8) if workload.seq_len // c >= 4096 or c == 1],
            "pp": _divisors(cfg.n_layers, 64),
            "ep": _divisors(cfg.n_experts, 64) if cfg.n_experts else [1],
            "zero": [0, 1, 2, 3], "micro_batch": [1, 2, 4, 8],
            "recompute": list(range(len(RECOMPUTE))),  # as its index, the way Layout.columns has it
            "etp": [0, 1] if cfg.n_experts else [0]}


def candidate_grid(workload: Workload, max_gpus: int, gpus_per_node: int = 8,
                   fixed_gpus: bool = False, axes: dict | None = None
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Every combination of a GPU count (whole nodes up to `max_gpus`, or only `max_gpus`) and
    `search_axes` (or `axes`, a narrower space) whose tp x cp x pp divides the count, as flat
    arrays named as Layout names its fields, with their dp; and the number of all combinations."""
    counts = [max_gpus]
    if not fixed_gpus and max_gpus >= gpus_per_node:
        counts = sorted(set(range(gpus_per_node, max_gpus + 1, gpus_per_node)) | {max_gpus})
    axes = {"n_gpus": counts, **search_axes(workload, max_gpus), **(axes or {})}

    def mesh(keys):
        grids = np.meshgrid(*[np.asarray(axes[k], dtype=np.int64) for k in keys], indexing="ij")
        return {k: m.ravel() for k, m in zip(keys, grids)}

    # the GPU split first (a few thousand rows), then the rest of the axes on the whole splits
    outer = mesh(("n_gpus", "tp", "cp", "pp"))
    inner = mesh(("ep", "zero", "micro_batch", "recompute", "etp"))
    whole = outer["n_gpus"] % (outer["tp"] * outer["cp"] * outer["pp"]) == 0
    outer = {k: v[whole] for k, v in outer.items()}
    size = inner["ep"].size
    grid = {**{k: np.repeat(v, size) for k, v in outer.items()},
            **{k: np.tile(v, whole.sum()) for k, v in inner.items()}}
    keep = ~((grid["etp"] == 1) & (grid["tp"] == 1))  # etp 1 with tp 1 is etp = tp again
    grid = {k: v[keep] for k, v in grid.items()}
    grid["dp"] = grid["n_gpus"] // (grid["tp"] * grid["cp"] * grid["pp"])
    return grid, int(np.prod([len(v) for v in axes.values()]))


_KEEP = ("step_time", "memory", "n_gpus", "fits", "cost_per_mtok", "tokens_per_s", "mfu")
_CHUNK = 1 << 15


def search_layouts(workload: Workload, device: Device, max_gpus: int,
                   options: Options = Options(), fixed_gpus: bool = False,
                   top: int = 10, axes: dict | None = None, keep=None) -> SearchResult:
    """The fastest and cheapest candidate layouts; `axes` narrows the space (candidate_grid),
    `keep(grid) -> bool array` drops candidates a caller's own rules refuse."""
    assert isinstance(max_gpus, int) and max_gpus > 0, max_gpus  # checked at the door
    check_options(options, device)
    t0 = time.perf_counter()
    st = WorkloadStats(workload, options)
    g, n_candidates = candidate_grid(workload, max_gpus, device.gpus_per_node, fixed_gpus, axes)
    g["etp"] = np.where(g["etp"] == 0, g["tp"], g["etp"])
    failures = rule_failures(workload, SimpleNamespace(**g, pp_first=0, pp_last=0))
    valid = ~np.logical_or.reduce(list(failures.values()))
    if keep is not None:
        valid &= keep(g)
    n_valid = int(valid.sum())
    g = {k: v[valid] for k, v in g.items()}
    # priced in chunks of 2^15 layouts: numpy's temporaries then stay in cache, 3-5x faster
    # than one pass over them all
    parts = [price(st, device, options, SimpleNamespace(
        **{k: v[lo:lo + _CHUNK] for k, v in g.items()}, pp_first=0, pp_last=0))
        for lo in range(0, n_valid, _CHUNK)]
    values = {k: np.concatenate([np.broadcast_to(p[k], p["n_gpus"].shape) for p in parts])
              if parts else np.empty(0) for k in _KEEP}
    idx = np.flatnonzero(values["fits"] > 0)

    def layout_at(i) -> Layout:
        fields = {k: int(g[k][i]) for k in g if k != "n_gpus"}
        return Layout(**fields | {"recompute": RECOMPUTE[fields["recompute"]]})

    fastest = cheapest = None
    table = []
    if idx.size:
        # ties (same time) go to fewer GPUs, then less memory
        by_time = idx[np.lexsort((values["memory"][idx], values["n_gpus"][idx],
                                  values["step_time"][idx]))]
        by_cost = idx[np.lexsort((values["step_time"][idx], values["cost_per_mtok"][idx]))]
        fastest, cheapest = (simulate(workload, layout_at(i[0]), device, options)
                             for i in (by_time, by_cost))
        table = [{"layout": layout_at(i).label(), "gpus": int(values["n_gpus"][i]),
                  **{k: float(values[k][i]) for k in ("step_time", "tokens_per_s", "mfu", "cost_per_mtok")},
                  "memory_GB": float(values["memory"][i]) / 1e9} for i in by_time[:top]]
    why = "" if idx.size else _why_none(workload, device, options, max_gpus, failures,
                                         values["memory"])
    return SearchResult(n_candidates, n_valid, int(idx.size), time.perf_counter() - t0,
                        options.attention, fastest, cheapest, table, why, dataclasses.asdict(options))


def _why_none(workload, device, options, max_gpus, failures, memory) -> str:
    """Why no candidate is feasible: memory (`memory` of the valid layouts), or the rules."""
    if memory.size:
        return (f"memory: {memory.size:,} layouts divide evenly, but the smallest needs "
                f"{memory.min() / 1e9:.1f} GB per GPU and one {device.name} has "
                f"{options.memory_usable * device.hbm_bytes / 1e9:.1f} GB usable "
                f"(memory_usable={options.memory_usable}); use more GPUs or a larger device")
    n = next(iter(failures.values())).size
    if not n:
        return f"gpus={max_gpus}: no tp x cp x pp of the search divides it"
    # the rules that reject every candidate on their own, else the one that rejects the most
    blocking = [k for k, f in failures.items() if f.all()]
    names = blocking or [max(failures, key=lambda k: int(failures[k].sum()))]
    return "; ".join(f"{k}: {rule_text(k, workload)} (rejects {int(failures[k].sum()):,} of "
                     f"{n:,} layouts)" for k in names)


def plan_frame(search: SearchResult, tokens: float | None = None):
    """The fastest and cheapest layouts side by side (units in the index)."""
    columns = {}
    for name, r in (("fastest", search.fastest), ("cheapest", search.cheapest)):
        if r is not None:
            columns[name] = {
                "layout": r.layout.label(), "GPUs": r.n_gpus, "device": r.device,
                "step time (s)": r.time["step_time"],
                **{f"  {k} (s)": v for k, v in r.time.items() if k != "step_time"},
                **{f"memory {'total' if k == 'memory' else k} (GB)": v / 1e9 for k, v in r.memory.items()},
                "tokens/s": r.tokens_per_s,
                "tokens/s, uncertain inputs' range": f"{r.interval[0]:,.0f}-{r.interval[1]:,.0f}",
                "tokens/day (B)": r.tokens_per_day / 1e9, "MFU": r.mfu,
                **({f"run: {k}": v for k, v in r.run(tokens).items()} if tokens else {})}
    return pd.DataFrame(columns)


def plan(cfg: ModelConfig, device: Device, gpus: int, batch_tokens: int,
         seq_len: int | None = None, options: Options = Options(),
         fixed_gpus: bool = False) -> SearchResult:
    return search_layouts(Workload.from_tokens(cfg, batch_tokens, seq_len), device, gpus,
                          options, fixed_gpus)


def plan_report(search: SearchResult, name: str, tokens: float | None = None,
                as_json: bool = False) -> str:
    if as_json:
        return json.dumps({"model": name, **{k: getattr(search, k) for k in (
            "n_candidates", "n_valid", "n_feasible", "seconds")}, "top": search.table, **{
            k: None if r is None else {**r.to_dict(), "run": r.run(tokens) if tokens else None}
            for k, r in (("fastest", search.fastest), ("cheapest", search.cheapest))},
            "why_none": search.why_none or None, "options": search.options}, indent=2)
    head = (f"{name}: {search.n_candidates:,} candidate layouts, {search.n_valid:,} valid, "
            f"{search.n_feasible:,} fit in memory; searched in {search.seconds:.2f} s\n"
            f"MFU = model FLOPs (attention core counted {search.attention}) / peak; time uses "
            f"the causal count, the work a flash kernel does")
    if search.fastest is None:
        return head + f"\nno layout can run. {search.why_none}"
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        best = plan_frame(search, tokens).map(fmt_value).to_string()
        top = pd.DataFrame(search.table).set_index("layout").map(fmt_value).to_string()
    time = search.fastest.time  # the three largest parts: which terms the answer hangs on
    parts = sorted(((v, k) for k, v in time.items() if k != "step_time"), reverse=True)[:3]
    shares = ", ".join(f"{k.replace('_', ' ')} {v / time['step_time']:.0%}" for v, k in parts if v > 0)
    return "\n".join([head, "", best, "", f"where the fastest layout's step goes: {shares}", "",
                      "fastest feasible layouts:", top])
