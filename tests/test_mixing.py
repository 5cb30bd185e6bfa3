"""Data mixing by domain: static proportions, Sheared-LLaMA's dynamic rule, exact resume with
dynamic weights, and bad --mix values refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from minimoe import checkpoint as ckpt
from minimoe import mixing
from minimoe.cli import main
from minimoe.shards import load_data


@pytest.fixture(scope="module")
def demo_tokens():
    return load_data(vocab_size=512)[0]  # the cache the other training tests use


def test_static_weights_give_the_asked_proportions(demo_tokens):
    weights = mixing.resolve_mix("en-kjv=0.3,zh-pd1998=0.7", demo_tokens.domain_tokens())
    drawn = Counter()
    for step in range(300):
        starts, domains = demo_tokens.mixed_starts(step, 16, 64, 0, weights)
        drawn.update(domains)
        for start, domain in zip(starts, domains):
            low, high = demo_tokens.domain_ranges[domain]
            assert low <= start and start + 64 + 1 <= high  # the window stays in its domain
    share = drawn["en-kjv"] / sum(drawn.values())
    assert share == pytest.approx(0.3, abs=0.02)  # 4800 draws: 3 standard deviations is 0.02
    # and the rows are those windows, a pure function of (seed, step, weights)
    x, y = demo_tokens.train_batch(5, 4, 64, seed=0, weights=weights)
    starts, _ = demo_tokens.mixed_starts(5, 4, 64, 0, weights)
    assert x[0].tolist() == demo_tokens.arrays["train"][starts[0]:starts[0] + 64].tolist()
    other = {"en-kjv": 0.9, "zh-pd1998": 0.1}
    assert not (x == demo_tokens.train_batch(5, 4, 64, seed=0, weights=other)[0]).all()


def test_only_english_when_chinese_weighs_zero(demo_tokens):
    weights = mixing.resolve_mix("en-kjv=1", demo_tokens.domain_tokens())
    assert weights == {"en-kjv": 1.0, "zh-pd1998": 0.0}  # an unnamed domain weighs 0
    _, domains = demo_tokens.mixed_starts(0, 64, 32, 0, weights)
    assert set(domains) == {"en-kjv"}


def test_default_mix_is_proportional_to_size(demo_tokens):
    assert mixing.resolve_mix("size", demo_tokens.domain_tokens()) is None  # the plain sampler
    dynamic = mixing.resolve_mix("dynamic", demo_tokens.domain_tokens())
    sizes = demo_tokens.domain_tokens()
    assert dynamic["en-kjv"] == pytest.approx(sizes["en-kjv"] / sum(sizes.values()))


def test_dynamic_rule_moves_weight_toward_the_lagging_domain():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    references = {"a": 2.0, "b": 2.0, "c": 2.0}
    new = mixing.dynamic_update(weights, {"a": 2.1, "b": 2.9, "c": 1.5}, references, eta=1.0)
    assert sum(new.values()) == pytest.approx(1.0)
    assert new["b"] > weights["b"]  # furthest above its reference: gains
    assert new["a"] < weights["a"] and new["c"] < weights["c"]
    assert new["b"] / new["a"] == pytest.approx(0.3 / 0.5 * 2.718281828 ** 0.8)
    # every domain at or below its reference: a fixed point
    assert mixing.dynamic_update(weights, {"a": 2.0, "b": 1.0, "c": 1.9}, references, 1.0) \
        == pytest.approx(weights)


def test_references_from_a_file_or_a_run(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"a": 2.5, "b": 3.0}))
    assert mixing.load_references(str(path), ["a", "b"]) == {"a": 2.5, "b": 3.0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 9, "val_loss": 3, "val_a": 2.0, "val_b": 4.0}))
    assert mixing.load_references(str(run), ["a", "b"]) == {"a": 2.0, "b": 4.0}
    with pytest.raises(ValueError, match="the reference loss of domain 'c'"):
        mixing.load_references(str(path), ["a", "c"])


@pytest.mark.parametrize("mix, message", [
    ("fr=1", "unknown domain 'fr'; the data has en-kjv, zh-pd1998"),
    ("en-kjv=-0.2,zh-pd1998=1", "weight -0.2 of 'en-kjv' must be >= 0"),
    ("en-kjv=0,zh-pd1998=0", "the weights sum to 0"),
    ("en-kjv:1", "'en-kjv:1' is not domain=weight"),
])
def test_bad_mix_is_refused_in_one_line(mix, message, tmp_path, capsys):
    argv = ["pretrain", "--preset", "tiny", "--vocab-size", "512", "--steps", "1",
            "--out", str(tmp_path / "run"), "--mix", mix, "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err and f"mix={mix!r}" in err, err
    assert not (tmp_path / "run" / "run.json").exists()  # refused before anything is written


def test_dynamic_without_references_is_refused(tmp_path, capsys):
    argv = ["pretrain", "--preset", "tiny", "--vocab-size", "512", "--steps", "1",
            "--out", str(tmp_path / "run"), "--mix", "dynamic"]
    assert main(argv) == 2
    assert "dynamic mixing needs reference losses" in capsys.readouterr().err


# --- exact resume with dynamic weights (as tests/test_train.py's SIGKILL test) ----------------
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from minimoe.recipes.stages import data_spec, pretrain
    from minimoe.train import TrainConfig
    kill_at = int(os.environ.get("KILL_AT", "0"))
    def on_step(step, record):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    tc = TrainConfig(steps=24, batch_size=4, seq_len=32, warmup_steps=4, eval_every=12,
                     eval_batches=1, ckpt_every=8, log_every=1, mix="dynamic", mix_every=6,
                     mix_reference=sys.argv[2])
    pretrain("tiny", sys.argv[1], tc, data_spec(vocab_size=512), progress=False, on_step=on_step)
""")


def _run(out: Path, reference: Path, kill_at: int = 0) -> int:
    env = {**os.environ, "KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(out), str(reference)],
                          env=env).returncode


def _log(out: Path) -> dict[int, tuple]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["mix"]) for r in records if "loss" in r}


def test_resume_with_dynamic_weights_is_bit_exact(tmp_path):
    reference = tmp_path / "ref.json"  # English must reach 3.0 (it will not soon): it gains
    reference.write_text(json.dumps({"en-kjv": 3.0, "zh-pd1998": 100.0}))
    assert _run(tmp_path / "straight", reference) == 0
    assert _run(tmp_path / "killed", reference, kill_at=20) == -signal.SIGKILL
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_000016"
    assert _run(tmp_path / "killed", reference) == 0  # resumes at 16, after two updates
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 25)) and resumed == straight
    weights = [straight[step][1]["en-kjv"] for step in (1, 7, 13, 19)]
    assert weights == sorted(weights) and weights[0] < weights[-1]  # the weights did move
    state = ckpt.read_json(ckpt.latest_checkpoint(tmp_path / "straight") / "state.json")
    assert state["mix_weights"] == straight[24][1]
    assert (tmp_path / "straight" / "mix.png").stat().st_size > 0
