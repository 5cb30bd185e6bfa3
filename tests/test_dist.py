"""Distribution, on CPU with gloo: 2 processes started by the tests themselves (torchrun in a
subprocess, tests/dist_worker.py in each process). Where 2 CUDA GPUs are present the same tests
run with nccl and bf16; without them those cases are skipped with the reason.

Invariants: FSDP2, DDP and tensor parallelism give one process's loss trajectory on the same
global batch; an expert-parallel MoE computes one process's outputs and gradients; checkpoints move between 2
ranks and 1 process with the losses unchanged; a rank killed under torchrun --max-restarts
resumes from the last checkpoint with no step lost or repeated.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
N_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
DEVICES = [
    pytest.param("cpu", id="gloo"),
    pytest.param("cuda", id="nccl-bf16", marks=pytest.mark.skipif(
        N_GPUS < 2, reason=f"nccl needs 2 CUDA GPUs; this machine has {N_GPUS}")),
]
# gloo in fp32: the reductions differ from one process's only in summation order; bf16 on
# GPUs: FSDP2's bf16 parameters against one process's autocast
RTOL = {"cpu": 1e-5, "cuda": 3e-2}


def _env():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _run(command, expect_ok=True):
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _one(*args, expect_ok=True):
    return _run([sys.executable, str(WORKER), *args], expect_ok)


def _torchrun(*args, restarts=0, expect_ok=True):
    # --rdzv-endpoint localhost:0: torchrun takes a free port, so tests never collide
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
                 "--max-restarts", str(restarts), str(WORKER), *args], expect_ok)


def _device_args(device):
    return ["--device", device] + (["--bf16"] if device == "cuda" else [])


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, device):
    """The tiny model's 6 steps in one process: the trajectory every layout must give."""
    out = tmp_path_factory.mktemp("one") / "run"
    _one("train", str(out), *_device_args(device))
    return _losses(out)


def _assert_same(losses, reference, device):
    assert sorted(losses) == list(range(1, 7))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=RTOL[device]), step


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_data_parallel_gives_the_one_process_trajectory(tmp_path, device, one_process, parallel):
    _torchrun("train", str(tmp_path / "run"), "--parallel", parallel, *_device_args(device))
    _assert_same(_losses(tmp_path / "run"), one_process, device)


def test_tensor_parallel_gives_the_one_process_trajectory(tmp_path, device, one_process):
    """2 ranks splitting every matrix (tp 2, Megatron's column/row pairs as DTensors) see the
    same rows and train as one process; the final model is consolidated whole."""
    _torchrun("train", str(tmp_path / "run"), "--tp", "2", *_device_args(device))
    _assert_same(_losses(tmp_path / "run"), one_process, device)
    final = ckpt.load_tensors(tmp_path / "run" / "model.safetensors")
    assert final["layers.0.attn.q_proj.weight"].shape == (64, 64)  # whole, not a rank's half


def test_tensor_parallel_with_a_vocabulary_tp_does_not_divide(tmp_path, device):
    """511 tokens do not split in 2: the embedding and the LM head stay whole on each rank
    (the blocks are still split), and the trajectory is still one process's."""
    _one("train", str(tmp_path / "one"), "--vocab", "511", *_device_args(device))
    _torchrun("train", str(tmp_path / "tp"), "--tp", "2", "--vocab", "511", *_device_args(device))
    _assert_same(_losses(tmp_path / "tp"), _losses(tmp_path / "one"), device)


def test_a_tensor_parallel_checkpoint_resumes_in_one_process_and_back(tmp_path, device, one_process):
    run, args = tmp_path / "run", _device_args(device)
    _torchrun("train", str(run), "--tp", "2", "--kill-at", "3", *args, expect_ok=False)
    assert ckpt.is_sharded(ckpt.latest_checkpoint(run))
    _one("train", str(run), "--kill-at", "5", *args, expect_ok=False)  # DCP resharded to 1
    assert ckpt.latest_checkpoint(run).name == "step_000004"
    _torchrun("train", str(run), "--tp", "2", *args)  # safetensors split again over tp
    assert [r["step"] for r in _log(run) if "loss" in r] == list(range(1, 7))
    _assert_same(_losses(run), one_process, device)


def test_expert_parallel_moe_equals_one_process_moe(device):
    done = _torchrun("ep", *_device_args(device)[:2])
    assert done.stdout.count("equals the one-process MoE") == 2


def test_expert_parallel_training_gives_the_one_process_trajectory(tmp_path, device):
    """A tiny MoE on 2 ranks with each holding 2 of the 4 experts (FSDP2 + EP) trains as in one
    process: the experts' gradients are scaled to the mean over all the data, and clipping
    sees the norm over both meshes."""
    _one("train", str(tmp_path / "one"), "--moe", *_device_args(device))
    _torchrun("train", str(tmp_path / "ep"), "--moe", "--ep", "2", *_device_args(device))
    _assert_same(_losses(tmp_path / "ep"), _losses(tmp_path / "one"), device)
    assert ckpt.latest_checkpoint(tmp_path / "ep").joinpath(".metadata").exists()
    one = ckpt.load_tensors(tmp_path / "one" / "model.safetensors")
    ep = ckpt.load_tensors(tmp_path / "ep" / "model.safetensors")  # consolidated: all experts
    assert {k: v.shape for k, v in ep.items()} == {k: v.shape for k, v in one.items()}


