"""The cost model (cost.py), the layout search (search.py), the scenario planner (scenario.py and
scenario_file.py), the hardware catalogue and their command lines."""

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest

from minimoe.cli import main
from minimoe.config import PRESETS
from minimoe.flops import flops_per_token
from minimoe.sim.hardware import CATALOGUE, get_device
from minimoe.bench.sim import iter_layouts
from minimoe.sim.search import search_layouts
from minimoe.sim.scenario import sweep
from minimoe.sim.scenario_file import load_scenario, parse_scenario
from minimoe.sim.cost import PF_DAY, Layout, Options, Workload, WorkloadStats, price, simulate

SIMS = Path(__file__).resolve().parent.parent / "sims"
H100 = get_device("h100")
TABLE6 = SIMS / "aquilamoe_table6.toml"


# --- Table 6 ----------------------------------------------------------------------------------
def test_table6_savings_factors_from_the_file():
    result = load_scenario(TABLE6)
    assert round(result.tsf, 2) == 4.12
    assert round(result.cpsf, 2) == 3.35
    assert result.baseline.tokens == 5345e9  # the sum of the phases, not written in the file
    assert "tokens_b" not in TABLE6.read_text().split("[baseline]")[1]
    prep = result.phases[0]
    assert prep.days == pytest.approx(3600 / 279)
    assert prep.capacity_tflops_days == pytest.approx(480 * 989.5 * 3600 / 279)
    assert any("474,960" in n and "475,360" in n for n in result.notes)  # the paper's slip
    assert not any("245,760, but" in n for n in result.notes)  # 1024 x 240 is printed right


def test_table6_implied_mfu_uses_6nd_for_size_only_models():
    result = load_scenario(TABLE6)
    scale_out = result.phases[2]
    assert scale_out.flops_per_token == 6 * 32e9
    expected = 6 * 32e9 * 25e9 / (1024 * 240e12 * 86400)  # 6ND at 30-32B active: about 21-23%
    assert scale_out.implied_mfu == pytest.approx(expected)
    assert scale_out.cost_usd is None  # no catalogue device, so no price


def test_sweep_at_the_implied_mfu_reproduces_table6():
    result = load_scenario(TABLE6)
    mfu = result.baseline.implied_mfu
    rows = sweep(result, "scale-up", [1200e9, 2400e9], [mfu], ["scale-out", "baseline"])
    assert rows[0]["tsf"] == pytest.approx(result.tsf, rel=1e-12)
    assert rows[0]["cpsf"] == pytest.approx(result.cpsf, rel=1e-12)
    assert rows[1]["tsf"] < rows[0]["tsf"]  # more scale-up tokens: a smaller saving
    assert rows[1]["baseline days"] > rows[0]["baseline days"]  # the baseline grows with the sum


