"""``edgephi doctor``: say whether this box can serve, and why not (the checks are :mod:`edgephi.doctor`).

Exits 0 when every check passes or does not apply, 1 (``ExitCode.FAILED``) when one fails.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgephi.cli.command import Command, Subparsers
from edgephi.exit_codes import ExitCode


def add_parser(sub: Subparsers) -> argparse.ArgumentParser:
    dr = sub.add_parser("doctor", help="say whether this box can serve, and why not")
    dr.add_argument("--env-file", type=Path, default=os.environ.get("EDGEPHI_ENV_FILE"))
    dr.add_argument("--cpu-only", action="store_true", help="skip GPU checks (vLLM CPU backend)")
    return dr


def run(args: argparse.Namespace) -> int:
    from edgephi.doctor import run_checks

    checks = run_checks(args.env_file, args.cpu_only)
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if c.ok is False]
    print("can serve" if not failed else f"cannot serve: {', '.join(failed)}")
    return ExitCode.FAILED if failed else ExitCode.OK


COMMANDS = (Command("doctor", add_parser, run),)
