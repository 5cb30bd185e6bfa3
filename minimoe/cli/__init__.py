"""The `minimoe` command: main.py holds the command table and the one error boundary."""

from minimoe.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
