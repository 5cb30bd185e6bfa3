"""The `minimoe` command (console script `minimoe`, and `python -m minimoe`): main.py holds the
command table and the one error boundary; runs.py, recipes.py (pipeline and experiment, over
seeds), cost.py, evaluation.py, hub.py and full_size.py the commands, each declaring its
options and calling the package."""

from minimoe.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
