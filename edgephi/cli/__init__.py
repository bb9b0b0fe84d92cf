"""The ``edgephi`` command line: one dispatcher over a table of commands, one module per command group.

=====================  ==========================================================================
module                 commands
=====================  ==========================================================================
:mod:`.serve`          ``serve``: the gRPC daemon
:mod:`.client`         ``generate``, ``chat``, ``health``, ``info``, ``count-tokens``: talk to it
:mod:`.doctor`         ``doctor``: can this box serve, and why not
:mod:`.devmodel`       ``devmodel``: the tiny Phi-4 stand-in and its 4-bit artifact
:mod:`.models`         ``quantize``, ``fetch``, ``verify``, ``models``: the artifact store
=====================  ==========================================================================

Exit codes are :class:`edgephi.exit_codes.ExitCode`, and nothing else: 0 ok, 1 failed, 2 usage (argparse, or
a named file that cannot be read), 3 refused before any work, 75 memory hard limit, 78 configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from edgephi.cli import client, devmodel, doctor, models, serve
from edgephi.cli.command import Command

#: The command groups, in the order ``edgephi --help`` lists them.
GROUPS = (serve, client, doctor, devmodel, models)
#: Every subcommand by name: the one dispatch table.
COMMANDS: dict[str, Command] = {c.name: c for group in GROUPS for c in group.COMMANDS}

DESCRIPTION = (
    "Phi-4 (W4A16) over gRPC: the daemon (serve), its clients, the doctor, the dev model and the artifact store."
)


def parser() -> argparse.ArgumentParser:
    """The ``edgephi`` argument parser, with a subparser for every entry of :data:`COMMANDS`."""
    ap = argparse.ArgumentParser(prog="edgephi", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    Argument errors raise ``SystemExit(ExitCode.USAGE)`` (argparse), with the message on stderr.
    """
    args = parser().parse_args(argv)
    level = os.environ.get("EDGEPHI_LOG_LEVEL", "INFO").upper()  # `serve` validates it with the other settings
    logging.basicConfig(
        level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # the shell's status for a command ended by Ctrl-C (130)


__all__ = ["COMMANDS", "GROUPS", "Command", "main", "parser"]
