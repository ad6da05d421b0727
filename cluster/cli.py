"""The `tandem` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; this file wires them up and is the one place
that turns a failure into one line on stderr, `tandem <command>: <what went wrong>`, and a
non-zero exit: argparse's errors (exit 2) and any exception a command raises (exit 1; set
TANDEM_DEBUG=1 for the traceback). Commands raise clear exceptions where a failure starts
(ValueError, OSError, LookupError) rather than catching and printing them."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (subcommand, module, one-line help). Modules are imported lazily so `tandem --help` is fast.
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("make-model", "tandem.engine.make_model", "write a small random-weight HF model folder"),
    ("generate", "tandem.cluster.generate_cli", "offline generation with the Tandem engine"),
    ("serve", "tandem.cluster.serve_cli", "run the OpenAI-compatible Serve app"),
    ("scale", "tandem.cluster.scale_cli", "resize a pool (decode, prefill, colocated) of a running app"),
    ("status", "tandem.cluster.status_cli", "show the app's pools and replica states"),
    ("bench", "tandem.bench.loadgen.cli", "load-test an OpenAI-compatible endpoint; compare reports"),
    ("bundle", "tandem.cluster.bundle", "build an offline install bundle for GPU hosts without internet"),
]
# A failure of these kinds is the user's input or environment; its message is the line.
# Anything else is named by its type too, since it is more likely a bug.
EXPECTED_ERRORS = (ValueError, OSError, LookupError)
DEBUG_ENV = "TANDEM_DEBUG"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's `(default: X)` after every option's help, except where the help already says
    what the default is (one computed at run time, or none at all)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS or action.default == []:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line (`tandem generate: argument --max-tokens: invalid int value:
    'x'`), not argparse's usage block; subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every parser under `parser` gets the formatter, and every option a default in its help:
    an option written without help text gets `(default: X)` as its help."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_prog=sub.prog)  # the deepest parser's wins: `tandem bench run`
                _finish(sub)
        elif action.option_strings and action.help is None and action.default is not None \
                and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="tandem", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    _finish(parser)
    return parser


def describe(error: BaseException) -> str:
    """One line for a failed command: the message's first line, with the type when the error
    is not one of the expected kinds, and where the rest went."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    expected = isinstance(error, EXPECTED_ERRORS)
    if not expected and lines:
        text = f"{type(error).__name__}: {text}"
    if not expected or len(lines) > 1:
        text += f" ({DEBUG_ENV}=1 shows the rest)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"{args._prog}: {describe(error)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
