"""Bad input to the simulator's commands: one line naming the key, the value and the rule, exit 2,
nothing on stdout. Each case is one a review of the simulator found accepted or crashing."""

import json

import pytest

from minimoe.cli import main

PHASE = '[[phases]]\nname="a"\nmodel_size_b=7\ntokens_b=1\ndevices=8\npeak_tflops=1\ntokens_per_day_b=1\n'
BASELINE = '[baseline]\nname="s"\nmodel_size_b=7\ndevices=8\npeak_tflops=1\ntokens_per_day_b=1\n'
SIMULATED = ('[[phases]]\nname="a"\npreset="aquila-1.8b"\ntokens_b=1\ndevices=64\ngpu="h100"\n'
             'simulate=true\nbatch_tokens=524288\n')

SCENARIOS = {
    "option of the wrong type": ('[options]\ngemm_efficiency = "high"\n' + PHASE + BASELINE,
                                 "options.gemm_efficiency='high': must be a finite number"),
    "options not a table": ("options = 5\n" + PHASE + BASELINE, "options=5: must be a table"),
    "infinite baseline throughput": (PHASE + BASELINE.replace("tokens_per_day_b=1", "tokens_per_day_b=inf"),
                                     "baseline.tokens_per_day_b=inf: must be a finite number"),
    "infinite tokens": (PHASE.replace("tokens_b=1", "tokens_b=inf") + BASELINE,
                        "phases[0].tokens_b=inf: must be a finite number"),
    "negative activation bytes": ('[options]\nact_bytes = -2\n' + PHASE + BASELINE,
                                  "options.act_bytes=-2: must be in (0, inf)"),
    "a string for a flag": ('[options]\nflash_attention = "no"\n' + PHASE + BASELINE,
                            "options.flash_attention='no': must be true or false"),
    "pue not a number": ('[options]\npue = nan\n' + PHASE + BASELINE,
                         "options.pue=nan: must be a finite number"),
    "phase option of the wrong type": (SIMULATED + 'options = {imbalance = "much"}\n' + BASELINE,
                                       "phases[0].options.imbalance='much': must be a finite number"),
    "a device figure of the wrong type": ('[devices.x]\nbase = "h100"\nhbm_gb = "lots"\n' + PHASE
                                          + BASELINE, "devices.x.hbm_gb='lots': must be a finite number"),
    "a sweep MFU over 1": (PHASE + BASELINE + '[sweep]\nphase = "a"\ntokens_b = [1]\nmfu = [1.5]\n'
                           'mfu_phases = ["a"]\n', "sweep.mfu[0]=1.5: must be in (0, 1]"),
    "measured figure without a prediction": (PHASE + "measured_tokens_per_day_b = 3\n" + BASELINE,
                                             "phases[0].measured_tokens_per_day_b: only used with simulate"),
    "an uncertain input without its range": ('[options]\nuncertain = {imbalance = 1.2}\n' + PHASE
                                             + BASELINE, "options.uncertain.imbalance=1.2: must be [low, high]"),
    "an uncertain input that is no option": ('[options]\nuncertain = {colour = [1, 2]}\n' + PHASE
                                             + BASELINE, "options.uncertain.colour: unknown key"),
    "an overlap given as a share": ('[options]\noverlap_tp = 0.5\n' + PHASE + BASELINE,
                                    "options.overlap_tp=0.5: must be true or false"),
    "latent attention, refused by name": (SIMULATED.replace('preset="aquila-1.8b"',
                                                            'model={preset="aquila-1.8b", kv_lora_rank=512}')
                                          + BASELINE, "phases[0].model.kv_lora_rank: multi-head latent "
                                          "attention (MLA) is not in the simulator's step model"),
}


def _one_line_exit_2(argv, capsys, expected):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert expected in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("case", sorted(SCENARIOS))
def test_bad_scenario_values(case, tmp_path, capsys):
    text, expected = SCENARIOS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    _one_line_exit_2(["simulate", str(path)], capsys, expected)


def test_a_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(('title = "caf\xe9"\n' + PHASE + BASELINE).encode("latin-1"))
    _one_line_exit_2(["simulate", str(path)], capsys, f"{path}: not UTF-8")


PLAN = ["plan", "--preset", "aquila-1.8b", "--gpus", "8"]


@pytest.mark.parametrize("extra, expected", [
    (["--seq", "0"], "--seq=0: must be an integer in [1, 16777216]"),
    (["--tokens-b", "-5"], "--tokens-b=-5: must be positive"),
    (["--tokens-b", "0"], "--tokens-b=0: must be positive"),
    (["--tokens-b", "inf"], "--tokens-b=inf: must be a finite number"),
    (["--set", "gemm_efficiency=high"], "options.gemm_efficiency='high': must be a finite number"),
    (["--set", "imbalance=0.5"], "options.imbalance=0.5: must be in [1, inf)"),
    (["--set", "colour=red"], "options.colour: unknown key"),
    (["--set", "noequals"], "--set 'noequals': must be key=value"),
])
def test_bad_plan_arguments(extra, expected, capsys):
    _one_line_exit_2(PLAN + extra, capsys, expected)


def test_plan_takes_scenario_options_and_says_which_it_used(capsys):
    assert main(PLAN + ["--set", "gemm_efficiency=0.4", "--set", "imbalance=1.3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["gemm_efficiency"] == 0.4 and out["options"]["imbalance"] == 1.3
    assert main(PLAN + ["--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    # a lower GEMM efficiency makes the same model slower on the same GPUs
    assert out["fastest"]["tokens_per_s"] < default["fastest"]["tokens_per_s"]


def test_plan_marks_an_input_uncertain_and_widens_the_interval(capsys):
    assert main(PLAN + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["fastest"]
    assert main(PLAN + ["--set", "uncertain.latency_inter_us=[0, 100]", "--json"]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert wide["options"]["uncertain"]["latency_inter_us"] == [0, 100]
    low, high = wide["fastest"]["interval"]
    assert low <= wide["fastest"]["tokens_per_s"] <= high
    assert high - low >= plain["interval"][1] - plain["interval"][0]


def test_plan_says_which_terms_dominate(capsys):
    assert main(PLAN + ["--set", "latency_inter_us=1000"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("where"))
    shares = [int(part.rsplit(" ", 1)[1].rstrip("%")) for part in line.split(": ")[1].split(", ")]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 101
