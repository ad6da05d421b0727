"""The `tandem` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; this file only wires them up."""
from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sp)
        sp.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
