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


def _torchrun(*args, restarts=0, expect_ok=True, ranks=2):
    # --rdzv-endpoint localhost:0: torchrun takes a free port, so tests never collide
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
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
    """The tiny model's 6 steps in one process: the trajectory every layout must give (a
    vocabulary of 511, which tensor parallelism pads to 512)."""
    out = tmp_path_factory.mktemp("one") / "run"
    _one("train", str(out), "--vocab", "511", *_device_args(device))
    return out


@pytest.fixture(scope="module")
def one_process_moe(tmp_path_factory, device):
    out = tmp_path_factory.mktemp("one-moe") / "run"
    _one("train", str(out), "--moe", *_device_args(device))
    return out


def _assert_same(run: Path, reference: Path, device, weights: bool = True):
    """The same losses and gradient norms at every step and, after them, the same weights."""
    got, want = _log(run), _log(reference)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 7))
    for mine, theirs in zip(got, want):
        for key in ("loss", "grad_norm"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=RTOL[device]), (mine["step"], key)
    if weights:
        final, expected = (ckpt.load_tensors(r / "model.safetensors") for r in (run, reference))
        assert final.keys() == expected.keys()
        for name, tensor in expected.items():
            # The key bias's gradient is zero in exact arithmetic (softmax ignores a shift shared
            # by a query's logits): AdamW scales its rounding noise to steps of about lr. Noise in
            # other near-zero gradients moves a few weights by up to ~5e-6 (of ~2e-2) in 6 steps.
            if not name.endswith("k_proj.bias"):
                torch.testing.assert_close(final[name], tensor, rtol=RTOL[device],
                                           atol=1e-5 if device == "cpu" else 3e-2, msg=name)


def test_fsdp_with_gradient_accumulation_on_4_ranks_gives_one_process(tmp_path, device, one_process):
    """FSDP2 over 4 ranks, 2 micro-batches a step, gradients reduce-scattered after each."""
    _torchrun("train", str(tmp_path / "run"), "--vocab", "511", *_device_args(device), ranks=4)
    _assert_same(tmp_path / "run", one_process, device)


def test_ddp_gives_the_one_process_trajectory(tmp_path, device, one_process):
    _torchrun("train", str(tmp_path / "run"), "--parallel", "ddp", "--vocab", "511",
              *_device_args(device))
    _assert_same(tmp_path / "run", one_process, device)


def test_dp2_x_tp2_gives_one_process(tmp_path, device, one_process):
    """2 replicas of 2 ranks splitting every matrix (Megatron's column/row pairs as DTensors,
    the 511-token vocabulary padded to 512 and masked out of the loss): one process's run; the
    final model is stored whole, with its own vocabulary."""
    _torchrun("train", str(tmp_path / "run"), "--tp", "2", "--vocab", "511",
              *_device_args(device), ranks=4)
    _assert_same(tmp_path / "run", one_process, device)
    final = ckpt.load_tensors(tmp_path / "run" / "model.safetensors")
    assert final["layers.0.attn.q_proj.weight"].shape == (64, 64)  # whole, not a rank's half
    assert final["lm_head.weight"].shape[0] == 511  # no padding on disk


def test_dp2_x_ep2_gives_one_process(tmp_path, device, one_process_moe):
    """A tiny MoE on 4 ranks, 2 replicas of 2 expert-parallel ranks each holding 2 of the 4
    experts: the experts' gradients are the mean over all the data (on gloo by the fallback for
    PREMUL_SUM), and clipping sees the norm over both meshes."""
    _torchrun("train", str(tmp_path / "run"), "--moe", "--ep", "2", *_device_args(device),
              ranks=4)
    _assert_same(tmp_path / "run", one_process_moe, device)


def test_a_tensor_parallel_checkpoint_resumes_in_one_process_and_back(tmp_path, device, one_process):
    run, args = tmp_path / "run", ["--vocab", "511", *_device_args(device)]
    _torchrun("train", str(run), "--tp", "2", "--kill-at", "3", *args, expect_ok=False)
    assert json.loads((ckpt.latest_checkpoint(run) / "state.json").read_text())["world_size"] == 2
    _one("train", str(run), "--kill-at", "5", *args, expect_ok=False)  # read whole in one
    assert ckpt.latest_checkpoint(run).name == "step_000004"
    _torchrun("train", str(run), "--tp", "2", *args)  # and split again over tp
    _assert_same(run, one_process, device, weights=False)


def test_expert_parallel_moe_equals_one_process_moe(device):
    done = _torchrun("ep", *_device_args(device)[:2])
    assert done.stdout.count("equals the one-process MoE") == 2


def test_checkpoints_move_between_two_ranks_and_one_process(tmp_path, device, one_process):
    run = tmp_path / "run"
    args = ["--vocab", "511", *_device_args(device)]
    _torchrun("train", str(run), "--kill-at", "3", *args, expect_ok=False)  # both ranks die
    assert ckpt.latest_checkpoint(run).name == "step_000002"  # written by 2 ranks, each its part
    model, _ = ckpt.load_model(run)  # an unfinished run's model, read in one process
    assert model.num_params() > 0
    _one("train", str(run), "--kill-at", "5", *args, expect_ok=False)  # resumed in 1 process
    assert ckpt.latest_checkpoint(run).name == "step_000004"
    _torchrun("train", str(run), *args)  # and back on 2 ranks to the end
    _assert_same(run, one_process, device, weights=False)  # no step lost or repeated
    assert (run / "model.safetensors").exists()


