"""The scale-out recipe in quick mode: every variant trains, the table and plots are written;
Table 1 over seeds; the savings sweep. (The scale-up recipe of one seed runs through
notebooks/02_scale_up.ipynb, executed by nbmake.)"""

import json

import pytest

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.recipes.config import RECIPES
from minimoe.recipes.experiments import scale_out_experiment
from minimoe.recipes.findings import CLAIMS

QUICK = RECIPES["tiny"]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale-out")
    return out, scale_out_experiment(out, QUICK, progress=False)


def test_every_variant_is_in_the_table(summary):
    out, s = summary
    rows = {r["method"]: r for r in s["rows"]}
    assert list(rows) == ["dense (continued)", "upcycled", "split-random", "split-cluster",
                          "split-importance", "MoE from scratch"]
    # upcycling preserves the function; splitting does not; from scratch starts near log(vocab)
    assert rows["upcycled"]["at init"] == pytest.approx(rows["dense (continued)"]["at init"], abs=1e-5)
    assert rows["MoE from scratch"]["at init"] > rows["upcycled"]["at init"] + 0.5
    for r in rows.values():
        assert r["final"] < r["at init"], r  # every variant learned something
    assert rows["upcycled"]["params (total)"] > rows["upcycled"]["params (active)"]
    for name in ("scale-out.md", "scale-out.csv", "loss_vs_tokens.png", "loss_vs_flops.png",
                 "expert_load.png"):
        assert (out / name).stat().st_size > 0, name
    # the pipeline's evaluation tasks, for every variant
    assert sorted(s["evaluation"]) == sorted(rows)
    for name, results in s["evaluation"].items():
        assert set(results) == {"cloze-en", "cloze-zh", "complete-en", "complete-zh", "ppl"}
        assert 0 < results["ppl"]["bpb"] < 9, name
    tasks = (out / "scale-out.md").read_text().split("## Evaluation")[1]
    assert "cloze-zh acc_norm (%)" in tasks and "MoE from scratch" in tasks


def test_the_summary_names_every_trained_model_and_its_load(summary):
    out, s = summary
    assert list(s["runs"]) == [r["method"] for r in s["rows"]]
    for name, run in s["runs"].items():
        cfg = ckpt.read_config(run)
        assert cfg.param_counts()["total"] == {r["method"]: r for r in s["rows"]}[name]["params (total)"]
        if cfg.is_moe:  # the last load it logged: one row per MoE layer, one count per expert
            load = s["loads"][name]
            assert len(load) == cfg.n_moe_layers and {len(row) for row in load} == {cfg.n_experts}
    assert "dense (continued)" not in s["loads"]


def test_rerun_reuses_finished_runs(summary):
    """A deterministic retrain would give the same numbers, so compare the model files: a run
    that is not redone keeps its file untouched."""
    out, s = summary
    models = sorted(out.rglob("model.safetensors"))
    assert len(models) >= len(s["rows"])
    before = {path: path.stat().st_mtime_ns for path in models}
    again = scale_out_experiment(out, QUICK, progress=False)
    assert {path: path.stat().st_mtime_ns for path in models} == before
    assert sorted(out.rglob("model.safetensors")) == models  # and nothing new was trained
    assert [r["final"] for r in again["rows"]] == [r["final"] for r in s["rows"]]


SHORT = """preset = "tiny"
prep_steps = 6
scale_up_steps = 4
steps = 6
eval_every = 3
eval_batches = 2
eval_examples = 2
eval_chars = 200
bench_rounds = 2
"""


