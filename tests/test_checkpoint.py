"""Checkpoints (minimoe/checkpoint.py, stream.py): what a run folder holds runs no code, a
sharded model reads only its own blocks, and a background save writes what a blocking one does.

Invariants: a pickle planted in any file of a run (and as a torch.distributed.checkpoint
`.metadata`) never executes, whatever command reads the run: each either works or refuses in
one line; the ranks of a sharded model together read each stored element once; a background
checkpoint's files equal a blocking one's."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from minimoe import checkpoint as ckpt
from minimoe import dist
from minimoe.cli import main
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.recipes.dry_run import fake_world
from minimoe.train import TrainConfig, make_optimizer, plan


class Payload:
    """Unpickling it creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A tiny run of 2 steps whose final model is gone: every reader goes to its checkpoint."""
    run = tmp_path_factory.mktemp("payload") / "run"
    argv = ["pretrain", "--preset", "tiny", "--vocab-size", "512", "--steps", "2", "--batch-size",
            "2", "--seq-len", "16", "--ckpt-every", "1", "--eval-every", "2", "--out", str(run),
            "--no-progress"]
    assert main(argv) == 0
    (run / "model.safetensors").unlink()
    return run, argv


COMMANDS = {
    "generate": lambda run, out: ["generate", "--ckpt", str(run), "--prompt", "And", "--max-new-tokens", "2"],
    "eval": lambda run, out: ["eval", "--ckpt", str(run), "--tasks", "ppl", "--ppl-chars", "200"],
    "scale-up": lambda run, out: ["scale-up", "--from", str(run), "--to", "tiny-large", "--method",
                                  "fpi", "--stream", "--out", str(out)],
    "scale-out": lambda run, out: ["scale-out", "--from", str(run), "--experts", "2", "--stream",
                                   "--out", str(out)],
    "pretrain --init": lambda run, out: ["pretrain", "--init", str(run), "--steps", "1", "--batch-size",
                                         "2", "--seq-len", "16", "--out", str(out), "--no-progress"],
}


@pytest.mark.parametrize("command", [*COMMANDS, "resume"])
def test_a_planted_pickle_never_runs(unfinished_run, tmp_path, command, capsys):
    """The attack of issue 23: a crafted DCP `.metadata` (and shard file) beside the newest
    checkpoint. Nothing reads them: each command works as if they were not there."""
    source, argv = unfinished_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    sentinel = tmp_path / "code-ran"
    latest = ckpt.latest_checkpoint(run)
    for name in (".metadata", "__0_0.distcp"):
        (latest / name).write_bytes(pickle.dumps(Payload(sentinel)))
    if command == "resume":
        argv = [a if a != str(source) else str(run) for a in argv]
    else:
        argv = COMMANDS[command](run, tmp_path / "out")
    assert main(argv) == 0, capsys.readouterr().err
    assert not sentinel.exists()


def test_a_pickle_in_any_file_of_a_run_is_refused_in_one_line(unfinished_run, tmp_path):
    """Every file the loaders read, replaced by a pickle: a one-line CheckpointError, no code."""
    source, _ = unfinished_run
    sentinel = tmp_path / "code-ran"
    files = [p for p in source.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert len(files) >= 8
    for planted in files:
        run = tmp_path / planted.relative_to(source).as_posix().replace("/", "_")
        shutil.copytree(source, run)
        (run / planted.relative_to(source)).write_bytes(pickle.dumps(Payload(sentinel)))
        try:
            model, _ = ckpt.load_model(run)
            latest = ckpt.latest_checkpoint(run)
            if latest is not None:
                ckpt.load_checkpoint(latest, model, make_optimizer(model, TrainConfig()))
        except ckpt.CheckpointError as err:
            assert len(str(err).splitlines()) == 1, planted
        assert not sentinel.exists(), planted


def test_each_rank_reads_only_its_blocks(tmp_path, monkeypatch):
    """A model sharded over 4 ranks (fake process group, real tensors) and filled from a file:
    rank 0 reads about a quarter of it (its shards), and what it reads is the stored values."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    whole = build_model(cfg)
    ckpt.save_tensors(tmp_path / "model.safetensors", ckpt.model_tensors(whole))
    read = []
    real_read_block = ckpt.read_block
    monkeypatch.setattr(ckpt, "read_block", lambda f, name, local, offset: (
        read.append(local.numel()), real_read_block(f, name, local, offset)))
    with fake_world(4):
        model = build_model(cfg, device="meta")
        plan(model, TrainConfig(), dist.build_mesh())
        model.to_empty(device="cpu")
        ckpt.load_into(model, tmp_path / "model.safetensors")
        for name, p in model.named_parameters():
            local = p.to_local()
            n = local.shape[0]
            expected = whole.get_parameter(name).detach()[:n] if n else local
            torch.testing.assert_close(local, expected, msg=name)  # rank 0 holds the first rows
    total = sum(p.numel() for p in whole.parameters())
    assert total / 4 <= sum(read) <= total / 4 * 1.1


def test_a_background_checkpoint_writes_what_a_blocking_one_does(tmp_path):
    torch.manual_seed(0)
    model = build_model(get_preset("tiny"))
    optimizer = make_optimizer(model, TrainConfig())
    model(torch.randint(0, 512, (2, 8)), targets=torch.randint(0, 512, (2, 8))).backward()
    optimizer.step()
    for folder, background in (("blocking", False), ("background", True)):
        ckpt.save_checkpoint(tmp_path / folder, 1, model, optimizer, {"tokens": 16},
                             background=background)
    ckpt.wait_for_checkpoint()
    for name in ("model", "optim", "rng_0"):
        a, b = (ckpt.load_tensors(tmp_path / f / "ckpt" / "step_000001" / f"{name}.safetensors")
                for f in ("blocking", "background"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(os.listdir(tmp_path / "background" / "ckpt")) == ["latest", "step_000001"]
