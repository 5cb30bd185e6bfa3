"""What every notebook runs first: `setup` makes the repository root the working directory (a
kernel starts in the notebook's folder). QUICK_ENV: the tests' quick mode (notebooks/README.md)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

QUICK_ENV = "MINIMOE_NOTEBOOK_QUICK"  # "1": the notebooks run in quick mode (the tests)


def project_root(start=None) -> Path:
    """The minimoe checkout holding `start` (default: the working directory), else the one the
    package was imported from: the nearest folder holding both pyproject.toml and sims/."""
    start = (Path.cwd() if start is None else Path(start)).resolve()
    package_checkout = Path(__file__).resolve().parents[1]
    for folder in [start, *start.parents, package_checkout]:
        if (folder / "pyproject.toml").is_file() and (folder / "sims").is_dir():
            return folder
    raise ValueError(f"start={str(start)!r}: not inside a minimoe checkout (no folder above it "
                     "holds pyproject.toml and sims/), and minimoe is not imported from one")


def setup(start=None) -> None:
    """Make the repository root the working directory (returning nothing: no paths in outputs)."""
    os.chdir(project_root(start))
    # tqdm.auto (the training loop's progress bar) warns at import inside a kernel without
    # ipywidgets; the notebooks train with progress=False, so the warning tells a reader nothing
    warnings.filterwarnings("ignore", message="IProgress not found")
