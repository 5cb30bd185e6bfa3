"""The `minimoe` command (console script `minimoe`, and `python -m minimoe`).

    main.py           the command table, argument parsing, one-line errors and exit codes
    train_options.py  the options of the one training loop, shared by every command that trains
    recipes.py        `minimoe pipeline` and `minimoe experiment`, over seeds
    evaluation.py     `minimoe eval` and `minimoe generate`
    full_size.py      `minimoe tokenize`, `dry-run` and `launch-args`

No logic of its own: every command calls the package.
"""

from minimoe.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
