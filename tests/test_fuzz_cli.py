"""Bad input to the `minimoe` command as a clumsy or a hostile user gives it (issue 23): every
case is refused with one line on stderr naming the problem and exit code 2, never a traceback,
never a silent success. Run folders are copied from the session's tiny runs and then spoiled."""

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN
from minimoe.cli import main

BIG = str(10**12)


def _tensors(run: Path, change):
    path = run / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _first(tensors):
    return tensors[sorted(tensors)[0]]


def _json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _unfinished(run: Path):
    """The run as a kill left it: checkpoints, no final model."""
    (run / "model.safetensors").unlink()


def _state(change):
    def mutate(run):
        _unfinished(run)
        _json(run / "ckpt" / "step_000002" / "state.json", change)
    return mutate


def _write(name: str, data: bytes | str):
    def mutate(run):
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return mutate


def _fifo(run: Path):
    os.mkfifo(run / "pipe.txt")


def _text(run: Path):
    (run / "a.txt").write_text("\n\n".join(f"paragraph {i}: " + "some words again " * 8 for i in range(20)))


def _unwritable() -> str:
    """A folder nobody may create: /sys refuses even root."""
    return "/sys/minimoe-out"


# (id, argv with {run} {moe} {dir}, how the copy of the run is spoiled, words the line must hold)
RESUME = ["pretrain", *TINY_RUN, "--out", "{run}"]
GENERATE = ["generate", "--ckpt", "{run}", "--prompt", "In the", "--max-new-tokens", "2"]
EVAL = ["eval", "--ckpt", "{run}", "--tasks", "ppl", "--ppl-chars", "200", "--limit", "2",
        "--no-progress"]
