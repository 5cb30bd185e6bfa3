"""Test settings: nothing downloads, runs are deterministic and small, notebooks run quick."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# the one parameter of every notebook (minimoe/notebook.py): nbmake's kernels inherit it, so the
# suite executes each notebook in quick mode; a reader runs the full one
os.environ["MINIMOE_NOTEBOOK_QUICK"] = "1"


import pytest  # noqa: E402  (the fixtures below; the settings above come first)

def fuzz_examples(default: int) -> int:
    """Hypothesis examples of a fuzzing test: small in CI, MINIMOE_FUZZ_EXAMPLES for a long hunt."""
    return int(os.environ.get("MINIMOE_FUZZ_EXAMPLES", default))


TINY_RUN = ["--preset", "tiny", "--vocab-size", "512", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--ckpt-every", "1", "--no-progress"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished two-step run of the tiny dense model on the demo corpus (`TINY_RUN`), made
    once for the session: tests copy it before they change it."""
    from minimoe.cli import main

    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["pretrain", *TINY_RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_moe_run(tiny_run, tmp_path_factory):
    """The tiny run upcycled into 4 experts, top-2 (streamed: no validation loss measured)."""
    from minimoe.cli import main

    out = tmp_path_factory.mktemp("tiny-moe") / "moe"
    assert main(["scale-out", "--from", str(tiny_run), "--experts", "4", "--top-k", "2",
                 "--stream", "--out", str(out)]) == 0
    return out
