"""The scale-out recipe in quick mode: every variant trains, the table and plots are written.
(The scale-up recipe runs through notebooks/02_scale_up.ipynb, executed by nbmake.)"""

import pytest

from minimoe import checkpoint as ckpt
from minimoe.recipes.config import RECIPES
from minimoe.recipes.experiments import scale_out_experiment

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
    tasks = (out / "scale-out.md").read_text().split("## Tasks")[1]
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
