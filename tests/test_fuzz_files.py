"""Every file minimoe reads, mutated at random (hypothesis), through its reader: each example
either loads or is refused with one line (a ValueError, or an OSError naming its file), never
another exception. Seeds are the shipped files and the session's tiny runs. Examples per reader:
MINIMOE_FUZZ_EXAMPLES (default 12, derandomized so CI sees the same ones every time)."""

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_RUN, fuzz_examples
from minimoe import checkpoint as ckpt
from minimoe.cli import main
from minimoe.mixing import load_references
from minimoe.recipes.config import get_recipe
from minimoe.recipes.launch import load_launch_recipe
from minimoe.shards import load_shards, tokenize
from minimoe.sim.imbalance import histograms_from_log, imbalance_by_ep
from minimoe.sim.options import Options
from minimoe.sim.validate import load_runs, predict
from minimoe.tasks import load_task_file
from minimoe.tokens import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=fuzz_examples(12), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# values a clumsy or hostile hand puts into a file
TOML_VALUES = ["nan", "inf", "-inf", "0", "-1", "1e308", "-1e-308", "9223372036854775807", "0.5",
               '"x"', '""', '"../../../etc/passwd"', "true", "[]", "[1, -2]", "{}", "{a = 1}",
               "1_000_000_000_000", '"nan"']
JSON_VALUES = [math.nan, math.inf, -math.inf, 0, -1, 10**30, 2**63, 0.5, 1e-320, "x", "",
               "../../../etc/passwd", "/etc", True, False, None, [], [1, "a"], {}, {"a": [None]}]
_ASSIGNMENT = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*\s*=\s*)([^,}\n#]+)")


@st.composite
def toml_mutants(draw, text: str) -> str:
    """The text with one value replaced, a line dropped or the file cut short."""
    kind = draw(st.sampled_from(["value", "value", "value", "drop", "cut"]))
    if kind == "cut":
        return text[:draw(st.integers(0, len(text)))]
    if kind == "drop":
        lines = text.splitlines()
        del lines[draw(st.integers(0, len(lines) - 1))]
        return "\n".join(lines)
    spots = list(_ASSIGNMENT.finditer(text))
    spot = spots[draw(st.integers(0, len(spots) - 1))]
    return text[:spot.start(2)] + draw(st.sampled_from(TOML_VALUES)) + text[spot.end(2):]


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _paths(value, prefix + (key,))


@st.composite
def json_mutants(draw, data):
    """A deep copy of `data` with one value replaced or one key dropped (any depth)."""
    data = json.loads(json.dumps(data))
    path = draw(st.sampled_from([p for p in _paths(data) if p]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(st.sampled_from(JSON_VALUES))
    return data


def held(read):
    """`read()` loads, or refuses in one line: a ValueError, or an OSError naming its file."""
    try:
        read()
    except ValueError as err:
        assert str(err) and len(str(err).splitlines()) == 1, str(err)
    except OSError as err:
        assert err.filename, err


def cli_held(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 0 or (code == 2 and len(lines) == 1), (code, err.getvalue())


@contextlib.contextmanager
def copy_of(folder: Path):
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(shutil.copytree(folder, Path(tmp) / folder.name))


# --- the simulator's files ---------------------------------------------------------------------
SCENARIOS = sorted((ROOT / "sims").glob("*.toml"))


@FUZZ
@given(st.sampled_from(SCENARIOS).flatmap(
    lambda p: st.tuples(st.just(p), toml_mutants(p.read_text()))))
def test_scenario_files(case):
    path, text = case
    with tempfile.TemporaryDirectory() as tmp:
        mutant = Path(tmp) / path.name
        mutant.write_text(text)
        cli_held(["simulate", str(mutant)])


VALIDATION = sorted((ROOT / "sims" / "validation").glob("*.toml"))


@FUZZ
@given(st.sampled_from(VALIDATION).flatmap(
    lambda p: st.tuples(st.just(p), toml_mutants(p.read_text()))))
def test_validation_files(case):
    path, text = case
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / path.name).write_text(text)
        held(lambda: [predict(run, Options()) for run in load_runs(tmp)])


LAUNCH = sorted((ROOT / "scaling" / "full").glob("*.toml"))


@FUZZ
@given(st.sampled_from(LAUNCH).flatmap(lambda p: st.tuples(st.just(p), toml_mutants(p.read_text()))))
def test_launch_recipes(case):
    path, text = case
    with tempfile.TemporaryDirectory() as tmp:
        mutant = Path(tmp) / path.name
        mutant.write_text(text)

        def read():
            r = load_launch_recipe(mutant)
            assert r.steps > 0 and r.grad_accum > 0 and r.workload.global_batch > 0
        held(read)


RECIPE_FILES = sorted((ROOT / "scaling").glob("*.toml"))


@FUZZ
@given(st.sampled_from(RECIPE_FILES).flatmap(
    lambda p: st.tuples(st.just(p), toml_mutants(p.read_text()))))
def test_recipe_files(case):
    path, text = case
    with tempfile.TemporaryDirectory() as tmp:
        mutant = Path(tmp) / path.name
        mutant.write_text(text)
        held(lambda: get_recipe(str(mutant)))


# --- run folders ---------------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_config_and_run_json(tiny_run, data):
    name = data.draw(st.sampled_from(["config.json", "run.json"]))
    mutant = data.draw(json_mutants(json.loads((tiny_run / name).read_text())))
    with copy_of(tiny_run) as run:
        (run / name).write_text(json.dumps(mutant))
        cli_held(["generate", "--ckpt", str(run), "--prompt", "In", "--max-new-tokens", "1"])


@FUZZ
@given(st.data())
def test_state_json_on_resume(tiny_run, data):
    state = tiny_run / "ckpt" / "step_000002" / "state.json"
    mutant = data.draw(json_mutants(json.loads(state.read_text())))
    with copy_of(tiny_run) as run:
        (run / "model.safetensors").unlink()
        (run / "ckpt" / "step_000002" / "state.json").write_text(json.dumps(mutant))
        cli_held(["pretrain", *TINY_RUN, "--out", str(run)])


@FUZZ
@given(st.data())
def test_log_jsonl_on_resume(tiny_run, data):
    lines = (tiny_run / "log.jsonl").read_text().splitlines()
    n = data.draw(st.integers(0, len(lines) - 1))
    lines[n] = json.dumps(data.draw(json_mutants(json.loads(lines[n])))) \
        if data.draw(st.booleans()) else lines[n][:data.draw(st.integers(0, len(lines[n])))]
    with copy_of(tiny_run) as run:
        (run / "model.safetensors").unlink()
        (run / "log.jsonl").write_text("\n".join(lines))
        cli_held(["pretrain", *TINY_RUN, "--out", str(run)])


@FUZZ
@given(st.data())
def test_safetensors_header(tiny_run, data):
    raw = (tiny_run / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = data.draw(json_mutants(json.loads(raw[8:8 + size])))
    text = json.dumps(header).encode()
    if data.draw(st.booleans()):  # keep the length field true, or not
        text = text.ljust(size)[:size]
    mutated = len(text).to_bytes(8, "little") + text + raw[8 + size:]
    with copy_of(tiny_run) as run:
        (run / "model.safetensors").write_bytes(mutated)
        held(lambda: ckpt.load_model(run))


@FUZZ
@given(st.data())
def test_transform_json(tiny_moe_run, tiny_run, data):
    mutant = data.draw(json_mutants(json.loads((tiny_moe_run / "transform.json").read_text())))
    with copy_of(tiny_moe_run) as moe:
        (moe / "transform.json").write_text(json.dumps(mutant))
        cli_held(["scale-out", "--from", str(tiny_run), "--experts", "4", "--top-k", "2",
                  "--stream", "--out", str(moe)])


# --- data, tokenizers, tasks, references, routing logs ---------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "a.txt").write_text("\n\n".join(f"paragraph {i} " + "words of text " * 10
                                            for i in range(40)))
    out = root / "shards"
    tokenize([str(root / "a.txt")], out, vocab_size=300, val_fraction=0.2, shard_tokens=400,
             progress=False)
    return out


@FUZZ
@given(st.data())
def test_shard_manifests(shards, data):
    mutant = data.draw(json_mutants(json.loads((shards / "manifest.json").read_text())))
    with copy_of(shards) as folder:
        (folder / "manifest.json").write_text(json.dumps(mutant))

        def read():
            tokens, _ = load_shards(folder)
            tokens.train_batch(0, 2, 8)
            tokens.val_batches(2, 8, 1)
        held(read)


@FUZZ
@given(st.data())
def test_tokenizer_files(shards, data):
    mutant = data.draw(json_mutants(json.loads((shards / "tokenizer.json").read_text())))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(mutant))

        def read():
            tok = Tokenizer.load(tmp)
            tok.decode(tok.encode("some words of text 1"))
        held(read)


TASK = [{"context": "The sky is", "choices": [" blue", " green"], "answer": 0},
        {"context": "Two and two make", "answer": " four", "stop": ["\n"]}]


@FUZZ
@given(st.sampled_from(TASK).flatmap(json_mutants))
def test_task_files(record):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.jsonl"
        path.write_text(json.dumps(TASK[0]) + "\n" + json.dumps(record) + "\n")
        held(lambda: load_task_file(path))


@FUZZ
@given(json_mutants({"en-kjv": 5.1, "zh-pd1998": 6.0}))
def test_mix_references(mutant):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ref.json"
        path.write_text(json.dumps(mutant))
        held(lambda: load_references(str(path), ["en-kjv", "zh-pd1998"]))


ROUTING = ROOT / "sims" / "validation" / "routing" / "toy_upcycled.jsonl"


@FUZZ
@given(st.data())
def test_routing_logs(data):
    lines = ROUTING.read_text().splitlines()
    n = data.draw(st.integers(0, len(lines) - 1))
    lines[n] = json.dumps(data.draw(json_mutants(json.loads(lines[n]))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        path.write_text("\n".join(lines) + "\n")
        held(lambda: imbalance_by_ep(histograms_from_log(path), 8))
