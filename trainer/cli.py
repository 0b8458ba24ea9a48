"""Subcommands of `python -m trainer`. Each one parses arguments and calls one library function.

New subcommands register here with a `_add_<name>` function and are listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _add_make_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random FLUX.2 (diffusers layout) for tests and the demo")
    p.add_argument("--out", required=True, help="folder to create (must be empty or new)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    p.add_argument("--overwrite", action="store_true", help="replace a tiny model written there before")

    def run(args: argparse.Namespace) -> int:
        from .tiny import make_tiny

        out = make_tiny(out_dir=args.out, seed=args.seed, overwrite=args.overwrite)
        print(out)
        return 0

    p.set_defaults(run=run)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_make_tiny]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="FLUX.2 LoRA trainer")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser
