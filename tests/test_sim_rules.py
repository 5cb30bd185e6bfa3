"""Which layouts can run: one table of rules (minimoe.sim.layout.LAYOUT_RULES), read the same way
by the vectorised search and by the one-layout check, and the reason `minimoe plan` gives when
nothing can run."""

import itertools

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.config import PRESETS
from types import SimpleNamespace

from minimoe.bench.sim import iter_layouts
from minimoe.sim.layout import LAYOUT_RULES, Layout, Workload, check_layout, rule_failures
from minimoe.sim.hardware import get_device
from minimoe.sim.search import candidate_grid, search_axes, search_layouts

MOE = Workload.from_tokens(PRESETS["aquila-8x1.8b"], 48 * 2048)


def test_array_and_scalar_verdicts_agree_layout_by_layout():
    fields = list(itertools.product((1, 2, 3, 4, 8), (1, 2, 5, 6), (1, 2, 3, 8), (1, 2, 4, 8),
                                    (0, 3, 4), (1, 2, 4)))
    tp, pp, dp, ep, zero, mb = (np.array(col) for col in zip(*fields))
    columns = SimpleNamespace(tp=tp, pp=pp, dp=dp, ep=ep, zero=zero, micro_batch=mb,
                              recompute=np.zeros_like(tp), etp=tp, cp=np.ones_like(tp),
                              pp_first=0, pp_last=0)
    verdict = ~np.logical_or.reduce(list(rule_failures(MOE, columns).values()))
    for i, (t, p, d, e, z, m) in enumerate(fields):
        try:
            check_layout(Layout(t, p, d, e, z, m), MOE)
            ok = True
        except ValueError:
            ok = False
        assert ok == bool(verdict[i]), fields[i]
    assert verdict.any() and not verdict.all()  # both kinds are in the sample


@pytest.mark.parametrize("field, layout, words", [
    ("tp", Layout(tp=3, dp=1), "must divide n_heads=32"),
    ("pp", Layout(pp=5), "must split n_layers=24"),
    ("ep", Layout(dp=2, ep=4), "with etp = tp: ep must divide cp x dp=2"),
    ("cp", Layout(dp=1, cp=3), "2 x cp must divide seq_len=2048"),
    ("pp", Layout(pp=4, pp_first=7, pp_last=6), "must split n_layers=24"),
    ("ep", Layout(dp=8, ep=3), "must divide n_experts=8"),
    ("ep", Layout(tp=2, dp=2, ep=8, etp=1), "ep x etp must divide tp x cp x dp"),
    ("zero", Layout(zero=4), "must be 0, 1, 2 or 3"),
    ("recompute", Layout(recompute="some"), "must be one of none, selective, full"),
    ("micro_batch", Layout(dp=5), "divide the global batch of 48 sequences"),
])
def test_each_rule_names_its_field_value_and_rule(field, layout, words):
    assert field in {name for name, _, _ in LAYOUT_RULES}
    with pytest.raises(ValueError, match=f"layout.{field}=") as err:
        check_layout(layout, MOE)
    assert words in str(err.value)


def test_an_expert_tensor_parallel_degree_below_zero_is_refused():
    with pytest.raises(ValueError, match=r"layout.etp=-1: must be a non-negative integer"):
        check_layout(Layout(tp=2, dp=4, etp=-1), MOE)


def test_the_search_space_is_defined_once():
    axes = search_axes(MOE, 64)
    grid, n_candidates = candidate_grid(MOE, 64, fixed_gpus=True)
    assert n_candidates == np.prod([len(v) for v in axes.values()]) > grid["tp"].size
    assert axes["cp"] == [1]  # sequences of 2,048: no context parallel
    assert {int(v) for v in grid["ep"]} == set(axes["ep"]) == {1, 2, 4, 8}
    looped = list(iter_layouts(MOE, 64))
    assert {lay.micro_batch for lay in looped} <= set(axes["micro_batch"])
    assert {lay.etp for lay in looped} == {0, 1}  # Megatron's default and MoE Parallel Folding
    assert not any(lay.etp == 1 and lay.tp == 1 for lay in looped)  # no layout counted twice


def test_no_valid_layout_names_the_batch_rule(capsys):
    work = Workload.from_tokens(PRESETS["aquila-1.8b"], 1 * 2048)
    search = search_layouts(work, get_device("h100"), 7, fixed_gpus=True)
    assert search.fastest is None and search.n_valid == 0
    assert "micro_batch: dp x micro_batch must divide the global batch of 1 sequences" \
        in search.why_none
    assert main(["plan", "--preset", "aquila-1.8b", "--gpus", "7", "--fixed-gpus",
                 "--batch-tokens", "2048"]) == 0
    assert "global batch of 1 sequences" in capsys.readouterr().out


def test_no_layout_fitting_names_the_memory():
    search = search_layouts(Workload.from_tokens(PRESETS["aquila-16b"], 8 * 4096),
                            get_device("a100"), 1)
    assert search.n_valid > 0 and search.n_feasible == 0
    assert search.why_none.startswith("memory:") and "72.0 GB usable" in search.why_none