INIT = ["pretrain", "--init", "{run}", "--steps", "1", "--out", "{dir}/cpt", "--no-progress"]
TOKENIZE = ["tokenize", "--data", "{run}/a.txt", "--out", "{dir}/s", "--no-progress"]
SCALE_OUT = ["scale-out", "--from", "{run}", "--experts", "4", "--stream", "--out", "{dir}/m2"]
CASES = [
    # --- options ------------------------------------------------------------------------
    ("info-unknown-preset", ["info", "--preset", "nope"], None, "nope"),
    ("pretrain-steps-0", ["pretrain", "--preset", "tiny", "--steps", "0", "--out", "{dir}/o"], None, "steps"),
    ("pretrain-lr-nan", ["pretrain", "--preset", "tiny", "--lr", "nan", "--out", "{dir}/o"], None, "lr"),
    ("pretrain-lr-inf", ["pretrain", "--preset", "tiny", "--lr", "inf", "--out", "{dir}/o"], None, "lr"),
    ("pretrain-batch-0", ["pretrain", "--preset", "tiny", "--batch-size", "0", "--out", "{dir}/o"], None, "batch"),
    ("pretrain-batch-huge", ["pretrain", "--preset", "tiny", "--batch-size", BIG, "--out", "{dir}/o"], None, "batch"),
    ("pretrain-seq-huge", ["pretrain", "--preset", "tiny", "--seq-len", BIG, "--out", "{dir}/o"], None, "seq"),
    ("pretrain-vocab-0", ["pretrain", "--preset", "tiny", "--vocab-size", "0", "--out", "{dir}/o"], None, "vocab"),
    ("pretrain-vocab-huge", ["pretrain", "--preset", "tiny", "--vocab-size", BIG, "--out", "{dir}/o"], None, "vocab"),
    ("pretrain-warmup-negative", ["pretrain", "--preset", "tiny", "--warmup", "-1", "--out", "{dir}/o"], None, "warmup"),
    ("pretrain-mix-eta-inf", ["pretrain", "--preset", "tiny", "--mix-eta", "inf", "--out", "{dir}/o"], None, "mix"),
    ("pretrain-mix-garbage", ["pretrain", "--preset", "tiny", "--mix", "a==b", "--out", "{dir}/o"], None, "mix"),
    ("pretrain-device-bad", ["pretrain", "--preset", "tiny", "--device", "toaster", "--out", "{dir}/o"], None, "device"),
    ("pretrain-ep-without-torchrun", ["pretrain", "--preset", "tiny", "--ep", "2", "--out", "{dir}/o"], None, "ep"),
    ("pretrain-data-empty", ["pretrain", "--preset", "tiny", "--data", "", "--out", "{dir}/o"], None, "data"),
    ("pretrain-data-device", ["pretrain", "--preset", "tiny", "--data", "/dev/null", "--out", "{dir}/o"], None, "/dev/null"),
    ("pretrain-data-fifo", ["pretrain", "--preset", "tiny", "--data", "{run}/pipe.txt", "--out", "{dir}/o"], _fifo, "pipe.txt"),
    ("pretrain-data-missing", ["pretrain", "--preset", "tiny", "--data", "{dir}/none.txt", "--out", "{dir}/o"], None, "none.txt"),
    ("pretrain-data-binary", ["pretrain", "--preset", "tiny", "--data", "{run}/x.txt", "--out", "{dir}/o"],
     _write("x.txt", b"\xff\xfe\x00" * 100), "x.txt"),
    ("pretrain-out-unwritable", ["pretrain", "--preset", "tiny", "--out", _unwritable()], None, "minimoe-out"),
    ("pretrain-out-is-a-file", ["pretrain", "--preset", "tiny", "--out", "{run}/config.json"], None, "config.json"),
    ("pretrain-init-tokenizer", ["pretrain", "--init", "{run}", "--tokenizer", "byte", "--out", "{dir}/o"], None, "tokenizer"),
    ("pretrain-init-vocab", ["pretrain", "--init", "{run}", "--vocab-size", "300", "--out", "{dir}/o"], None, "vocab"),
    ("pretrain-mix-reference-nan", ["pretrain", "--preset", "tiny", "--mix", "dynamic", "--mix-reference",
                                    "{run}/ref.json", "--out", "{dir}/o"],
     _write("ref.json", '{"en-kjv": NaN, "zh-pd1998": 5}'), "ref.json"),
    ("pretrain-mix-reference-bool", ["pretrain", "--preset", "tiny", "--mix", "dynamic", "--mix-reference",
                                     "{run}/ref.json", "--out", "{dir}/o"],
     _write("ref.json", '{"en-kjv": true, "zh-pd1998": 5}'), "ref.json"),
    ("scale-out-router-std-nan", [*SCALE_OUT, "--router-std", "nan"], None, "router"),
    ("scale-out-router-std-negative", [*SCALE_OUT, "--router-std", "-1"], None, "router"),
    ("scale-out-router-std-zero", [*SCALE_OUT, "--router-std", "0"], None, "router"),
    ("scale-out-experts-0", ["scale-out", "--from", "{run}", "--experts", "0", "--out", "{dir}/m"], None, "experts"),
    ("scale-out-experts-huge", ["scale-out", "--from", "{run}", "--experts", BIG, "--out", "{dir}/m"], None, "experts"),
    ("scale-out-top-k-over", ["scale-out", "--from", "{run}", "--experts", "4", "--top-k", "5", "--out", "{dir}/m"], None, "top_k"),
    ("scale-out-scale-nan", ["scale-out", "--from", "{run}", "--method", "split-random", "--scale", "nan",
                             "--out", "{dir}/m"], None, "scale"),
    ("scale-out-calib-huge", ["scale-out", "--from", "{run}", "--method", "split-importance",
                              "--calib-batches", BIG, "--out", "{dir}/m"], None, "calib"),
    ("scale-out-into-unfinished-run", ["scale-out", "--from", "{moe}", "--experts", "4", "--stream", "--out", "{run}"],
     _unfinished, "out"),
    ("scale-out-into-foreign-folder", [*SCALE_OUT[:-1], "{run}/ckpt"], None, "out"),
    ("scale-up-unknown-target", ["scale-up", "--from", "{run}", "--to", "nope", "--out", "{dir}/g"], None, "nope"),
    ("scale-up-into-a-run", ["scale-up", "--from", "{run}", "--to", "tiny-large", "--stream", "--out", "{moe}"],
     None, "out"),
    ("generate-temperature-nan", [*GENERATE, "--temperature", "nan"], None, "temperature"),
    ("generate-temperature-inf", [*GENERATE, "--temperature", "inf"], None, "temperature"),
    ("generate-top-p-nan", [*GENERATE, "--top-p", "nan"], None, "top"),
    ("generate-tokens-huge", ["generate", "--ckpt", "{run}", "--prompt", "x", "--max-new-tokens", BIG], None, "max"),
    ("generate-samples-huge", [*GENERATE, "--num-samples", BIG], None, "samples"),
    ("eval-limit-0", [*EVAL, "--limit", "0"], None, "limit"),
    ("eval-batch-huge", [*EVAL, "--batch-size", BIG], None, "batch"),
    ("eval-tasks-empty", ["eval", "--ckpt", "{run}", "--tasks", ""], None, "tasks"),
    ("eval-task-file-missing", ["eval", "--ckpt", "{run}", "--tasks", "{dir}/t.jsonl"], None, "t.jsonl"),
    ("eval-out-unwritable", [*EVAL, "--out", _unwritable() + "/r.json"], None, "minimoe-out"),
    ("eval-out-a-folder", [*EVAL, "--out", "{run}/ckpt"], None, "ckpt"),
    ("experts-of-a-dense-run", ["experts", "--ckpt", "{run}"], None, "MoE"),
    ("experts-batches-0", ["experts", "--ckpt", "{moe}", "--batches", "0"], None, "batches"),
    ("experts-seq-huge", ["experts", "--ckpt", "{moe}", "--seq-len", BIG], None, "seq"),
    ("experts-out-unwritable", ["experts", "--ckpt", "{moe}", "--out", _unwritable()], None, "minimoe-out"),
    ("tokenize-val-nan", [*TOKENIZE, "--val-fraction", "nan"], _text, "val"),
    ("tokenize-shard-0", [*TOKENIZE, "--shard-tokens", "0"], _text, "shard"),
    ("tokenize-vocab-huge", [*TOKENIZE, "--vocab-size", BIG], _text, "vocab"),
    ("tokenize-tokenizer-garbage", ["tokenize", "--data", "{run}/a.txt", "--tokenizer", "{run}/tok.json",
                                    "--out", "{dir}/s"],
     lambda r: (_write("tok.json", "{\"model\": 1}")(r), _write("a.txt", "word " * 40)(r)), "tok.json"),
    ("tokenize-data-fifo", ["tokenize", "--data", "{run}/pipe.txt", "--out", "{dir}/s"], _fifo, "pipe.txt"),
    ("flops-seq-0", ["flops", "--preset", "tiny", "--seq", "0"], None, "seq"),
    ("flops-seq-huge", ["flops", "--preset", "tiny", "--seq", BIG, "--check"], None, "seq"),
    ("plan-gpus-0", ["plan", "--preset", "tiny", "--gpus", "0"], None, "gpus"),
    ("plan-gpus-huge", ["plan", "--preset", "tiny", "--gpus", BIG], None, "gpus"),
    ("plan-batch-tokens-0", ["plan", "--preset", "tiny", "--gpus", "8", "--batch-tokens", "0"], None, "batch"),
    ("plan-set-nan", ["plan", "--preset", "tiny", "--gpus", "8", "--set", "gemm_efficiency=nan"], None, "gemm"),
    ("plan-set-unknown", ["plan", "--preset", "tiny", "--gpus", "8", "--set", "nope=1"], None, "nope"),
    ("plan-imbalance-log-missing", ["plan", "--preset", "aquila-8x1.8b", "--gpus", "8", "--set",
                                    "imbalance_log={dir}/none"], None, "none"),
    ("simulate-missing", ["simulate", "{dir}/none.toml"], None, "none.toml"),
    ("simulate-a-folder", ["simulate", "{run}"], None, "run"),
    ("simulate-binary", ["simulate", "{run}/model.safetensors"], None, "model.safetensors"),
    ("validate-a-file", ["validate", "{run}/config.json"], None, "config.json"),
    ("validate-missing", ["validate", "{dir}/none"], None, "none"),
    ("dry-run-missing", ["dry-run", "{dir}/none.toml"], None, "none.toml"),
    ("pipeline-recipe-names-itself", ["pipeline", "--preset", "{run}/r.toml", "--out", "{dir}/p"],
     lambda r: _write("r.toml", f'preset = "{r}/r.toml"\n')(r), "preset"),
    ("pipeline-recipe-bad-model", ["pipeline", "--preset", "{run}/r.toml", "--out", "{dir}/p"],
     _write("r.toml", 'preset = "tiny"\nlarge = "nope"\n'), "nope"),
    ("experiment-dense-run-missing", ["experiment", "scale-out", "--quick", "--dense-run", "{dir}/none",
                                      "--out", "{dir}/e"], None, "none"),
    # --- a run folder spoiled, read by every command that reads runs --------------------------
    *[(f"{cmd}-weights-{kind}", argv, lambda r, v=value: _tensors(r, lambda t: _first(t).fill_(v)), "tensor")
      for kind, value in (("nan", float("nan")), ("inf", float("inf")))
      for cmd, argv in (("generate", GENERATE), ("eval", EVAL), ("init", INIT))],
    ("generate-weights-integer", GENERATE, lambda r: _tensors(
        r, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()})), "tensor"),
    ("generate-weights-truncated", GENERATE, lambda r: (r / "model.safetensors").write_bytes(
        (r / "model.safetensors").read_bytes()[:5000]), "model.safetensors"),
    ("generate-weights-a-folder", GENERATE, lambda r: ((r / "model.safetensors").unlink(),
                                                        (r / "model.safetensors").mkdir()), "model.safetensors"),
    ("generate-config-garbage", GENERATE, _write("config.json", "{"), "config.json"),
    ("generate-config-types", GENERATE, lambda r: _json(r / "config.json", lambda c: c.update(n_layers="2")),
     "n_layers"),
    ("generate-config-huge", GENERATE, lambda r: _json(r / "config.json", lambda c: c.update(d_model=2**40)),
     "d_model"),
    ("generate-run-json-list", GENERATE, _write("run.json", "[1, 2]"), "run.json"),
    ("eval-run-data-garbage", EVAL, lambda r: _json(r / "run.json", lambda m: m.update(data=7)), "data"),
    ("eval-run-data-paths-garbage", EVAL, lambda r: _json(
        r / "run.json", lambda m: m.update(data={**m["data"], "paths": [3]})), "paths"),
    ("scale-out-run-json-garbage", SCALE_OUT, _write("run.json", "\xff"), "run.json"),
    ("resume-state-step-later", RESUME, _state(lambda s: s.update(step=99)), "step"),
    ("resume-state-step-string", RESUME, _state(lambda s: s.update(step="2")), "step"),
    ("resume-state-tokens-negative", RESUME, _state(lambda s: s.update(tokens=-5)), "tokens"),
    ("resume-state-mix-garbage", RESUME, _state(lambda s: s.update(mix_weights=[1])), "mix"),
    ("resume-state-not-json", RESUME, lambda r: (_unfinished(r), _write("ckpt/step_000002/state.json", "{")(r)),
     "state.json"),
    ("resume-rng-garbage", RESUME, lambda r: (_unfinished(r), _write("ckpt/step_000002/rng_0.safetensors",
                                                                     b"\x08" + b"\x00" * 20)(r)), "rng"),
    ("resume-rng-wrong-dtype", RESUME, lambda r: (_unfinished(r), save_file(
        {"torch": torch.zeros(3)}, str(r / "ckpt/step_000002/rng_0.safetensors"))), "rng"),
    ("resume-latest-outside", RESUME, lambda r: (_unfinished(r), _write("ckpt/latest", "../../x/ckpt/step_000002")(r)),
     "latest"),
    ("generate-latest-outside", GENERATE, lambda r: (_unfinished(r), _write("ckpt/latest", "/etc")(r)), "latest"),
    ("resume-log-not-records", RESUME, lambda r: (_unfinished(r), _write("log.jsonl", "[1]\n7\n")(r)), None),
]
SUCCEEDS = [  # faults the command survives: exit 0
    ("resume-latest-missing", RESUME, lambda r: (_unfinished(r), (r / "ckpt" / "latest").unlink())),
    ("resume-latest-dangling", RESUME, lambda r: (_unfinished(r), _write("ckpt/latest", "step_000009")(r))),
    ("resume-log-torn", RESUME, lambda r: (_unfinished(r), _write("log.jsonl", (r / "log.jsonl").read_text()
                                                                  + '{"step": 3, "lo')(r))),
    ("generate-temperature-tiny", [*GENERATE, "--temperature", "1e-30", "--top-p", "1e-30"], None),
    ("generate-latest-missing", GENERATE, lambda r: (_unfinished(r), (r / "ckpt" / "latest").unlink())),
]


