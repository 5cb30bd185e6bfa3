"""The `minimoe` command: the command table, parsing, the run lock, and the one error boundary.
A command's module is imported only when it runs; whatever goes wrong is one line on stderr,
exit 2 (130: Ctrl-C)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys

from minimoe.files import run_lock

DESCRIPTION = """\
Grow language models the EfficientScale way (AquilaMoE, arXiv 2408.06567): pretrain a small
dense model, scale it up (FPI, AKI, AKI-Pro), scale it out into a Mixture of Experts (sparse
upcycling, LLaMA-MoE splits), and account for the savings; estimate full-size runs with the
FLOPs and cost simulator. Start with `minimoe pipeline`."""

# name -> (help, the module (in minimoe/cli/ where it starts with a dot) whose add_NAME declares
# its arguments and run_NAME runs it)
COMMANDS = {
    "pipeline": ("preparation -> scale-up -> scale-out vs from scratch, with a report", ".recipes"),
    "pretrain": ("train a model on the demo corpus or your text", ".runs"),
    "tokenize": ("stream text of any size into pre-tokenised shards", ".full_size"),
    "scale-up": ("grow a run's model wider and deeper (FPI, AKI, AKI-Pro)", ".runs"),
    "scale-out": ("turn a dense run's model into an MoE (upcycle or split)", ".runs"),
    "experiment": ("the paper's validation experiments at toy scale, over seeds", ".recipes"),
    "dry-run": ("full-size recipes' training step rehearsed here: memory, against the simulator",
                ".full_size"),
    "launch-args": ("the commands of a full-size recipe (what scaling/launch.sh runs)", ".full_size"),
    "info": ("shapes and parameter counts of a preset", ".cost"),
    "flops": ("analytic FLOPs per token of a preset, per component", ".cost"),
    "simulate": ("account a TOML scenario of training phases (sims/)", ".cost"),
    "plan": ("fastest and cheapest parallel layouts on N GPUs", ".cost"),
    "validate": ("the cost simulator against published training runs (sims/validation/)", ".cost"),
    "experts": ("what an MoE run's experts specialise in, by domain", ".runs"),
    "eval": ("score runs on tasks: cloze, completion, bits per byte, .jsonl task files", ".evaluation"),
    "generate": ("continue a prompt with a run's model, greedy or sampled", ".evaluation"),
    "export": ("write a run as a Hugging Face transformers checkpoint", ".hub"),
    "import": ("make a run of a Hugging Face checkpoint, to grow, upcycle or train it", ".hub"),
    "bench": ("speed benchmarks, printed as measured ratios", "minimoe.bench"),  # beside the library
}
WRITES_RUN = {"pipeline", "pretrain", "tokenize", "scale-up", "scale-out", "experiment", "experts"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        ruled = re.fullmatch(r"argument (?:\S+/)?(\S+): '(.*)': (must .*)", message, re.DOTALL)
        message = f"{ruled[1]}={ruled[2]}: {ruled[3]}" if ruled else message  # checks.option's
        self.exit(2, f"{self.prog}: error: {message}\n")


def _functions(name: str):
    module = importlib.import_module(COMMANDS[name][1], "minimoe.cli")
    return [getattr(module, f"{verb}_{name.replace('-', '_')}") for verb in ("add", "run")]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `only`, of that one alone (the others are named
    in the help but their modules are not loaded)."""
    parser = _Parser(prog="minimoe", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            _functions(name)[0](p)
    return parser


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" \
            or "can't allocate memory" in str(err):
        return f"out of memory ({str(err).splitlines()[0][:160] or type(err).__name__})"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: an OSError, not a kill
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in COMMANDS else ""
    prog = f"minimoe {name}".strip()
    # under torchrun: one process group for the command; what it prints comes from rank 0
    dist = importlib.import_module("minimoe.dist") if "WORLD_SIZE" in os.environ else None
    quiet = None
    try:
        try:
            args = build_parser(name).parse_args(argv)
        except SystemExit as done:  # --help, or argparse's one-line error: returned, not raised
            return done.code
        if dist:
            dist.init_from_env(getattr(args, "device", "cpu"))
            quiet = None if dist.is_main() else open(os.devnull, "w")
        out = getattr(args, "out", None) or (name == "experts" and f"{args.ckpt}/experts")
        locked = name in WRITES_RUN and os.environ.get("RANK", "0") == "0"
        with run_lock(out, " ".join(["minimoe", *argv])) if locked else contextlib.nullcontext():
            with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
                _functions(name)[1](args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _message(err).startswith("out of memory"):
            raise  # a bug: its traceback is what a report needs
        print(f"{prog}: error: {_message(err)}", file=sys.stderr)
        return 2
    finally:
        if dist:
            dist.shutdown()
        if quiet:
            quiet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