def test_table_1_over_seeds_judges_the_claims_and_figure_3_over_training(tmp_path):
    (tmp_path / "short.toml").write_text(SHORT)
    out = tmp_path / "table1"
    assert main(["experiment", "scale-up", "--preset", str(tmp_path / "short.toml"), "--out",
                 str(out), "--seeds", "2", "--no-progress"]) == 0
    for seed in (0, 1):  # each seed pretrains its own small model and grows it with its maps
        assert ckpt.read_json(out / f"seed-{seed}" / "small" / "run.json")["train"]["seed"] == seed
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert [c["claim"] for c in summary["claims"]] == [c[0] for c in CLAIMS["scale-up"]]
    assert all(c["verdict"] in ("holds", "does not hold", "within noise") for c in summary["claims"])
    rows = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["rows"] for s in (0, 1)]
    assert [r["method"] for r in summary["table"]] == [r["method"] for r in rows[0]]
    aki = summary["dynamics"]["AKI-Pro (Interpolation) below FPI (Interpolation)"]
    assert [p["tokens"] for p in aki] == [0, 3 * 8 * 64, 6 * 8 * 64]  # every evaluation
    final = {c["claim"]: c for c in summary["claims"]}["AKI-Pro ends lower than FPI, both interpolated (Figure 3)"]
    assert aki[-1]["difference"]["values"] == pytest.approx(final["difference"]["values"])
    assert summary["decided"]["AKI-Pro (Interpolation) below FPI (Interpolation)"]
    assert "## Over training" in (out / "report" / "report.md").read_text()


def test_the_savings_sweep_shares_the_stages_before_scale_out(tmp_path):
    (tmp_path / "short.toml").write_text(SHORT.replace("eval_every = 3", "eval_every = 6"))
    out = tmp_path / "savings"
    assert main(["experiment", "savings", "--preset", str(tmp_path / "short.toml"), "--out", str(out),
                 "--seeds", "2", "--budgets", "2,4", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "seed-0").iterdir() if p.is_dir()) == [
        "1-prep", "2-grown", "3-scale-up", "4-upcycled", "5-scale-out-2", "5-scale-out-4",
        "6-scratch-2", "6-scratch-4"]
    summary = json.loads((out / "summary.json").read_text())
    assert [p["budget"] for p in summary["points"]] == [2, 4]
    for p in summary["points"]:
        assert p["share"] == pytest.approx(p["budget"] / (6 + 4 + p["budget"]))
        assert p["compute_savings_iso_loss"]["n"] == 2
    for row in summary["rows"]:  # the baseline on the chain's tokens: iso-loss never above
        assert row["scratch_tokens_equal_chain"]
        assert row["compute_savings_iso_loss"] <= row["compute_savings_model_flops"] + 1e-9
    paper = summary["paper"]  # the full-size chain: Table 6 at its own split
    assert (paper["tsf"], paper["cpsf"]) == pytest.approx((4.124, 3.347), abs=1e-3)
    assert paper["share"] == pytest.approx(545 / 5345)
    tsf = [r["tsf"] for r in summary["simulator"]]
    assert tsf == sorted(tsf, reverse=True)  # more of the chain in its last phase, less saved
    assert (out / "savings.png").stat().st_size > 0 and "| 4 |" in (out / "savings.md").read_text()


def test_scale_out_over_seeds_from_each_seeds_dense_run(summary, tmp_path):
    """--dense-run with {seed}: each seed continues its own grown dense model (here the module's
    dense run stands in for both)."""
    out, _ = summary
    (out.parent / "seed-0").symlink_to(out)
    (out.parent / "seed-1").symlink_to(out)
    (tmp_path / "short.toml").write_text(SHORT.replace("steps = 6", "steps = 3"))
    dest = tmp_path / "scale-out"
    assert main(["experiment", "scale-out", "--preset", str(tmp_path / "short.toml"), "--out",
                 str(dest), "--seeds", "0,1", "--dense-run", str(out.parent / "seed-{seed}" / "dense"),
                 "--no-progress"]) == 0
    for seed in (0, 1):
        init = ckpt.read_json(dest / f"seed-{seed}" / "init-upcycled" / "transform.json")
        assert (init["method"], init["source"]) == ("upcycle", str((out / "dense").resolve()))
    report = json.loads((dest / "report" / "summary.json").read_text())
    assert [c["claim"] for c in report["claims"]] == [c[0] for c in CLAIMS["scale-out"]]
    assert "upcycled below dense (continued)" in report["decided"]