def _argv(argv, run: Path, moe: Path, folder: Path) -> list[str]:
    return [a.format(run=run, moe=moe, dir=folder) for a in argv]


@pytest.fixture
def runs(tiny_run, tiny_moe_run, tmp_path):
    """Copies of the session's runs, free to spoil."""
    run, moe = tmp_path / "run", tmp_path / "moe"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_moe_run, moe)
    return run, moe, tmp_path


class Hang(BaseException):
    pass


def _cli(argv, capsys, seconds=60) -> tuple[int, str, str]:
    def hang(*_):
        raise Hang(f"{argv} still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, spoil, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, spoil, words, runs, capsys):
    run, moe, folder = runs
    if spoil is not None:
        spoil(run)
    code, _, err = _cli(_argv(argv, run, moe, folder), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert words is None or words.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("argv, spoil", [c[1:] for c in SUCCEEDS], ids=[c[0] for c in SUCCEEDS])
def test_faults_a_command_survives(argv, spoil, runs, capsys):
    run, moe, folder = runs
    if spoil is not None:
        spoil(run)
    code, _, err = _cli(_argv(argv, run, moe, folder), capsys)
    assert code == 0 and "Traceback" not in err, err


# --- any value to any option (hypothesis): success, or one line and exit 2 -------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from minimoe.cli import build_parser  # noqa: E402

WEIRD = ["nan", "inf", "-inf", "-1", "0", "-0", "1.5", "1e999", "99999999999999999999", "0x10",
         "", " ", "abc", "None", "../..", "/dev/null", "\u00e9\u4e2d", "--", "1,2", "=", "a=b,c"]
BASES = {  # a cheap, valid call of each command (cheap also when the fuzzed value is valid)
    "pretrain": ["pretrain", "--preset", "tiny", "--vocab-size", "512", "--steps", "1",
                 "--batch-size", "1", "--seq-len", "8", "--no-progress", "--out", "{dir}/o"],
    "generate": GENERATE, "eval": EVAL,
    "experts": ["experts", "--ckpt", "{moe}", "--batches", "1", "--batch-size", "2", "--seq-len",
                "16", "--out", "{dir}/e"],
    "scale-out": SCALE_OUT,
    "scale-up": ["scale-up", "--from", "{run}", "--to", "tiny-large", "--stream", "--out", "{dir}/g"],
    "tokenize": [*TOKENIZE, "--tokenizer", "byte"],
    "flops": ["flops", "--preset", "tiny"], "plan": ["plan", "--preset", "tiny", "--gpus", "8"],
    "info": ["info", "--preset", "tiny"], "simulate": ["simulate", str(Path(__file__).parents[1] / "sims/aquilamoe_table6.toml")],
}
SLOW_IF_VALID = {"--steps", "--warmup", "--eval-every", "--ckpt-every", "--log-every"}


def _options(command: str) -> list[str]:
    sub = next(a for a in build_parser(command)._actions if a.dest == "command")
    return sorted(s for a in sub.choices[command]._actions if a.nargs != 0
                  for s in a.option_strings if s.startswith("--") and s not in SLOW_IF_VALID)


OPTIONS = [(command, option) for command in BASES for option in _options(command)]


@settings(max_examples=fuzz_examples(30), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(OPTIONS), st.sampled_from(WEIRD))
def test_any_value_to_any_option(tiny_run, tiny_moe_run, tmp_path_factory, option, value):
    (command, flag), folder = option, tmp_path_factory.mktemp("fuzz")
    _text(folder)
    argv = _argv(BASES[command], tiny_run, tiny_moe_run, folder)
    argv = [a.replace(f"{tiny_run}/a.txt", f"{folder}/a.txt") for a in argv] + [flag, value]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.chdir(folder):  # a fuzzed --out (say "inf") lands in the test's folder
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 0 or (code == 2 and len(lines) == 1), (argv, code, err.getvalue())