def test_a_killed_rank_restarts_and_resumes_under_torchrun(tmp_path, device, one_process):
    """Rank 1 SIGKILLs itself after step 3 (checkpoint at 2); torchrun --max-restarts 1 starts
    both ranks again and they go on from step 2."""
    run = tmp_path / "run"
    _torchrun("train", str(run), "--kill-at", "3", "--kill-rank", "1", "--vocab", "511",
              *_device_args(device), restarts=1)
    attempts = Path(f"{run}.attempts").read_text().split()
    assert sorted(attempts) == ["0", "0", "1", "1"]  # both ranks ran twice
    _assert_same(run, one_process, device, weights=False)


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
        dist.Parallel(TrainConfig(activation_checkpointing=ac)).parallelize(model)
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


def test_activation_checkpointing_frees_each_moe_block_it_recomputes():
    """The MoE records its auxiliary losses in every forward, the recomputation in backward
    too, which kept that block's recomputed graph alive until the next step: ~0.44 GB a layer
    at 8x16B. After a step nothing of the forward may remain."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from minimoe.config import get_preset
    from minimoe.model import build_model
    from minimoe.train import make_optimizer, plan, train_step

    tc = TrainConfig(seq_len=64, activation_checkpointing=True)
    model = build_model(get_preset("tiny").replace(n_experts=4, top_k=2))
    parallel, optimizer = plan(model, tc, None), make_optimizer(model, tc)
    x = torch.randint(0, 512, (2, 64))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        train_step(parallel, optimizer, lambda micro: (x, x), tc)
        left = next(iter(tracker.get_tracker_snapshot("current").values()))
    left = {str(getattr(k, "value", k)): v for k, v in left.items()}
    # the batch (1 KB) and each layer's routing counts; a block's graph would be ~1 MB
    assert left.get("Activation", 0) < 2048 and not left.get("Temp")


def _fake_step(cfg, tc, world=8):
    """One step of `cfg` under `tc` rehearsed on a fake world: (model, rank 0's peak)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from minimoe import dist
    from minimoe.model import build_model
    from minimoe.recipes.dry_run import _propagation_apart, fake_world, measure
    from minimoe.train import make_optimizer, plan

    with fake_world(world):
        model = build_model(cfg, device="meta")
        parallel = plan(model, tc, dist.build_mesh(tc.ep, "cpu", tc.tp))
        with FakeTensorMode(allow_non_fake_inputs=True), _propagation_apart():
            model.to_empty(device="cpu")
            x = torch.randint(0, cfg.vocab_size, (2, tc.seq_len))
            return model, measure(parallel, make_optimizer(model, tc), lambda micro: (x, x), tc)


@pytest.mark.parametrize("every", [True, False])
def test_gradients_stay_sharded_between_micro_batches_and_the_simulator_knows(every):
    """FSDP2 reduce-scatters after every micro-batch (each rank keeps 1/8 of the gradients in
    fp32), or, asked to reduce once per step, holds them whole in between; the rehearsal sees
    it and the simulator prices the same."""
    from minimoe.config import get_preset
    from minimoe.recipes.launch import ENGINE_OPTIONS
    from minimoe.sim.cost import simulate
    from minimoe.sim.hardware import get_device
    from minimoe.sim.layout import Layout, Workload

    cfg = get_preset("toy-small")
    tc = TrainConfig(seq_len=64, grad_accum=2, reduce_every_micro_batch=every)
    _, peak = _fake_step(cfg, tc)
    params = cfg.param_counts()["total"]
    assert peak["grads"] == pytest.approx(4 * params / (8 if every else 1), rel=0.05)
    options = ENGINE_OPTIONS.replace(reduce_every_micro_batch=every, act_bytes=4)
    sim = simulate(Workload(cfg, 32, 64), Layout(dp=8, zero=3, micro_batch=2), get_device("h100"),
                   options)
    assert sim.memory["grads"] == pytest.approx(peak["grads"], rel=0.05)


def test_an_moe_layer_copies_to_the_host_once_and_units_prefetch_under_ep(monkeypatch):
    """On fake tensors any value read on the host fails, so a forward and backward that run
    there read only through moe.to_host: once per MoE layer (the split sizes of the
    all-to-all). The embedding and the norm with the head are FSDP2 units of their own, and
    with experts parallel each unit prefetches the next."""
    from torch.distributed.fsdp import FSDPModule

    from minimoe import moe
    from minimoe.config import get_preset

    calls = []
    real = moe.to_host
    monkeypatch.setattr(moe, "to_host", lambda *a: calls.append(1) or real(*a))
    import minimoe.expert_parallel as expert_parallel
    monkeypatch.setattr(expert_parallel, "to_host", moe.to_host)
    cfg = get_preset("tiny").replace(n_experts=4, top_k=2)
    model, _ = _fake_step(cfg, TrainConfig(seq_len=64, ep=2, bf16=True), world=4)
    assert len(calls) == cfg.n_moe_layers  # in forward; backward reuses the split sizes
    assert isinstance(model.embed, FSDPModule) and isinstance(model.lm_head, FSDPModule)
    order = [model.embed, *(m for block in model.layers for m in (block, block.mlp)), model.norm]
    states = [m._get_fsdp_state() for m in order]  # (each MoE's experts: a unit over dp)
    for unit, after in zip(states, states[1:]):
        assert after in unit._states_to_forward_prefetch
