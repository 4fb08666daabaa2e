"""The ``bidder`` console script: one subcommand per job, each in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when its subcommand runs, so ``bidder tune`` does not pay
for numpy, ``bidder serve`` does not pay for matplotlib, and a server installed
without the ``[load]`` extra still answers ``bidder --help``. The load commands
live in ``loadtests`` (the only place the server package reaches into it).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import nullcontext

from bidder import metrics_dir

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bidder.serve", "Run the bid server (Gunicorn master + pinned prefork workers)."),
    "demo": ("loadtests.demo", "Main job: memcached, users, model, server, a latency burst, a report."),
    "config": ("bidder.config", "Show the effective settings and their sources, or an example "
               "config file."),
    "seed": ("bidder.seed", "Load synthetic user features into memcached."),
    "train": ("bidder.train", "Train a CTR model (FTRL logistic regression or FM) and save it."),
    "tune": ("server_hooks.tune", "Check, apply or revert the host scheduler/network tuning."),
    "ab": ("loadtests.ab", "A/B two server configurations (default: pinned vs unpinned)."),
    "capacity": ("loadtests.capacity", "Find the highest open-loop rate with p99 under the SLA."),
    "bench": ("loadtests.bench", "The bidder against hello-world on stock Gunicorn and on the "
              "same server; --overload: past its capacity."),
    "fleet": ("loadtests.fleet", "Money across N hosts: one ledger, notices retried across hosts."),
    "pacing": ("loadtests.pacing", "A campaign day in accelerated time: spend against the even line."),
}


def load_command(name: str):
    """The module of command ``name``; a missing optional dependency says which extra has it."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] in ("bidder", "models", "server_hooks"):
            raise
        extra = "train" if name == "train" else "load"  # the extras of pyproject.toml
        raise SystemExit(f"bidder {name}: needs the Python package {exc.name!r}, which this "
                         f"installation lacks: pip install 'bidder[{extra}]'") from None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (the others are listed by name)."""
    parser = argparse.ArgumentParser(prog="bidder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = load_command(name)
        parser_of = sub.add_parser(name, help=help_text, description=help_text,
                                   formatter_class=HelpFormatter)
        module.add_arguments(parser_of)
        parser_of.set_defaults(run=module.run)
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless None: its help then says what it means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv[1:] = argv  # Gunicorn's arbiter keeps sys.argv to re-execute itself (USR2)
    argv = sys.argv[1:]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    # the server's metrics directory exists before its modules import prometheus_client
    with metrics_dir.fresh() if command == "serve" else nullcontext():
        args = build_parser(command).parse_args(argv)
        return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
