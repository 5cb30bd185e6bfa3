"""The teaching notebooks as committed: run top to bottom in full mode, nothing failed, nothing
of the machine they ran on, every figure there; prose that states no result it did not compute;
at least three exercises each, with solutions that assert their answer; the course's roadmap.

nbmake re-executes each notebook in quick mode (tests/conftest.py sets MINIMOE_NOTEBOOK_QUICK);
these tests read the committed files, the outputs a reader sees on GitHub. Regenerate them with
`jupyter nbconvert --to notebook --execute --inplace notebooks/NAME.ipynb` (README, "Notebooks").
"""

import base64
import json
import os
import re
from pathlib import Path

import pytest

from minimoe.notebook import QUICK_ENV, project_root, setup

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
# issue 13's notebooks, in reading order
NOTEBOOKS = ["01_dense_aquila.ipynb", "02_scale_up.ipynb", "03_scale_out.ipynb",
             "04_cost_simulator.ipynb", "05_full_pipeline.ipynb"]
# where a run on some machine would leave its trace: home and work folders, temp files, venvs
MACHINE_PATHS = re.compile(r"/work/|/tmp/|/root\b|/home/|/Users/|site-packages|[A-Za-z]:\\Users")
FIGURE_CALLS = ("plt.show()", "display(Image(")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The only decimal numbers a Markdown cell may type: published constants. A number about a run
# reaches the prose only through a cell that renders it (IPython.display.Markdown) from the run.
PUBLISHED = {
    "2.97", "3.31", "4.30", "7.81", "9.56", "12.22",  # AquilaMoE Table 1 (arXiv 2408.06567)
    "1.85", "1.96",  # AquilaMoE Table 2 (RMSNorm's leak)
    "4.12", "3.35", "989.5", "3.6", "1.2", "5.3",  # Table 6: the factors, the peak, tokens (T)
    "1.3",  # §3.2.1: the 1.3B model
    "0.02", "0.141", "0.001", "0.01",  # §2.3: router init std (sqrt(0.02)), loss coefficients
    "1.0",  # a perfectly even imbalance factor; a capacity factor of one
}
# section numbers (§3.2.1) and arXiv identifiers (2408.06567) are not quantities
NOT_NUMBERS = re.compile(r"§\s*\d+(?:\.\d+)*|\b\d{4}\.\d{4,5}\b")
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+")
MIN_EXERCISES = 3
# what a course needs from the roadmap (notebooks/README.md), the glossary's terms among it
ROADMAP_TERMS = ("```mermaid", "Prerequisites", "Reading order", "Glossary", "FPI", "AKI", "Upcycling",
                 "Top-k", "Capacity", "DP / TP / PP / EP", "MFU", "TSF / CPSF", "remove_cell_tags=solution")


def _cells(name):
    return json.loads((FOLDER / name).read_text(encoding="utf-8"))["cells"]


def _code(name):
    return [c for c in _cells(name) if c["cell_type"] == "code"]


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value


