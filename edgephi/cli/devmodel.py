"""``edgephi devmodel``: build (or reuse) the tiny Phi-4 stand-in and its 4-bit artifact; print the path.

The builder is :func:`edgephi.devmodel.build_dev_artifact`; the stand-in is for demos and tests, never for
serving users.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgephi.cli.command import Command, Subparsers
from edgephi.exit_codes import ExitCode


def add_parser(sub: Subparsers) -> argparse.ArgumentParser:
    d = sub.add_parser("devmodel", help="build the tiny Phi-4 stand-in (and its 4-bit artifact); print path")
    d.add_argument("--cache-dir", type=Path, default=None)
    d.add_argument("--bf16", action="store_true", help="print the bf16 checkpoint instead of the 4-bit one")
    d.add_argument("--iters", type=int, default=32, help="auto-round iterations for the 4-bit artifact")
    return d


def run(args: argparse.Namespace) -> int:
    # Lazy: it loads torch, and it moves to edgephi/devmodel.py on another branch (the ignore is for before then).
    from edgephi.devmodel import build_dev_artifact

    bf16, w4 = build_dev_artifact(args.cache_dir, args.iters)
    print(bf16 if args.bf16 else w4)
    return ExitCode.OK


COMMANDS = (Command("devmodel", add_parser, run),)