def test_checkpoints_move_between_two_ranks_and_one_process(tmp_path, device, one_process):
    run = tmp_path / "run"
    args = _device_args(device)
    _torchrun("train", str(run), "--kill-at", "3", *args, expect_ok=False)  # both ranks die
    assert ckpt.latest_checkpoint(run).name == "step_000002"
    assert ckpt.is_sharded(ckpt.latest_checkpoint(run))  # written by 2 ranks with DCP
    model, _ = ckpt.load_model(run)  # an unfinished run's model, read in one process
    assert model.num_params() > 0
    _one("train", str(run), "--kill-at", "5", *args, expect_ok=False)  # resumed in 1 process
    assert ckpt.latest_checkpoint(run).name == "step_000004"
    assert not ckpt.is_sharded(ckpt.latest_checkpoint(run))  # one process: safetensors
    _torchrun("train", str(run), *args)  # and back on 2 ranks to the end
    steps = [r["step"] for r in _log(run) if "loss" in r]
    assert steps == list(range(1, 7))  # no step lost or repeated
    _assert_same(_losses(run), one_process, device)
    assert (run / "model.safetensors").exists()


def test_a_killed_rank_restarts_and_resumes_under_torchrun(tmp_path, device, one_process):
    """Rank 1 SIGKILLs itself after step 3 (checkpoint at 2); torchrun --max-restarts 1 starts
    both ranks again and they go on from step 2."""
    run = tmp_path / "run"
    _torchrun("train", str(run), "--kill-at", "3", "--kill-rank", "1", *_device_args(device),
              restarts=1)
    attempts = Path(f"{run}.attempts").read_text().split()
    assert sorted(attempts) == ["0", "0", "1", "1"]  # both ranks ran twice
    steps = [r["step"] for r in _log(run) if "loss" in r]
    assert steps == list(range(1, 7))
    _assert_same(_losses(run), one_process, device)


def test_layout_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="TrainConfig.parallel='zero'"):
        TrainConfig(parallel="zero")
    with pytest.raises(ValueError, match="TrainConfig.ep=0"):
        TrainConfig(ep=0)
    # expert parallelism in one process: refused before any work
    argv = ["pretrain", "--preset", "tiny", "--ep", "2", "--steps", "1", "--vocab-size", "512",
            "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ep=2" in err, err


def test_activation_checkpointing_keeps_the_trajectory(tmp_path):
    """Recomputing each block in backward changes memory, not numbers (one process)."""
    from minimoe.recipes.stages import data_spec, pretrain

    losses = {}
    for ac in (False, True):
        tc = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                         eval_batches=1, ckpt_every=3, log_every=1, activation_checkpointing=ac)
        pretrain("tiny", tmp_path / str(ac), tc, data_spec(vocab_size=512), progress=False)
        losses[ac] = _losses(tmp_path / str(ac))
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_activation_checkpointing_recomputes_each_block_in_backward():
    from minimoe import dist
    from minimoe.config import get_preset
    from minimoe.model import build_model

    x = torch.randint(0, 512, (2, 16))
    for ac, expected in ((False, 1), (True, 2)):
        model = build_model(get_preset("tiny"))
        dist.parallelize(model, None, activation_checkpointing=ac)
        calls = []
        model.layers[0].attn.register_forward_hook(lambda *args: calls.append(1))
        model(x).sum().backward()
        assert len(calls) == expected, ac  # forward, and again in backward when checkpointed
        with torch.no_grad():
            model(x)
        assert len(calls) == expected + 1  # evaluation saves nothing, recomputes nothing


@pytest.mark.parametrize("cfg, message", [
    (dict(n_experts=4), "tensor parallelism runs dense models"),
    (dict(n_kv_heads=1), "tp=2: must divide n_kv_heads=1"),
    (dict(d_ffn=175), "tp=2: must divide d_ffn=175"),
    (dict(tie_embeddings=True), "tied embeddings cannot be"),
])
def test_a_model_tensor_parallelism_cannot_split_is_refused_by_name(cfg, message):
    from minimoe.config import get_preset
    from minimoe.tensor_parallel import check_tensor_parallel

    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(get_preset("tiny").replace(**cfg), 2)


def test_sequence_parallel_needs_tp_to_divide_the_sequence():
    from minimoe.config import get_preset
    from minimoe.tensor_parallel import check_tensor_parallel

    check_tensor_parallel(get_preset("tiny"), 2, seq_len=32)
    with pytest.raises(ValueError, match=r"tp=2: must divide seq_len=33 \(sequence parallelism\)"):
        check_tensor_parallel(get_preset("tiny"), 2, seq_len=33)


def test_tensor_parallel_outside_torchrun_is_one_line(tmp_path, capsys):
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "r"), "--steps", "1",
                 "--tp", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("TrainConfig.tp=2: needs torchrun with a multiple of 2 processes")
