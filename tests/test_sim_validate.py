"""`minimoe validate`: the simulator against published runs (sims/validation/), and Table 6 with
every throughput predicted (sims/aquilamoe_predicted.toml). The error bounds are the
benchmark's to report (README); these tests check the machinery: conversions, what is fitted
and what is not, the summary, and the files."""

import math
from pathlib import Path

import pytest

from minimoe.cli import main
from minimoe.sim.scenario_file import load_scenario
from minimoe.sim.validate import EFFICIENCY_GRID, load_runs, validate

SIMS = Path(__file__).resolve().parent.parent / "sims"


@pytest.fixture(scope="module")
def result():
    return validate(SIMS / "validation")


def test_measured_figures_are_converted_with_the_sources_formula():
    runs = {r.name: r for r in load_runs(SIMS / "validation")}
    a1 = runs["A1 GPT 1.7B"]  # 137 TFLOP/s per GPU on 32 A100s, Narayanan 2021 eq. 3
    L, h, s, V = 24, 2304, 2048, 51200
    per_token = 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    assert a1.measured_tokens_per_s == pytest.approx(137e12 * 32 / per_token)
    moe = runs["scale-out 8x16B"]  # Table 6: 25B tokens per day on the whole cluster
    assert moe.measured_tokens_per_s == pytest.approx(25e9 / 86400)


def test_only_published_dense_runs_are_fitted(result):
    assert set(result.fitted) == {"ampere", "hopper"}  # the unnamed chip has no dense run
    assert all(v in EFFICIENCY_GRID for v in result.fitted.values())
    for row in result.rows:
        fitted = row["kind"] == "dense" and row["set"] == "published"
        assert (row["fitted on"] == "yes") == fitted, row["run"]
        assert math.isfinite(row["error"]) and row["predicted tok/s/GPU"] > 0


def test_summary_and_slowdown_follow_the_rows(result):
    for (group, kind), s in result.summary.items():
        errors = [abs(r["error"]) for r in result.rows if (r["set"], r["kind"]) == (group, kind)]
        assert s["n"] == len(errors) and s["max_abs_error"] == max(errors)
    rows = {r["run"]: r for r in result.rows}
    d, m = rows[result.slowdown["dense"]], rows[result.slowdown["moe"]]
    assert result.slowdown["measured"] == pytest.approx(70 / 25)
    assert result.slowdown["predicted"] == pytest.approx(
        d["predicted tok/s/GPU"] / m["predicted tok/s/GPU"])
    # the breakdown's parts add up to each AquilaMoE phase's step
    for parts in result.breakdown.values():
        assert sum(v for k, v in parts.items() if k != "tokens_per_step") > 0
    # more imbalance can only slow the MoE phase down; the measured routing is not balanced
    slow = {r["change"]: r["slowdown"] for r in result.sensitivity}
    assert slow["routing balanced (imbalance 1.0)"] < slow["imbalance 1.25"] < slow["imbalance 2.0"]
    assert slow["routing balanced (imbalance 1.0)"] < result.slowdown["predicted"]
    # with the layout free, the search can only do as well or better than the fixed layout
    assert slow["the fastest layout found instead"] <= result.slowdown["predicted"] * (1 + 1e-9)


def test_validate_command_prints_and_plots(tmp_path, capsys):
    assert main(["validate", str(SIMS / "validation"), "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AquilaMoE scale-up 16B -> scale-out 8x16B" in out and "median |error|" in out
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
    assert result.tsf != tsf  # the predicted factors come from the predicted throughputs
