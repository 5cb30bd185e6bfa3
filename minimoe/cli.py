"""The `minimoe` command: argument parsing, one-line errors and exit codes, no logic of its own.

Every subcommand is a pair: `_add_NAME(sub)` declares its arguments and `_run_NAME(args)` calls
the package. A `ValueError` (bad config, bad file, bad option) becomes one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        print(f"minimoe: error: {message}", file=sys.stderr)
        sys.exit(2)


# --- info -------------------------------------------------------------------------------
def _add_info(sub):
    p = sub.add_parser("info", help="shapes and parameter counts of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_info(args):
    from minimoe.report import info_table

    print(info_table(args.preset, as_json=args.json))


# --- bench ------------------------------------------------------------------------------
def _add_bench(sub):
    from minimoe.bench import BENCHES

    p = sub.add_parser("bench", help="speed benchmarks, printed as measured ratios")
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")


def _run_bench(args):
    from minimoe.bench import BENCHES

    BENCHES[args.name](args)


COMMANDS = ["info", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minimoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        globals()[f"_add_{name.replace('-', '_')}"](sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        globals()[f"_run_{args.command.replace('-', '_')}"](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"minimoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"minimoe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
