"""bench sim: the vectorised layout search against a plain loop over the same layouts."""

from __future__ import annotations

import itertools

from minimoe.bench import timeit
from minimoe.config import get_preset
from minimoe.flops import RECOMPUTE
from minimoe.sim.cost import Workload, simulate
from minimoe.sim.hardware import get_device
from minimoe.sim.layout import Layout, check_layout
from minimoe.sim.search import search_axes, search_layouts


def iter_layouts(workload: Workload, n_gpus: int):
    """The plain loop over the valid layouts on exactly n_gpus: what the vectorised search must
    agree with (tests/test_sim.py) and is measured against (`minimoe bench sim`)."""
    axes = search_axes(workload, n_gpus)
    for tp, cp, pp, ep, zero, mb, rc, etp in itertools.product(*axes.values()):
        if n_gpus % (tp * cp * pp) or (etp == 1 and tp == 1):
            continue
        layout = Layout(tp, pp, n_gpus // (tp * cp * pp), ep, zero, mb, RECOMPUTE[rc], etp, cp)
        try:
            check_layout(layout, workload, n_gpus)
        except ValueError:
            continue
        yield layout


def bench_sim(args):
    """Candidate layouts priced per second by search_layouts, vs simulate() in a loop."""
    workload = Workload.from_tokens(get_preset("aquilamoe-8x16b"), 24 * 2**20)
    device = get_device("h100")
    search = search_layouts(workload, device, 1024)
    seconds = timeit(lambda: search_layouts(workload, device, 1024), warmup=1,
                     repeats=2 if args.quick else 5)
    loop_layouts = list(itertools.islice(iter_layouts(workload, 1024), 100 if args.quick else 400))
    loop_seconds = timeit(lambda: [simulate(workload, lay, device) for lay in loop_layouts],
                          warmup=0, repeats=1 if args.quick else 3)
    vector_rate = search.n_candidates / seconds
    loop_rate = len(loop_layouts) / loop_seconds
    print(f"bench sim: aquilamoe-8x16b on up to 1024 H100, 24M-token batch: "
          f"{search.n_candidates:,} candidate layouts ({search.n_valid:,} valid, "
          f"{search.n_feasible:,} fit)")
    print(f"  vectorised search  {seconds:8.3f} s   {vector_rate:12,.0f} candidates/s "
          f"(goal: >= 100,000 candidates in 1 s)")
    print(f"  simulate() loop    {loop_seconds / len(loop_layouts) * 1e3:8.3f} ms/layout "
          f"{loop_rate:10,.0f} layouts/s over {len(loop_layouts)} layouts")
    print(f"  ratio vectorised / loop = {vector_rate / loop_rate:,.0f}x")
    return {"seconds": seconds, "candidates": search.n_candidates,
            "candidates_per_s": vector_rate, "loop_layouts_per_s": loop_rate}
