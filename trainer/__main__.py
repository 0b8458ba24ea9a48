"""Command line of the trainer: `python -m trainer <subcommand>`.

Each subcommand is a thin wrapper over a function the ComfyUI nodes call too.
"""

from __future__ import annotations

import logging
import sys

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_config_keys", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # `train`: config keys given as --key=value (trainer/cli_config.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # User errors: one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
