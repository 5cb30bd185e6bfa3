"""The rule that judges a claim over seeds, and where Table 6's savings factors come from."""

import math

import pytest

from minimoe.recipes.findings import decided_after, judge, spread, t975, trajectory
from minimoe.sim.savings import decompose
from minimoe.sim.scenario_file import load_scenario


def test_a_claim_holds_fails_or_is_within_noise_by_the_paired_interval():
    # a consistent paired difference holds even when the seeds spread far more than it
    held = judge("a < b", [5.0, 6.0, 7.0], [5.1, 6.1, 7.12])
    assert held["verdict"] == "holds" and held["difference"]["mean"] == pytest.approx(-0.32 / 3)
    assert judge("a > b", [5.0, 6.0, 7.0], [5.1, 6.1, 7.12], ">")["verdict"] == "does not hold"
    noisy = judge("a < b", [5.0, 5.2, 5.0], [5.1, 5.0, 5.1])
    assert noisy["verdict"] == "within noise"
    lo, hi = noisy["interval"]
    d = spread([-0.1, 0.2, -0.1])
    assert (hi - lo) / 2 == pytest.approx(4.303 * d["sd"] / math.sqrt(3))  # t(2) at 97.5%
    assert judge("a < b", [1.0], [2.0])["verdict"] == "within noise"  # one seed decides nothing
    assert t975(1) == 12.706 and t975(12) == 2.228 and t975(100) == 1.96


def test_a_dynamic_claim_says_from_when_it_holds():
    curves = [{"a": [{"tokens": t, "val_loss": 6 - t / 100 - s} for t in (0, 100, 200, 400)],
               "b": [{"tokens": t, "val_loss": 6 - t / 200 - s + 0.01 * (s - 1)} for t in (0, 100, 200, 400)]}
              for s in (0, 1, 2)]
    points = trajectory(curves, "a", "b")
    assert [p["verdict"] for p in points][1:] == ["holds"] * 3
    assert decided_after(points) == "holds from 100 tokens on, to the end"


def test_a_flat_trend_is_not_extrapolated_to_an_absurd_budget():
    def points(diffs):  # seeds' differences at 100..800 tokens: noisy, the mean hardly moving
        return [{"tokens": 100 * 2 ** i, "verdict": "within noise", "interval": [d - 0.05, d + 0.04],
                 "difference": {"mean": d}} for i, d in enumerate(diffs)]
    flat = decided_after(points([-0.030, -0.031, -0.0312, -0.0313]))
    assert "no budget up to 1,024x this one decides it" in flat and "extrapolation" not in flat
    falling = decided_after(points([-0.01, -0.02, -0.03, -0.04]))
    assert "it would hold after about" in falling  # 0.01 per doubling: one more doubling or so


def test_table_6_decomposes_into_flops_chips_and_efficiency():
    result = load_scenario("sims/aquilamoe_table6.toml")
    parts = result.to_dict()["decomposition"]
    assert parts["tsf"] == pytest.approx(result.tsf) and parts["cpsf"] == pytest.approx(result.cpsf)
    for factor in ("tsf", "cpsf"):  # Shapley shares multiply back to the factor
        assert math.prod(parts["shares"][factor].values()) == pytest.approx(parts[factor])
    # capacity = peak x time, so a faster cluster saves time but no capacity
    assert parts["shares"]["cpsf"]["chips (cluster peak)"] == pytest.approx(1.0)
    assert parts["shares"]["tsf"]["chips (cluster peak)"] > 1.2
    assert sum(r["time saved share"] for r in parts["phases"]) == pytest.approx(1.0)
    assert parts["phases"][0]["speed-up"] == pytest.approx(279 / 25)
    assert "Where the factors come from" in result.text()


def test_only_flops_per_token_differ_so_only_they_save():
    phases = [{"name": n, "tokens": t, "tokens_per_s": 100.0 * 8 / f, "flops_per_token": f, "peak": 1.0}
              for n, t, f in (("small", 300, 2.0), ("large", 100, 8.0))]
    base = {"tokens": 400, "tokens_per_s": 100.0, "flops_per_token": 8.0, "peak": 1.0}
    parts = decompose(phases, base)
    assert parts["tsf"] == pytest.approx(400 / (300 / 4 + 100)) == parts["cpsf"]
    assert parts["shares"]["tsf"]["FLOPs per token"] == pytest.approx(parts["tsf"])
    assert parts["shares"]["tsf"]["efficiency (MFU)"] == pytest.approx(1.0)