def test_sensitivity_file_sweeps_and_plots(tmp_path):
    result = load_scenario(SIMS / "sensitivity.toml")
    assert len(result.sweep) == 8 * 4
    low = [r for r in result.sweep if r["mfu"] == 0.15]
    high = [r for r in result.sweep if r["mfu"] == 0.4]
    assert all(a["tsf"] > b["tsf"] for a, b in zip(low, high))  # faster MoE, smaller saving
    paths = result.plot(tmp_path)
    assert [p.name for p in paths] == ["phases.png", "sweep.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


# --- memory -----------------------------------------------------------------------------------
@pytest.mark.parametrize("zero, per_param", [(0, lambda n: 18), (1, lambda n: 6 + 12 / n),
                                             (2, lambda n: 2 + 16 / n), (3, lambda n: 18 / n)])
def test_zero_stages_bytes_per_param(zero, per_param):
    # ZeRO paper / Megatron: 2 (bf16 w) + 4 (fp32 grad) + 12 (fp32 master, m, v) = 18 B/param
    cfg = PRESETS["aquila-7b"]
    work = Workload.from_tokens(cfg, 64 * 4096)
    r = simulate(work, Layout(dp=8, zero=zero), H100)
    states = r.memory["weights"] + r.memory["grads"] + r.memory["optimizer"]
    assert states == pytest.approx(per_param(8) * cfg.param_counts()["total"])


def test_zero_paper_16_bytes_with_bf16_grads():
    cfg = PRESETS["aquila-7b"]
    r = simulate(Workload.from_tokens(cfg, 64 * 4096), Layout(dp=8, zero=1), H100,
                 Options(grad_bytes=2))
    states = r.memory["weights"] + r.memory["grads"] + r.memory["optimizer"]
    assert states == pytest.approx((4 + 12 / 8) * cfg.param_counts()["total"])  # 4Ψ + 12Ψ/N


def test_experts_are_split_over_ep_and_sharded_over_expert_dp():
    cfg = PRESETS["aquilamoe-8x16b"]
    work = Workload.from_tokens(cfg, 64 * 4096)
    counts = cfg.param_counts()
    r = simulate(work, Layout(dp=64, ep=8, zero=0), H100)
    dense = counts["total"] - counts["experts"]
    assert r.memory["weights"] == pytest.approx(2 * (dense + counts["experts"] / 8))
    r1 = simulate(work, Layout(dp=64, ep=8, zero=1), H100)
    # optimizer states: dense ones over 64 ranks, expert ones over the 64 / 8 = 8 expert-DP ranks
    assert r1.memory["optimizer"] == pytest.approx(12 * (dense / 64 + counts["experts"] / 8 / 8))


def test_activation_recompute_levels():
    cfg = PRESETS["aquila-16b"]
    work = Workload.from_tokens(cfg, 64 * 4096)
    act = {rc: simulate(work, Layout(tp=8, dp=8, recompute=rc), H100,
                        Options(flash_attention=False)).memory["activations"]
           for rc in ("none", "selective", "full")}
    assert act["none"] > act["selective"] > act["full"]
    # selective drops the softmax probabilities (b·a·s per token) and the fp32 log-sum-exp (4a)
    tokens, a, s, L = 4096, cfg.n_heads, 4096, cfg.n_layers
    assert act["none"] - act["selective"] == pytest.approx(L * tokens * (2 * a * s + 4 * a) / 8)
    # Korthikanti's full recompute keeps the layer input 2·s·b·h per layer (+ one layer rebuilt)
    flash = simulate(work, Layout(tp=8, dp=8, recompute="full"), H100).memory["activations"]
    logits = 4 * tokens * cfg.vocab_size / 8
    assert flash > L * 2 * tokens * cfg.d_model / 8 + logits


def test_out_of_memory_verdict():
    cfg = PRESETS["aquila-16b"]
    work = Workload.from_tokens(cfg, 64 * 4096)
    a100 = get_device("a100")
    assert not simulate(work, Layout(dp=8, zero=0), a100).fits  # 18 B x 16.7B params >> 80 GB
    assert simulate(work, Layout(tp=8, pp=4, dp=2, zero=1, recompute="full"), a100).fits
    search = search_layouts(Workload.from_tokens(cfg, 8 * 4096), a100, 1)
    assert search.fastest is None and search.n_feasible == 0


# --- time -------------------------------------------------------------------------------------
def test_pipeline_bubble_is_p_minus_1_over_m():
    cfg = PRESETS["aquila-16b"]
    work = Workload.from_tokens(cfg, 256 * 4096)
    r = simulate(work, Layout(pp=8, dp=8, micro_batch=1), H100)
    n_micro = 256 / 8
    # the stages are equal but the last (the LM head): the fill and drain are the 7 others,
    # each shorter than the slowest, whose m micro-batches make the rest of the step
    busy = (r.time["step_time"] - r.time["bubble"] - r.time["dp_comm"]
            - r.time["optimizer_step"] - r.time["stragglers"])
    assert 0.5 * 7 / n_micro < r.time["bubble"] / busy < 7 / n_micro
    assert r.time["pp_comm"] > 0


def test_all_to_all_volume_follows_costsim_section_4():
    cfg = PRESETS["aquilamoe-8x16b"]
    work = Workload.from_tokens(cfg, 64 * 4096)
    opts = Options(latency_intra_us=0, latency_inter_us=0)
    r = simulate(work, Layout(tp=2, dp=32, ep=4), H100, opts)
    tokens, h, k, ep, tp = 4096, cfg.d_model, cfg.top_k, 4, 2
    n_micro = 64 / 32
    # dispatch + combine forward, mirrored backward: 4 all-to-alls of T·k·h·2 B·(e-1)/e per
    # layer over NVLink (tp x ep = 8 GPUs: one node), each with NCCL's base latency
    volume = 4 * (tokens / tp) * k * h * 2 * (ep - 1) / ep
    bandwidth = H100.intra_node_bw * H100.intra_node_eff
    per_layer = volume / bandwidth + 4 * 8.4e-6
    assert r.time["ep_comm"] == pytest.approx(cfg.n_moe_layers * n_micro * per_layer)
    assert simulate(work, Layout(tp=2, dp=32, ep=1), H100, opts).time["ep_comm"] == 0
    across = simulate(work, Layout(tp=2, dp=32, ep=8), H100, opts).time["ep_comm"]
    # EP 8 at tp 2 spans two nodes: each rank has 4 EP peers (itself included) on its node,
    # so 3/8 of its bytes go over NVLink and 4/8 over the NIC, at the same time
    whole = 4 * (tokens / tp) * k * h * 2
    nic = H100.inter_node_bw * H100.inter_node_eff
    per_layer = max(whole * 3 / 8 / bandwidth, whole * 4 / 8 / nic) + 4 * 8.4e-6
    assert across == pytest.approx(cfg.n_moe_layers * n_micro * per_layer)


def test_zero3_gathers_weights_every_micro_batch():
    cfg = PRESETS["aquila-7b"]
    work = Workload.from_tokens(cfg, 512 * 4096)
    # bytes only: nothing hidden, no latency (the overlap window is tested in test_sim_terms)
    exposed = Options(overlap_dp=False, latency_intra_us=0, latency_inter_us=0)
    z1 = simulate(work, Layout(dp=64, zero=1), H100, exposed)
    z3 = simulate(work, Layout(dp=64, zero=3), H100, exposed)
    n_micro = 512 / 64
    # gradients reduced once in fp32 (4 B), weights gathered in bf16 (2 B): once under ZeRO-1,
    # forward and backward of every micro-batch under ZeRO-3
    assert z3.time["dp_comm"] / z1.time["dp_comm"] == pytest.approx((4 + 2 * 2 * n_micro) / 6,
                                                                     rel=1e-2)
    assert z3.memory["weights"] == pytest.approx(z1.memory["weights"] / 64)


def test_mfu_identity_and_run_costs():
    cfg = PRESETS["aquilamoe-8x16b"]
    work = Workload.from_tokens(cfg, 24 * 2**20)
    r = simulate(work, Layout(tp=2, dp=512, ep=4, zero=2), H100)
    per_token = flops_per_token(cfg, 4096).model
    assert r.mfu == pytest.approx(r.tokens_per_s * per_token / (1024 * H100.peak_flops))
    assert r.mfu < Options().gemm_efficiency  # communication and the optimizer cost something
    parts = sum(v for k, v in r.time.items() if k != "step_time")
    assert parts == pytest.approx(r.time["step_time"], rel=1e-12)
    run = r.run(545e9)
    assert run["days"] == pytest.approx(545e9 / r.tokens_per_day / r.goodput["goodput"])
    assert 0.9 < r.goodput["goodput"] < 1  # 1,024 GPUs fail about twice a day (Llama 3)
    assert run["cost_usd"] == pytest.approx(run["gpu_hours"] * 2.49)
    assert run["energy_kwh"] == pytest.approx(run["gpu_hours"] * 0.7)
    assert run["pf_days"] == pytest.approx(545e9 * per_token / PF_DAY)


# --- the search -------------------------------------------------------------------------------
def test_vectorised_search_agrees_with_the_plain_loop():
    work = Workload.from_tokens(PRESETS["aquila-8x1.8b"], 256 * 2048)
    search = search_layouts(work, H100, 64, fixed_gpus=True)
    looped = list(iter_layouts(work, 64))
    assert search.n_valid == len(looped)
    st, opt = WorkloadStats(work, Options()), Options()
    priced = [(price(st, H100, opt, layout.columns()), layout) for layout in looped]
    feasible = [(v, lay) for v, lay in priced if v["fits"]]
    assert search.n_feasible == len(feasible)
    best = min(float(v["step_time"]) for v, _ in feasible)
    assert search.fastest.time["step_time"] == pytest.approx(best, rel=1e-12)
    again = simulate(work, search.fastest.layout, H100)
    assert again.memory == search.fastest.memory and again.time == search.fastest.time
    assert again.interval == search.fastest.interval
    assert again.interval[0] <= again.tokens_per_s <= again.interval[1]


def test_search_covers_100k_layouts_and_cheapest_may_use_fewer_gpus():
    work = Workload.from_tokens(PRESETS["aquilamoe-8x16b"], 24 * 2**20)
    search = search_layouts(work, H100, 1024)
    assert search.n_candidates >= 100_000
    fast, cheap = search.fastest, search.cheapest
    assert fast.fits and cheap.fits and fast.n_gpus <= 1024
    cost = lambda r: r.n_gpus * r.time["step_time"]  # noqa: E731 (GPU-seconds per step)
    assert cost(cheap) <= cost(fast)
    assert fast.tokens_per_s >= cheap.tokens_per_s


# --- hardware ---------------------------------------------------------------------------------
def test_catalogue_figures_carry_sources_and_overrides():
    for device in CATALOGUE.values():
        for f in dataclasses.fields(device):
            if f.name not in ("name", "sources", "gpus_per_node"):
                assert device.sources.get(f.name), f"{device.name}.{f.name} has no source"
    assert CATALOGUE["h100"].peak_flops == 989.4e12
    cheap = get_device("H100", price_per_hour=1.0)
    assert cheap.price_per_hour == 1.0 and cheap.sources["price_per_hour"] == "user override"
    with pytest.raises(ValueError, match="gpu='h900': unknown"):
        get_device("h900")


# --- scenarios --------------------------------------------------------------------------------
def test_h100_scenario_predicts_every_phase():
    result = load_scenario(SIMS / "aquilamoe_h100.toml")
    for phase in result.phases + [result.baseline]:
        assert phase.throughput.startswith("simulated")
        # tokens/day and MFU are two views of the same prediction
        assert phase.implied_mfu * phase.gpus * phase.peak_flops * 86400 / phase.flops_per_token \
            == pytest.approx(phase.tokens_per_day)
        assert 0.3 < phase.implied_mfu < 0.6
        assert phase.cost_usd == pytest.approx(phase.gpu_days * 24 * 2.49)
    assert result.phases[0].gpus <= 480  # 480 GPUs cannot split 3072 sequences evenly
    assert result.tsf > 1 and result.cpsf > 1


def test_scaleout_validation_scenario():
    result = load_scenario(SIMS / "scaleout_1p8b.toml")
    assert result.baseline.tokens == 4000e9
    assert result.tsf > 1  # the dense 1.8B is cheaper per token than the 8x1.8B MoE


def test_custom_device_and_explicit_layout():
    data = {"devices": {"mychip": {"base": "h100", "peak_tflops": 500, "price_per_hour": 1.5}},
            "phases": [{"name": "a", "preset": "aquila-1.8b", "tokens_b": 100, "devices": 64,
                        "gpu": "mychip", "simulate": True, "batch_tokens": 256 * 2048,
                        "layout": {"tp": 2, "dp": 32, "zero": 1}}],
            "baseline": {"name": "b", "preset": "aquila-1.8b", "devices": 64, "gpu": "mychip",
                         "mfu": 0.4}}
    result = parse_scenario(data)
    phase = result.phases[0]
    assert phase.peak_flops == 500e12 and phase.price_per_hour == 1.5
    assert phase.gpus == 64
    assert result.baseline.tokens_per_day == pytest.approx(
        0.4 * 64 * 500e12 * 86400 / phase.flops_per_token)


# --- the command line -------------------------------------------------------------------------
def test_cli_flops_json(capsys):
    assert main(["flops", "--preset", "aquila-16b", "--seq", "4096", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["attention"] == "causal"
    assert out["preset"] == "aquila-16b" and out["seq_len"] == 4096
    assert out["backward"] == 2 * out["forward"] and out["model"] == 3 * out["forward"]
    assert sum(r["forward"] for r in out["rows"]) == pytest.approx(out["forward"])


def test_cli_simulate_table_and_plots(capsys, tmp_path):
    assert main(["simulate", str(TABLE6), "--plot-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "= 4.124" in out and "= 3.347" in out and "475,360" in out
    assert (tmp_path / "phases.png").exists()
    assert main(["simulate", str(TABLE6), "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["tsf"], 2) == 4.12


def test_cli_plan_json(capsys):
    assert main(["plan", "--preset", "aquilamoe-8x16b", "--gpus", "1024", "--gpu", "h100",
                 "--batch-tokens", str(24 * 2**20), "--tokens-b", "545", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_candidates"] >= 100_000
    fastest = out["fastest"]
    assert fastest["memory"]["memory"] <= fastest["memory"]["usable"]
    assert fastest["run"]["days"] > 0 and fastest["n_gpus"] <= 1024


BAD = {
    "unknown key": ('[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=1\ndevices=8\npeak_tflops=1\n'
                    'tokens_per_day_b=1\ncolour="red"\n', "phases[0].colour: unknown key"),
    "missing field": ('[[phases]]\nname="a"\nmodel_size_b=7\ndevices=8\npeak_tflops=1\n'
                      'tokens_per_day_b=1\n', "phases[0].tokens_b: missing"),
    "negative tokens": ('[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=1\ndevices=8\n'
                        'peak_tflops=1\ntokens_per_day_b=1\n[[phases]]\nname="b"\nmodel_size_b=7\n'
                        'tokens_b=-5\ndevices=8\npeak_tflops=1\ntokens_per_day_b=1\n',
                        "phases[1].tokens_b=-5: must be positive"),
    "zero tokens": ('[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=0\ndevices=8\npeak_tflops=1\n'
                    'tokens_per_day_b=1\n', "phases[0].tokens_b=0: must be positive"),
    "unknown gpu": ('[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=1\ndevices=8\ngpu="h900"\n'
                    'tokens_per_day_b=1\n', "phases[0].gpu='h900': unknown"),
    "layout not dividing": ('[[phases]]\nname="a"\npreset="aquila-1.8b"\ntokens_b=1\ndevices=64\n'
                            'gpu="h100"\nsimulate=true\nbatch_tokens=524288\n'
                            'layout={tp=2, dp=16}\n', "phases[0].layout.dp=16: tp x cp x pp x dp = 32"),
    "tp not dividing heads": ('[[phases]]\nname="a"\npreset="aquila-1.8b"\ntokens_b=1\n'
                              'devices=96\ngpu="h100"\nsimulate=true\nbatch_tokens=524288\n'
                              'layout={tp=3, dp=32}\n', "phases[0].layout.tp=3: must divide"),
    "no baseline": ('[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=1\ndevices=8\n'
                    'peak_tflops=1\ntokens_per_day_b=1\n', "baseline: missing"),
    "bad toml": ("[[phases]\n", "not a valid TOML file"),
}
_BASELINE = '[baseline]\nname="s"\nmodel_size_b=7\ndevices=8\npeak_tflops=1\ntokens_per_day_b=1\n'


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenarios_exit_2_with_one_line(case, tmp_path, capsys):
    text, expected = BAD[case]
    if case not in ("no baseline", "bad toml"):
        text += _BASELINE
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["simulate", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert expected in lines[0]
    assert captured.out == ""
