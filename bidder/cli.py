"""The ``bidder`` console script: one subcommand per job, each in its own module.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when its subcommand runs, so ``bidder tune`` does not pay
for numpy and ``bidder serve`` does not pay for matplotlib.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("bidder.serve", "Run the bid server (Gunicorn master + pinned prefork workers)."),
    "demo": ("bidder.demo", "Main job: memcached, users, model, server, a latency burst, a report."),
    "config": ("bidder.config", "Show the effective settings and their sources, or an example "
               "config file."),
    "seed": ("bidder.seed", "Load synthetic user features into memcached."),
    "train": ("models.train", "Train a CTR model (FTRL logistic regression or FM) and save it."),
    "tune": ("server_hooks.tune", "Check, apply or revert the host scheduler/network tuning."),
    "ab": ("loadtests.ab", "A/B two server configurations (default: pinned vs unpinned)."),
    "capacity": ("loadtests.capacity", "Find the highest open-loop rate with p99 under the SLA."),
    "bench": ("loadtests.bench", "Throughput of the bidder as a ratio to hello-world Falcon."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bidder", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name not in sys.argv[1:2] and len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
            sub.add_parser(name, help=help_text)  # only the chosen one pays its imports
            continue
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv[1:] = argv
    args = build_parser().parse_args()
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
