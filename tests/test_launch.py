"""Full-size launch recipes (scaling/full/), their launcher and the rehearsal (dry run).

Invariants: each recipe carries the layout the simulator recommends among those the torchrun
path runs, and its batch adds up; the rehearsal on fake tensors gives a real run's memory
(2 gloo ranks, within 5%); a full-size recipe fits with a 10% margin and the simulator's memory
is within 10% of its rehearsal; the one launch script runs a recipe end to end under torchrun
(tiny models, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minimoe.cli import build_parser
from minimoe.recipes.dry_run import PARTS, dry_run, rehearse
from minimoe.recipes.launch import commands, engine_plan, load_launch_recipe
from minimoe.shards import tokenize

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "scaling" / "full").glob("*.toml"))


def test_the_paper_runs_have_recipes():
    names = {path.stem for path in RECIPES}
    assert {"aquila-1.8b", "aquila-8x1.8b", "aquila-7b", "aquila-16b", "aquilamoe-8x16b"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_carries_the_recommended_layout_and_its_batch_adds_up(path):
    recipe = load_launch_recipe(path)
    best, _ = engine_plan(recipe)
    assert best == recipe.layout, f"{path.name}: engine_plan now recommends {best}"
    layout, train = recipe.layout, recipe.train
    assert layout.dp * layout.micro_batch * recipe.grad_accum * train.seq_len == train.batch_tokens
    for argv in commands(recipe).values():
        if argv is not None:
            build_parser().parse_args(argv)  # every command the launcher runs parses


def _recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TOY = """
name = "{name}"
stage = "{stage}"
preset = "{preset}"
{where}
out = "{out}"
experts = 4
[train]
tokens_b = 3.84e-7   # 3 steps of 4 sequences of 32
batch_tokens = 128
seq_len = 32
lr = 1e-3
warmup = 1
eval_every = 3
ckpt_every = 3
bf16 = false
[layout]
gpus = 2
gpus_per_node = 2
parallel = "{parallel}"
ep = {ep}
tp = {tp}
micro_batch = 1
device = "cpu"
"""


def _eight_gpu_recipe(path: Path, **fields) -> Path:
    """toy-large under FSDP2 on 8 GPUs (nodes of 2), a step of 8 sequences of 32 tokens."""
    text = TOY.format(preset="toy-large", out="runs/y", parallel="fsdp", **fields)
    return _recipe(path, text.replace("gpus = 2\n", "gpus = 8\n")
                   .replace("batch_tokens = 128", "batch_tokens = 256"))


def test_the_rehearsal_gives_a_real_runs_memory(tmp_path):
    """One tracked training step of a toy MoE under FSDP2 with 2 expert-parallel ranks: rehearsed
    (fake process group, fake tensors, even routing) and run for real on 2 gloo ranks (routers
    sending each token to one expert of each rank, the same even load): every part of the peak
    within 5%. AdamW's states are twice the weights' shard, as the code keeps them (torch's
    tracker alone would count DTensor's global-shape stand-ins: the rehearsal keeps those out)."""
    text = TOY.format(name="toy-moe", stage="scale-out", preset="tiny", where='from = "x"',
                      out="y", parallel="fsdp", ep=2, tp=1)
    recipe = _recipe(tmp_path / "moe.toml", text.replace("bf16 = false", "bf16 = true")
                     .replace("seq_len = 32", "seq_len = 128").replace("micro_batch = 1", "micro_batch = 2")
                     .replace("batch_tokens = 128", "batch_tokens = 1024")
                     .replace("tokens_b = 3.84e-7", "tokens_b = 3.072e-6"))
    fake = rehearse(load_launch_recipe(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                           str(ROOT / "tests" / "dist_worker.py"), "measure", str(recipe),
                           str(tmp_path / "real.json")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    real = json.loads((tmp_path / "real.json").read_text())
    for part in (*PARTS, "total"):
        assert fake[part] == pytest.approx(real[part], rel=0.05, abs=0.01 * real["total"]), part
    assert fake["optimizer"] == pytest.approx(2 * fake["weights"], rel=0.01)


def test_a_full_size_recipe_fits_by_its_rehearsal_and_the_simulator_agrees():
    """aquila-1.8b at its own 256 ranks (the README's table has all five, from the command)."""
    r = dry_run(ROOT / "scaling" / "full" / "aquila-1.8b.toml")
    peak = r["rehearsed"]["total"]
    assert 20e9 < peak <= r["usable"] == 0.9 * 80e9  # fits an 80 GB GPU with a 10% margin
    assert r["simulated"]["memory"] == pytest.approx(peak, rel=0.10)
    assert r["engine_plan_matches"]


def _launch(step, recipe, env):
    return subprocess.run(["bash", str(ROOT / "scaling" / "launch.sh"), step, str(recipe)],
                          cwd=env["WORK"], env=env, capture_output=True, text=True, timeout=600)


def test_the_launch_script_runs_recipes_under_torchrun(tmp_path):
    """A tiny dense run from shards (DDP), then its streamed upcycling into 4 experts and the
    MoE's training with 2 expert-parallel ranks (FSDP2), all through scaling/launch.sh."""

    corpus = tmp_path / "text"
    corpus.mkdir()
    words = "the quick brown fox jumps over the lazy dog and runs far away".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(60)) + f" {i}" for i in range(80)]
    (corpus / "a.txt").write_text("\n\n".join(docs))
    tokenize([str(corpus)], tmp_path / "shards", vocab_size=300, val_fraction=0.2, progress=False)
    dense = _recipe(tmp_path / "dense.toml", TOY.format(
        name="toy-dense", stage="pretrain", preset="tiny", where=f'data = "{tmp_path / "shards"}"',
        out=tmp_path / "dense", parallel="ddp", ep=1, tp=1))
    moe = _recipe(tmp_path / "moe.toml", TOY.format(
        name="toy-moe", stage="scale-out", preset="tiny", where=f'from = "{tmp_path / "dense"}"',
        out=tmp_path / "moe", parallel="fsdp", ep=2, tp=1))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "RDZV_ENDPOINT": "localhost:0", "WORK": str(tmp_path), "MAX_RESTARTS": "0"}
    for step, recipe in (("prepare", dense), ("train", dense), ("prepare", moe), ("train", moe)):
        done = _launch(step, recipe, env)
        assert done.returncode == 0, (step, recipe.name, done.stdout[-2000:], done.stderr[-4000:])
    for run in ("dense", "moe"):
        log = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r] == [3]
        assert (tmp_path / run / "model.safetensors").exists()
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["n_experts"] == 4 and config["vocab_size"] == 300
    assert json.loads((tmp_path / "moe-init" / "transform.json").read_text())["streamed"]


