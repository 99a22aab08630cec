"""The ``robix`` command: one console script, one subcommand per job.

Each subcommand lives in its own module with ``register(subparsers)``; heavy libraries
(torch, transformers) are imported only inside the subcommands that need them, so
``robix --help`` and the bus tools start fast. Logging is configured here, once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points
from typing import Optional, Sequence

from robix_planner import __version__
from robix_planner.config import ENV_VARS, ConfigError, env

#: Entry-point group through which other packages of this project (sim, training) add
#: subcommands without robix_planner importing them: ``name = "pkg.module:register"``.
PLUGIN_GROUP = "robix.commands"

#: Modules that add subcommands, in the order ``robix --help`` lists them.
SUBCOMMAND_MODULES = (
    "robix_planner.runner",
    "robix_planner.launch",
    "robix_planner.planner",
    "robix_planner.tools.topic",
    "robix_planner.tools.record",
    "robix_planner.chat",
    "robix_planner.tts",
)


def make_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {k:18} {v}" for k, v in ENV_VARS.items())
    parser = argparse.ArgumentParser(
        prog="robix",
        description="Robix Planner: an interruptible robot planner on a ZeroMQ bus.",
        epilog=f"environment variables:\n{env_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"robix {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR (default: $ROBIX_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def setup_logging(level: Optional[str]) -> None:
    level = (level or env("ROBIX_LOG_LEVEL", "INFO")).upper()
    logging.basicConfig(level=level, format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `robix run X --name n params.a=1`: overrides may follow options.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"robix {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