def test_the_notebooks_are_these():
    assert sorted(p.name for p in FOLDER.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_after_one_full_run_top_to_bottom(name):
    cells = _code(name)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), \
        f"{name}: not executed once, in order, from a fresh kernel"
    first = _text(cells[0]["source"])
    assert QUICK_ENV in first, f"{name}: the first code cell must read {QUICK_ENV}"
    assert not any("QUICK =" in _text(c["source"]) for c in cells[1:]), \
        f"{name}: QUICK is set only in the first code cell"
    shown = "".join(_text(o.get("text", "")) for o in cells[0]["outputs"])
    assert "full mode" in shown, f"{name}: committed from a quick run (the first cell prints the mode)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_no_error_no_traceback_no_machine_path(name):
    for i, cell in enumerate(_code(name)):
        for out in cell["outputs"]:
            assert out["output_type"] != "error", f"{name} cell {i}: {out.get('ename')}: {out.get('evalue')}"
            texts = [_text(out.get("text", ""))]
            texts += [_text(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
            for text in texts:
                assert "Traceback (most recent call last)" not in text, f"{name} cell {i}: a traceback"
                found = MACHINE_PATHS.search(text)
                assert not found, f"{name} cell {i}: a path of the machine it ran on: {found.group()!r}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_is_there(name):
    for i, cell in enumerate(_code(name)):
        images = [out["data"]["image/png"] for out in cell["outputs"] if "image/png" in out.get("data", {})]
        for image in images:
            assert base64.b64decode(_text(image)).startswith(PNG_SIGNATURE), f"{name} cell {i}: an empty image"
        source = _text(cell["source"])
        calls = sum(source.count(call) for call in FIGURE_CALLS)
        assert len(images) >= calls, f"{name} cell {i}: draws {calls} figure(s), shows {len(images)}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_before_each_result_and_the_paper_cited(name):
    cells = _cells(name)
    assert cells[0]["cell_type"] == "markdown" and _text(cells[0]["source"]).startswith("# ")
    assert "arXiv" in _text(cells[0]["source"]), f"{name}: the first cell cites the paper"
    for before, cell in zip(cells, cells[1:]):
        if cell["cell_type"] == "code" and before["cell_type"] == "code":
            # two code cells in a row are allowed only when the first draws nothing new to explain
            assert not before["outputs"] or not cell["outputs"], \
                f"{name}: code cell {_text(cell['source'])[:40]!r} has no prose before it"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_prose_types_no_result(name):
    """A decimal number in a Markdown cell is a published constant; everything else is rendered."""
    for i, cell in enumerate(_cells(name)):
        if cell["cell_type"] == "markdown":
            text = NOT_NUMBERS.sub("", _text(cell["source"]))
            typed = [n for n in DECIMAL.findall(text) if n not in PUBLISHED]
            assert not typed, (f"{name} cell {i}: types {typed} in prose; render a run's number from its "
                               "variables (IPython.display.Markdown) or add a published constant to PUBLISHED")
    rendered = [o for c in _code(name) for o in c["outputs"] if "text/markdown" in o.get("data", {})]
    assert rendered, f"{name}: no prose rendered from a run"


def test_prose_check_catches_a_typed_result():
    typed = "The upcycled MoE ends at 5.098, below the dense model (Table 1: 2.97; arXiv 2408.06567 §3.2.1)."
    assert [n for n in DECIMAL.findall(NOT_NUMBERS.sub("", typed)) if n not in PUBLISHED] == ["5.098"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_exercises_with_checked_solutions(name):
    """At least three exercises, each followed by a hidden solution cell that asserts its answer
    (nbmake runs it in quick mode; the committed full run shows it passed)."""
    cells = _cells(name)
    exercises = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
                 and re.search(r"^### Exercise \d+", _text(c["source"]), re.M)]
    assert len(exercises) >= MIN_EXERCISES, f"{name}: {len(exercises)} exercises"
    for i in exercises:
        solution = cells[i + 1]
        assert solution["cell_type"] == "code" and "solution" in solution["metadata"].get("tags", []), \
            f"{name} cell {i + 1}: an exercise's solution follows it, tagged 'solution'"
        assert solution["metadata"].get("jupyter", {}).get("source_hidden"), f"{name} cell {i + 1}: hidden"
        assert re.search(r"^\s*assert ", _text(solution["source"]), re.M), f"{name} cell {i + 1}: asserts nothing"


def test_the_roadmap_names_every_notebook_and_term():
    roadmap = (FOLDER / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert f"({name})" in roadmap, f"notebooks/README.md: no link to {name}"
    missing = [term for term in ROADMAP_TERMS if term not in roadmap]
    assert not missing, f"notebooks/README.md: lacks {missing}"


def test_setup_finds_the_repository_from_inside_it(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    assert project_root(root / "notebooks") == root
    assert project_root(root / "minimoe" / "sim") == root
    assert project_root(tmp_path) == root  # outside a clone: the checkout minimoe comes from
    monkeypatch.chdir(tmp_path)
    setup()
    assert Path.cwd() == root


def test_pyplot_keeps_a_notebook_inline_backend(tmp_path):
    """A library call that plots to a file must not switch a notebook to Agg (its own figures
    would vanish), and the figure it wrote must not show in the notebook."""
    import subprocess
    import sys

    code = ("import matplotlib, matplotlib.pyplot as plt\n"
            "matplotlib.use('module://matplotlib_inline.backend_inline')\n"
            "from minimoe import files\n"
            "fig, ax = files.pyplot().subplots(); ax.plot([0, 1])\n"
            f"files.save_figure(fig, {str(tmp_path / 'x.png')!r})\n"
            "print(matplotlib.get_backend(), len(plt.get_fignums()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                         check=True).stdout.split()
    assert out == ["module://matplotlib_inline.backend_inline", "0"]
    assert (tmp_path / "x.png").read_bytes().startswith(PNG_SIGNATURE)