def test_the_slurm_job_runs_the_launcher_on_every_node(tmp_path):
    """scaling/slurm.sh under stand-ins for SLURM's scontrol and srun: each node's task runs
    `scaling/launch.sh train RECIPE` with the job's nodes, its rendezvous on the first node and
    torchtitan's network settings."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (bin_ / "srun").write_text('#!/bin/sh\nshift\nenv > "$OUT"\necho "$@" >> "$OUT"\n')
    for shim in bin_.iterdir():
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "7"}
    done = subprocess.run(["bash", str(ROOT / "scaling" / "slurm.sh"), "scaling/full/aquila-7b.toml"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out").read_text()
    for line in ("NNODES=2", "RDZV_ENDPOINT=gpu-a:29500", "RUN_ID=minimoe-7", "NCCL_BUFFSIZE=2097152"):
        assert line in out.splitlines(), line
    assert "scaling/launch.sh train" in out and out.rstrip().endswith("scaling/full/aquila-7b.toml")


def test_experts_are_split_evenly_or_the_layout_is_refused():
    """FSDP2 splits a weight evenly on dims past 0 or pads dim 0: 8 experts over 256 ranks go
    on the first dim 256 divides; with none, engine_plan never picks the layout (each rank
    would hold a whole expert)."""
    from minimoe.dist import even_dim

    assert even_dim((8, 5504, 2048), 256) == 2 and even_dim((8, 5504, 2048), 8) == 0
    assert even_dim((8, 5504, 2048), 768) is None and even_dim((1000,), 768) == 0
    for path in RECIPES:
        recipe = load_launch_recipe(path)
        cfg, layout = recipe.workload.cfg, recipe.layout
        if cfg.n_experts:
            shape = (cfg.n_experts // layout.ep, cfg.expert_d_ffn or cfg.d_ffn, cfg.d_model)
            assert even_dim(shape, layout.gpus // layout.ep // layout.tp) is not None, path.name


def test_bench_step_runs_a_recipe_on_one_rank_and_its_memory_is_the_rehearsal():
    from argparse import Namespace

    from minimoe.bench.step import bench_step
    out = bench_step(Namespace(recipe=str(ROOT / "scaling/full/aquila-8x1.8b.toml"), micro_batch=None,
                               quick=True))
    assert out["rehearsed"] == pytest.approx(out["peak"], rel=0.05)
    assert len(out["seconds"]) == 6 and out["tokens_per_s"] > 0
