"""The training loop: exact resume after SIGKILL, clear checkpoint errors, NaN handling."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.moe import expert_load
from minimoe.recipes.stages import data_spec, load_run_data
from minimoe.train import TrainConfig, TrainingDiverged, lr_at, read_log, train

# One run of the tiny model on the demo corpus; KILL_AT makes the process SIGKILL itself
# right after that step, between two checkpoints (every 10 steps).
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from minimoe.recipes.stages import data_spec, pretrain
    from minimoe.train import TrainConfig
    kill_at = int(os.environ.get("KILL_AT", "0"))
    def on_step(step, record):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    tc = TrainConfig(steps=30, batch_size=4, seq_len=32, warmup_steps=5, eval_every=10,
                     eval_batches=2, ckpt_every=10, log_every=1)
    pretrain("tiny", sys.argv[1], tc, data_spec(vocab_size=512), progress=False, on_step=on_step)
""")


def _run(out: Path, kill_at: int = 0) -> int:
    env = {**os.environ, "KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env).returncode


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    assert _run(tmp_path / "straight") == 0
    assert _run(tmp_path / "killed", kill_at=25) == -signal.SIGKILL
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_000020"
    assert max(_losses(tmp_path / "killed")) == 25  # it did run past the checkpoint
    assert _run(tmp_path / "killed") == 0  # resumes from step 20
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 31))
    assert resumed == straight  # bit-identical floats, every step
    a = ckpt.load_tensors(tmp_path / "straight" / "model.safetensors")
    b = ckpt.load_tensors(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert _run(out) == 0
    return out


def _corrupt_and_load(run: Path, tmp_path: Path, corrupt) -> str:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    corrupt(copy)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model(copy)
    return str(err.value)


def test_truncated_checkpoint_is_a_clear_error(finished_run, tmp_path):
    def truncate(run):
        path = run / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    assert "truncated or corrupt" in _corrupt_and_load(finished_run, tmp_path, truncate)


def test_wrong_shape_names_the_tensor(finished_run, tmp_path):
    def reshape(run):
        tensors = ckpt.load_tensors(run / "model.safetensors")
        tensors["layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
        ckpt.save_tensors(run / "model.safetensors", tensors)
    message = _corrupt_and_load(finished_run, tmp_path, reshape)
    assert "tensor layers.1.mlp.up_proj.weight has shape (3, 3)" in message


def test_cli_errors_are_one_line_exit_2(finished_run, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "bad" / "config.json").write_text(finished_run.joinpath("config.json").read_text())
    (tmp_path / "bad" / "run.json").write_text(finished_run.joinpath("run.json").read_text())
    cases = [
        ["info", "--preset", "nope"],
        ["pretrain", "--preset", "nope", "--out", str(tmp_path / "x")],
        ["pretrain", "--init", str(tmp_path / "missing"), "--out", str(tmp_path / "y")],
        ["pretrain", "--init", str(tmp_path / "bad"), "--out", str(tmp_path / "z")],
        ["pretrain", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "w")],
        # the folder holds a finished run of a different model
        ["pretrain", "--preset", "toy-small", "--out", str(finished_run), "--steps", "1"],
        ["pretrain", "--preset", "tiny", "--steps", "0", "--out", str(tmp_path / "v")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err, (argv, err)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(finished_run, tmp_path):
    from minimoe.recipes.stages import run_data_spec

    model, _ = ckpt.load_model(finished_run)  # NaN weights in a file are refused at loading:
    with torch.no_grad():  # here they come from memory, as a diverged update would make them
        model.lm_head.weight.fill_(float("nan"))
    data, _ = load_run_data(run_data_spec(finished_run))
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_batches=1, ckpt_every=1)
    with pytest.raises(TrainingDiverged, match="step 0: loss=nan"):
        train(model, data, tc, tmp_path / "cont", progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "cont") is None


def test_learning_rate_schedule():
    tc = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(100, tc) == pytest.approx(0.1)
    assert all(lr_at(s, tc) >= lr_at(s + 1, tc) for s in range(10, 100))


def test_logged_expert_load_is_the_training_batch_routing(tmp_path):
    """The `load` a step logs is what its training batch sent to each expert, even when the
    step also evaluates (validation forwards route other tokens afterwards)."""
    spec = data_spec(vocab_size=512)
    data, tok = load_run_data(spec)
    cfg = get_preset("tiny").replace(vocab_size=tok.vocab_size, n_experts=4, top_k=2)
    tc = TrainConfig(steps=1, batch_size=4, seq_len=32, warmup_steps=1, eval_every=1,
                     eval_batches=2, log_every=1)
    train(build_model(cfg, device="meta"), data, tc, tmp_path / "moe", progress=False)
    logged = next(r for r in read_log(tmp_path / "moe") if r["step"] == 1)
    assert "val_loss" in logged  # the step did evaluate
    torch.manual_seed(tc.seed)  # train() draws the model from the seed, as build_model does
    replay = build_model(cfg)
    x, _ = data.train_batch(0, tc.batch_size, tc.seq_len, seed=tc.seed)
    replay(x)
    assert logged["load"] == expert_load(replay).tolist()


def test_the_rng_state_restores_the_cpu_stream_and_skips_a_gpu_stream_where_none_is():
    state = ckpt.rng_state()
    expected = torch.randn(5)
    if not torch.cuda.is_available():
        assert set(state) == {"torch"}  # no GPU stream is written where CUDA never ran
        state = {**state, "cuda": torch.zeros(16, dtype=torch.uint8)}  # as a GPU run wrote it
    ckpt.set_rng_state(state)
    assert torch.equal(torch.randn(5), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_rng_state_carries_the_gpu_stream_router_noise_draws_from():
    torch.randn(1, device="cuda")  # CUDA in use
    state = ckpt.rng_state()
    assert "cuda" in state
    expected = torch.randn(8, device="cuda")
    torch.randn(100, device="cuda")  # the stream moves on
    ckpt.set_rng_state(state)
    assert torch.equal(torch.randn(8, device="cuda"), expected)
