"""`minimoe pipeline --preset tiny` end to end: a failed stage, resume, the report."""

import json
import math

import pytest

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.flops import flops_per_token
from minimoe.recipes.config import get_recipe
from minimoe.recipes.pipeline import run_pipeline
from minimoe.recipes.report import iso_loss

STAGES = ["1-prep", "2-grown", "3-scale-up", "4-upcycled", "5-scale-out", "6-scratch"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """First run crashes in scale-out (injected); the re-run through the CLI completes it."""
    import minimoe.upcycle

    out = tmp_path_factory.mktemp("pipe") / "tiny"
    real = minimoe.upcycle.upcycle

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash during scale-out")

    minimoe.upcycle.upcycle = broken
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_pipeline(get_recipe("tiny"), out, progress=False)
    finally:
        minimoe.upcycle.upcycle = real
    for stage in ("1-prep", "2-grown", "3-scale-up"):
        ckpt.load_model(out / stage)  # the finished stages stay usable
    assert not (out / "4-upcycled").exists()
    mtime = (out / "3-scale-up" / "model.safetensors").stat().st_mtime_ns
    assert main(["pipeline", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    assert (out / "3-scale-up" / "model.safetensors").stat().st_mtime_ns == mtime  # not redone
    return out


def test_every_stage_and_the_report(pipeline_dir):
    for stage in STAGES:
        assert (pipeline_dir / stage / "model.safetensors").exists(), stage
    report = pipeline_dir / "report"
    for name in ("report.md", "loss_vs_flops.png", "loss_vs_tokens.png", "expert_load.png", "stages.csv"):
        assert (report / name).stat().st_size > 0, name
    summary = json.loads((report / "summary.json").read_text())
    f = summary["factors"]
    # the baseline trains on exactly the chain's tokens, and costs more per token than any stage
    assert f["scratch_tokens_equal_chain"]
    assert f["compute_savings_model_flops"] > 1.0
    # the time factor (arXiv 2408.06567 §4.3, TSF): the chain's tokens at the baseline's step
    # speed over each stage's tokens at its own, the speeds measured after training (speed.json)
    speed = json.loads((pipeline_dir / "speed.json").read_text())
    assert speed["settings"]["threads"] == 1 and len(speed["load_1min"]) == 2
    v = speed["tokens_per_s"]
    state = {s: ckpt.read_json(ckpt.latest_checkpoint(pipeline_dir / s) / "state.json")
             for s in ("1-prep", "3-scale-up", "5-scale-out", "6-scratch")}
    tokens = dict(zip(("preparation", "scale-up", "scale-out"),
                      (state[s]["tokens"] for s in ("1-prep", "3-scale-up", "5-scale-out"))))
    chain_time = sum(n / v[stage] for stage, n in tokens.items())
    assert f["time_savings"] == pytest.approx(sum(tokens.values()) / v["from scratch"] / chain_time)
    # the wall-time factor beside it: the baseline's measured speed over the chain's time
    wall = state["6-scratch"]["tokens"] / state["6-scratch"]["train_time"]
    assert f["time_savings_wall"] == pytest.approx(
        sum(tokens.values()) / wall / sum(state[s]["train_time"] for s in ("1-prep", "3-scale-up", "5-scale-out")))
    # iso-loss: the baseline's curve read at the chain's final loss; never more than equal tokens
    chain_end = summary["stages"][2]["val loss at end"]
    curve = summary["curves"]["from scratch"]
    if f["iso_loss_reached"]:
        assert f["compute_savings_iso_loss"] <= f["compute_savings_model_flops"] + 1e-9
        assert min(p["val_loss"] for p in curve) <= chain_end + 1e-3
    else:
        assert f["compute_savings_iso_loss"] == pytest.approx(f["compute_savings_model_flops"])
        assert min(p["val_loss"] for p in curve) > chain_end - 1e-3
    md = (report / "report.md").read_text()
    assert f"{f['compute_savings_iso_loss']:.2f}x" in md and "at equal loss" in md
    assert f"{f['time_savings']:.2f}x" in md and "load average" in md
    # where the time factor comes from: its shares multiply to it, one device so chips are 1
    parts = summary["decomposition"]
    assert parts["tsf"] == pytest.approx(f["time_savings"])
    assert parts["shares"]["tsf"]["chips (cluster peak)"] == pytest.approx(1.0)
    assert math.prod(parts["shares"]["tsf"].values()) == pytest.approx(parts["tsf"])


def test_the_report_evaluates_every_stage_like_table_4(pipeline_dir):
    summary = json.loads((pipeline_dir / "report" / "summary.json").read_text())
    evaluation = summary["evaluation"]
    labels = list(evaluation)  # (summary.json sorts its keys)
    equal = [label for label in labels if label.startswith("MoE from scratch, equal compute")]
    assert len(labels) == 5 and len(equal) == 1
    for label, results in evaluation.items():
        assert set(results) == {"cloze-en", "cloze-zh", "complete-en", "complete-zh", "ppl"}
        assert results["cloze-en"]["n"] == 20 and results["cloze-en"]["chance"]["acc"] == 0.25
        for task in ("cloze-en", "cloze-zh"):
            assert 0 <= results[task]["metrics"]["acc_norm"] <= 1
        ppl = results["ppl"]
        assert 0 < ppl["metrics"]["bpb"] < ppl["chance"]["bpb"], label  # better than uniform
    report = (pipeline_dir / "report" / "report.md").read_text()
    table = report.split("## Evaluation")[1]
    assert "cloze-en acc (%)" in table and "chance" in table
    for label in labels:
        assert label in table
    # the equal-compute model: the baseline after the first step whose FLOPs reach the chain's
    chain_flops = 0.0
    for stage in ("1-prep", "3-scale-up", "5-scale-out"):
        tokens = ckpt.read_json(ckpt.latest_checkpoint(pipeline_dir / stage) / "state.json")["tokens"]
        chain_flops += flops_per_token(ckpt.read_config(pipeline_dir / stage), 64).model * tokens
    snapshot = ckpt.read_json(pipeline_dir / "6-scratch-equal-compute" / "run.json")
    per_step = flops_per_token(ckpt.read_config(pipeline_dir / "6-scratch"), 64).model * 8 * 64
    assert (snapshot["step"] - 1) * per_step < chain_flops <= snapshot["step"] * per_step
    assert equal[0].endswith(f"(step {snapshot['step']})")
    early = ckpt.load_tensors(pipeline_dir / "6-scratch-equal-compute" / "model.safetensors")
    final = ckpt.load_tensors(pipeline_dir / "6-scratch" / "model.safetensors")
    assert not all(early[k].equal(final[k]) for k in final)


def test_the_report_shows_each_stages_mix_and_what_the_experts_specialise_in(pipeline_dir):
    summary = json.loads((pipeline_dir / "report" / "summary.json").read_text())
    for row in summary["stages"]:  # the default mix: in proportion to each domain's tokens
        assert row["data mix"].startswith("size: en-kjv 0.") and "zh-pd1998 0." in row["data mix"]
    spec = summary["specialisation"]
    start = spec["upcycled, start of scale-out (4-upcycled)"]
    end = spec["upcycled, end of scale-out (5-scale-out)"]
    assert set(spec) == {"upcycled, start of scale-out (4-upcycled)",
                         "upcycled, end of scale-out (5-scale-out)", "MoE from scratch (6-scratch)"}
    for r in spec.values():
        assert len(r["js"]) == 3 and all(0 <= js <= 1 for js in r["js"])  # tiny-large: 3 MoE layers
        assert r["mean_js"] == pytest.approx(sum(r["js"]) / len(r["js"]))
    assert start != end  # the router trained in between
    report = (pipeline_dir / "report" / "report.md").read_text()
    section = report.split("## What the experts specialise in, by domain")[1]
    for folder in ("4-upcycled", "5-scale-out", "6-scratch"):
        assert f"experts/{folder}/specialisation.png" in section
        assert (pipeline_dir / "report" / "experts" / folder / "specialisation.png").stat().st_size > 0
        assert (pipeline_dir / "report" / "experts" / folder / "top_tokens.md").exists()


def test_upcycling_preserves_the_loss(pipeline_dir):
    """The MoE starts exactly where the dense model ended."""
    summary = json.loads((pipeline_dir / "report" / "summary.json").read_text())
    dense_end = summary["stages"][1]["val loss at end"]
    upcycling = summary["transitions"]["upcycling (4-upcycled)"]
    assert upcycling["val_before"]["val_loss"] == pytest.approx(dense_end, abs=1e-3)
    assert upcycling["val_after"]["val_loss"] == pytest.approx(upcycling["val_before"]["val_loss"], abs=1e-5)
    moe = ckpt.read_config(pipeline_dir / "5-scale-out")
    assert (moe.n_experts, moe.top_k) == (8, 2)


def test_rerun_of_a_finished_pipeline_trains_nothing(pipeline_dir):
    before = {s: (pipeline_dir / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    evals = {p: p.stat().st_mtime_ns for p in pipeline_dir.glob("*/eval.json")}
    assert len(evals) == 5
    speed = (pipeline_dir / "speed.json").stat().st_mtime_ns
    run_pipeline(get_recipe("tiny"), pipeline_dir, progress=False)
    assert (pipeline_dir / "speed.json").stat().st_mtime_ns == speed  # not measured again
    after = {s: (pipeline_dir / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    assert before == after
    assert {p: p.stat().st_mtime_ns for p in pipeline_dir.glob("*/eval.json")} == evals  # reused


def test_a_different_pipeline_in_the_folder_is_refused(pipeline_dir, capsys):
    assert main(["pipeline", "--preset", "toy", "--out", str(pipeline_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a pipeline with" in err and len(err.splitlines()) == 1


def test_a_folder_of_another_seed_is_refused(tmp_path):
    import dataclasses

    settings = dataclasses.asdict(get_recipe("tiny"))
    (tmp_path / "pipeline.json").write_text(json.dumps({**settings, "seed": 1}))
    with pytest.raises(ValueError, match="holds a pipeline with seed=1"):
        run_pipeline(get_recipe("tiny"), tmp_path, progress=False)


def test_iso_loss_reads_the_curve_between_evaluations():
    curve = [{"tokens": 0, "flops": 0.0, "val_loss": 7.0}, {"tokens": 100, "flops": 10.0, "val_loss": 5.0},
             {"tokens": 200, "flops": 20.0, "val_loss": 4.0}]
    at, reached = iso_loss(curve, 4.5)
    assert reached and at == {"tokens": 150, "flops": 15.0}
    at, reached = iso_loss(curve, 3.0)  # never reached: the last point, a lower bound
    assert not reached and at == {"tokens": 200, "flops": 20.0}
    assert iso_loss(curve, 7.5) == ({"tokens": 0, "flops": 0.0}, True)


QUICK = """preset = "tiny"
prep_steps = 8
scale_up_steps = 4
scale_out_steps = 4
eval_every = 4
eval_batches = 2
eval_examples = 4
eval_chars = 400
bench_rounds = 2
"""


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory):
    """`minimoe pipeline --seeds 2` on a shortened tiny recipe."""
    folder = tmp_path_factory.mktemp("seeds")
    (folder / "quick.toml").write_text(QUICK)
    out = folder / "pipe"
    assert main(["pipeline", "--preset", str(folder / "quick.toml"), "--out", str(out),
                 "--seeds", "2", "--no-progress"]) == 0
    return out


def test_seeds_run_every_stage_with_their_own_seed(seeds_dir):
    for seed in (0, 1):
        folder = seeds_dir / f"seed-{seed}"
        for stage in ("1-prep", "3-scale-up", "5-scale-out", "6-scratch"):  # data order, init
            assert ckpt.read_json(folder / stage / "run.json")["train"]["seed"] == seed, stage
        for stage in ("2-grown", "4-upcycled"):  # growth and routing maps
            assert ckpt.read_json(folder / stage / "transform.json")["seed"] == seed, stage
    one, two = (json.loads((seeds_dir / f"seed-{s}" / "report" / "summary.json").read_text())
                for s in (0, 1))
    assert one["figures"]["val loss, preparation end"] != two["figures"]["val loss, preparation end"]


def test_the_seeds_report_gives_every_figure_and_judges_the_claims(seeds_dir):
    summary = json.loads((seeds_dir / "report" / "summary.json").read_text())
    per_seed = [json.loads((seeds_dir / f"seed-{s}" / "report" / "summary.json").read_text())["figures"]
                for s in (0, 1)]
    assert summary["seeds"] == [0, 1] and set(summary["figures"]) == set(per_seed[0])
    for name, s in summary["figures"].items():  # every seed's value, their mean and sd
        assert s["values"] == [f[name] for f in per_seed]
        assert s["mean"] == pytest.approx(sum(s["values"]) / 2)
        assert s["sd"] == pytest.approx(abs(s["values"][0] - s["values"][1]) / math.sqrt(2))
    for claim in summary["claims"]:  # the rule: the paired difference's 95% t interval
        d = [a - b for a, b in zip(claim["a"]["values"], claim["b"]["values"])]
        assert claim["difference"]["values"] == pytest.approx(d)
        lo, hi = claim["interval"]
        half = 12.706 * claim["difference"]["sd"] / math.sqrt(2)  # t(1) at 97.5%
        assert (lo, hi) == pytest.approx((sum(d) / 2 - half, sum(d) / 2 + half))
        expected = ("within noise" if lo <= 0 <= hi else
                    "holds" if (hi < 0) == (claim["expect"] == "<") else "does not hold")
        assert claim["verdict"] == expected, claim["claim"]
    md = (seeds_dir / "report" / "report.md").read_text()
    for section in ("## Savings", "## Claims", "## The table, over seeds", "## Evaluation, over seeds"):
        assert section in md
    assert "Student's t" in md and (seeds_dir / "report" / "loss_vs_tokens.png").stat().st_size > 0
    assert len(summary["curves"]["from scratch"]) == len(json.loads(
        (seeds_dir / "seed-0" / "report" / "summary.json").read_text())["curves"]["from scratch"])
