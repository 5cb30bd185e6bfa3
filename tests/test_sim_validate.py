"""`minimoe validate`: the simulator against published runs (sims/validation/), and Table 6 with
every throughput predicted (sims/aquilamoe_predicted.toml). The errors are the benchmark's to
report (README, `minimoe validate --cv`); these tests check the machinery: conversions, what is
fitted on what, leaving a source out, intervals and their coverage, ranks, the AquilaMoE table,
the files, the command, and that the simulator loads without torch."""

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimoe.cli import main
from minimoe.sim.report import aquilamoe_table
from minimoe.sim.options import Options
from minimoe.sim.scenario_file import load_scenario
from minimoe.sim.validate import EFFICIENCY_GRID, SIGMA_GRID, load_runs, validate

SIMS = Path(__file__).resolve().parent.parent / "sims"


@pytest.fixture(scope="module")
def result():
    return validate(SIMS / "validation", cv=True)


def test_measured_figures_are_converted_with_the_sources_formula():
    runs = {r.name: r for r in load_runs(SIMS / "validation")}
    a1 = runs["A1 GPT 1.7B"]  # 137 TFLOP/s per GPU on 32 A100s, Narayanan 2021 eq. 3
    L, h, s, V = 24, 2304, 2048, 51200
    per_token = 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert a1.measured_tokens_per_s == pytest.approx(137e12 * 32 / per_token)
    moe = runs["scale-out 8x16B"]  # Table 6: 25B tokens per day on the whole cluster
    assert moe.measured_tokens_per_s == pytest.approx(25e9 / 86400)


def test_the_options_defaults_are_the_fitted_constants(result):
    c = result.calibration.constants()
    for name in ("gemm_efficiency", "straggler_sigma"):
        central, low, high = c[name]
        assert getattr(Options(), name) == central, f"refit: options.py has {name} stale"
        assert Options().uncertain[name] == [low, high]


def test_each_source_is_fitted_alone_and_left_out_of_its_own_prediction(result):
    cal = result.calibration
    published = {r["source"] for r in result.rows if r["set"] == "published"}
    assert set(cal.errors) == published and len(published) == 3  # AquilaMoE is never fitted
    for source in published:
        left = cal.constants(leave_out=source)
        sigma = left["straggler_sigma"][0]
        others = [s for s in published if s != source]
        central, low, high = left["gemm_efficiency"]
        assert central == statistics.median(cal.efficiency(s, sigma) for s in others)
        # the range holds about 80% of the other sources' runs' own efficiencies, sources equal
        j = int(np.argmin(abs(SIGMA_GRID - sigma)))
        inside = [np.mean((low <= e) & (e <= high)) for e in
                  (EFFICIENCY_GRID[np.argmin(abs(cal.errors[s][:, :, j]), axis=1)] for s in others)]
        assert 0.6 <= np.mean(inside) <= 0.95 and low < central < high
    for row in result.cv_rows:
        assert row["gemm_efficiency"] == cal.constants(leave_out=row["source"])["gemm_efficiency"][0]


def test_intervals_hold_the_prediction_and_coverage_counts_them(result):
    for rows, summary in ((result.rows, result.summary), (result.cv_rows, result.cv_summary)):
        for r in rows:
            assert r["low"] <= r["predicted tok/s/GPU"] * (1 + 1e-12) and \
                r["predicted tok/s/GPU"] <= r["high"] * (1 + 1e-12), r["run"]
            assert r["inside"] == (r["low"] <= r["measured tok/s/GPU"] <= r["high"])
        for (group, kind), s in summary.items():
            chosen = [r for r in rows if (r["set"], r["kind"]) == (group, kind)]
            assert s["n"] == len(chosen)
            assert s["max_abs_error"] == max(abs(r["error"]) for r in chosen)
            assert s["coverage"] == sum(r["inside"] for r in chosen) / len(chosen)


def test_ranks_are_taken_within_one_model_on_one_cluster(result):
    assert set(result.ranks) == set(result.cv_ranks)
    for group, (n, rho) in result.ranks.items():
        rows = [r for r in result.rows if r["group"] == group]
        assert n == len(rows) == 2  # each folding pair
        measured = rows[0]["measured tok/s/GPU"] < rows[1]["measured tok/s/GPU"]
        predicted = rows[0]["predicted tok/s/GPU"] < rows[1]["predicted tok/s/GPU"]
        assert rho == pytest.approx(1.0 if measured == predicted else -1.0)


def test_speed_ups_and_the_aquilamoe_table_carry_intervals(result):
    assert len(result.variants) == 3
    for v in result.variants:
        assert v["low"] <= v["predicted"] <= v["high"]
    rows = aquilamoe_table(result.predicted)
    assert len(rows) == 6  # three routings x two layouts
    for row in rows:
        for key in ("tokens/day (B)", "slowdown 16B -> 8x16B", "TSF", "CPSF"):
            central, low, high = row[key]
            assert low <= central <= high
    slow = {(r["routing"].split()[0], r["layout"]): r["slowdown 16B -> 8x16B"][0] for r in rows}
    flagscale = "BAAI's FlagScale recipe"
    # more imbalance can only slow the MoE down; the search does at least as well as the recipe
    assert slow[("balanced", flagscale)] < slow[("1.25", flagscale)] < slow[("measured", flagscale)]
    assert slow[("measured", "fastest found")] <= slow[("measured", flagscale)]


def test_validate_command_prints_and_plots(tmp_path, capsys):
    assert main(["validate", str(SIMS / "validation"), "--cv", "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "leave one source out" in out and "AquilaMoE under the range of its unknowns" in out
    assert "rank correlation" in out and "the simulator takes gemm_efficiency" in out
    assert (tmp_path / "validation.png").stat().st_size > 0
    assert (tmp_path / "aquilamoe_breakdown.png").stat().st_size > 0


def test_a_bad_validation_file_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('kind = "dense"\n[[runs]]\nname = "x"\ncolour = 1\n')
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs[0].colour: unknown key" in err[0]


def test_table6_predicted_beside_transcribed():
    result = load_scenario(SIMS / "aquilamoe_predicted.toml")
    tsf, cpsf = result.measured_factors
    assert round(tsf, 2) == 4.12 and round(cpsf, 2) == 3.35  # the paper's, from its figures
    for p in result.phases + [result.baseline]:
        assert p.throughput.startswith("simulated")
        assert p.row()["prediction error"] == pytest.approx(p.tokens_per_day / p.measured_tokens_per_day - 1)
        assert min(p.corners) <= p.tokens_per_day <= max(p.corners)
    assert result.tsf != tsf  # the predicted factors come from the predicted throughputs
    (tsf_low, tsf_high), (cpsf_low, cpsf_high) = result.factor_ranges
    assert tsf_low <= result.tsf <= tsf_high and cpsf_low <= result.cpsf <= cpsf_high


def test_the_simulator_imports_neither_torch_nor_fvcore():
    code = ("import sys; import minimoe.sim.validate, minimoe.sim.scenario_file, "
            "minimoe.sim.report, minimoe.sim.plots; "
            "print(sorted(m for m in ('torch', 'fvcore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
