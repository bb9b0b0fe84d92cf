"""``edgephi serve``: run the gRPC daemon with settings from ``EDGEPHI_*`` variables and ``--env-file``.

Exits 0 after a drain, 1 when the engine died, 75 at the memory watch's hard limit, 78 for a configuration
or preflight refusal (systemd does not restart it: ``RestartPreventExitStatus=78``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

from edgephi.cli.command import Command, Subparsers
from edgephi.config import ConfigError, load_settings
from edgephi.exit_codes import ExitCode


def add_parser(sub: Subparsers) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="run the gRPC daemon (settings: EDGEPHI_* variables / --env-file)")
    s.add_argument("--env-file", type=Path, default=os.environ.get("EDGEPHI_ENV_FILE"))
    return s


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"edgephi: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    logging.getLogger().setLevel(settings.log_level)
    from edgephi.daemon import serve

    try:
        code = asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"edgephi: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    # Collect the engine client now, while modules are intact (vLLM's AsyncLLM.__del__ fails at teardown).
    gc.collect()
    return code


COMMANDS = (Command("serve", add_parser, run),)
