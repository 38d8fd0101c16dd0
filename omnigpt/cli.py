"""The `omnigpt` command: one subcommand per stage of the data path.

Each stage owns an `add_commands(subparsers)` function next to its code; this file only lists them,
so `omnigpt --help` shows the whole pipeline in data-path order. Imports are lazy so that
`omnigpt --help` stays fast and a stage's heavy dependencies load only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds) in data-path order.
STAGES = [
    "omnigpt.tokenizer.commands",
    "omnigpt.data.commands",
    "omnigpt.model.commands",
    "omnigpt.model.vision_commands",
    "omnigpt.train.commands",
    "omnigpt.interop.commands",
    "omnigpt.align.commands",
    "omnigpt.infer.commands",
    "omnigpt.speedrun",
    "omnigpt.serve.commands",
    "omnigpt.evals.commands",
    "omnigpt.scaling.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnigpt", description="Train, align, evaluate and serve omni models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in STAGES:
        importlib.import_module(name).add_commands(sub)
    return parser


class CommandError(Exception):
    """A user mistake: printed as one line, exit status 2, no traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CommandError, ValueError, FileNotFoundError) as e:
        print(f"omnigpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
