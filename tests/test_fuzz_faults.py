"""Faults around a command, each real: a second process on the same --out, a holder killed, a
file-size limit (as a full disk), a folder nobody may write, Ctrl-C between a stage's files.
Each ends in one line and exit 2 (130 for Ctrl-C), and nothing is lost: a re-run finishes."""

import io
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from conftest import TINY_RUN
from minimoe import checkpoint as ckpt
from minimoe import files
from minimoe.cli import main
from minimoe.config import get_preset
from minimoe.model import build_model
from minimoe.train import TrainConfig, make_optimizer

HOLD = textwrap.dedent("""
    import sys, time
    from minimoe.files import run_lock
    with run_lock(sys.argv[1], "minimoe test --out " + sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")
SCALE_OUT = ["scale-out", "--experts", "4", "--top-k", "2", "--stream"]


def _cli(argv) -> tuple[int, list[str]]:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


def test_a_second_process_on_the_same_out_is_refused_and_a_dead_holders_lock_taken_over(
        tiny_run, tmp_path):
    out = tmp_path / "moe"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == b"held"
        code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
        assert code == 2 and len(lines) == 1 and f"in use by pid {holder.pid}" in lines[0], lines
        assert not out.exists()  # nothing was written by the refused command
    finally:
        holder.kill()  # a kill: its lock stays behind, naming a process that is gone
        holder.wait()
    assert Path(f"{out}.lock").exists()
    code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
    assert code == 0 and "taking over" in lines[0] and str(holder.pid) in lines[0], lines
    assert (out / "transform.json").exists() and not Path(f"{out}.lock").exists()


def test_a_file_size_limit_is_one_line_naming_the_file_and_a_rerun_finishes(tiny_run, tmp_path):
    """`ulimit -f`: writes past the limit fail with EFBIG (the command ignores SIGXFSZ), as a
    full disk fails them with ENOSPC."""
    out = tmp_path / "moe"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # the MoE's weights are ~1.4 MB
    try:
        code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2 and len(lines) == 1 and "model.safetensors" in lines[0], lines
    assert not any(p.name.endswith(".tmp.safetensors") for p in out.iterdir())  # no half file
    code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
    assert code == 0, lines


def test_an_out_nobody_may_write_is_refused_before_any_work(tiny_run, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere: /sys refuses even root
        folder = Path("/sys/minimoe")
    code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(folder / "moe")])
    assert code == 2 and len(lines) == 1 and "cannot write here" in lines[0], lines


def test_ctrl_c_between_a_stages_files_leaves_it_unfinished_and_a_rerun_redoes_it(
        tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "moe"
    real = files.write_text

    def interrupted(path, text):  # the model file is written; Ctrl-C before config.json
        if Path(path).name == "config.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(files, "write_text", interrupted)
    code, lines = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
    assert code == 130 and lines == ["minimoe scale-out: interrupted"]
    assert (out / "model.safetensors").exists() and '"finished": false' in \
        (out / "transform.json").read_text()
    monkeypatch.setattr(files, "write_text", real)
    code, _ = _cli([*SCALE_OUT, "--from", str(tiny_run), "--out", str(out)])
    assert code == 0 and '"finished": true' in (out / "transform.json").read_text()
    assert not Path(f"{out}.lock").exists()


def test_a_lost_latest_pointer_resumes_from_the_newest_checkpoint_and_says_so(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model.safetensors").unlink()
    (run / "ckpt" / "latest").unlink()  # a kill between the folder's rename and the pointer
    log = (run / "log.jsonl").read_text()
    code, lines = _cli(["pretrain", *TINY_RUN, "--out", str(run)])
    assert code == 0 and "missing; using step_000002" in lines[0], lines
    assert (run / "log.jsonl").read_text() == log  # nothing redone from step 0


def test_pruning_goes_by_step_number_and_never_removes_the_checkpoint_just_written(tmp_path):
    model = build_model(get_preset("tiny"))
    optimizer = make_optimizer(model, TrainConfig())
    (tmp_path / "ckpt" / "step_5000000").mkdir(parents=True)  # a later step's, by hand
    state = {"tokens": 0, "train_time": 0.0}
    for step in (999_999, 1_000_000):  # by name, step_1000000 sorts before step_999999
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, state, keep=1)
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert kept == ["step_1000000", "step_5000000"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_1000000"


def test_shards_retokenised_in_place_are_refused_on_resume_and_on_init(tmp_path):
    def text(words):
        (tmp_path / "a.txt").write_text("\n\n".join(f"paragraph {i}: " + words * 8
                                                    for i in range(40)))

    text("words of some text ")
    tokenize = ["tokenize", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "shards"),
                "--val-fraction", "0.2", "--no-progress"]
    run = ["pretrain", "--preset", "tiny", "--data", str(tmp_path / "shards"), "--steps", "1",
           "--batch-size", "2", "--seq-len", "16", "--no-progress", "--out", str(tmp_path / "run")]
    assert _cli([*tokenize, "--vocab-size", "300"])[0] == 0 and _cli(run)[0] == 0
    shutil.rmtree(tmp_path / "shards")
    text("other words in another text ")
    assert _cli([*tokenize, "--vocab-size", "300"])[0] == 0  # other ids, the same vocabulary
    code, lines = _cli(run)
    assert code == 2 and len(lines) == 1 and "data differs" in lines[0], lines
    code, lines = _cli(["pretrain", "--init", str(tmp_path / "run"), "--steps", "1",
                        "--out", str(tmp_path / "cpt")])
    assert code == 2 and len(lines) == 1 and "re-tokenised" in lines[0], lines
