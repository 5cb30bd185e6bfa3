"""Test settings: nothing downloads, runs are deterministic and small, notebooks run quick."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# the one parameter of every notebook (minimoe/notebook.py): nbmake's kernels inherit it, so the
# suite executes each notebook in quick mode; a reader runs the full one
os.environ["MINIMOE_NOTEBOOK_QUICK"] = "1"
