"""What one ``edgephi`` subcommand is: a name, the function that adds its parser, the function that runs it.

Each command-group module of :mod:`edgephi.cli` lists its commands as ``COMMANDS``; the dispatcher builds the
parser and picks the function to run from that table (the shape of vLLM's ``vllm/entrypoints/cli/``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction


@dataclass(frozen=True)
class Command:
    """One subcommand of ``edgephi``.

    ``add_parser(sub)`` adds the subcommand's parser (named ``name``) to the top-level subparsers and returns
    it; ``run(args)`` does the work and returns an :class:`edgephi.exit_codes.ExitCode`.
    """

    name: str
    add_parser: Callable[[Subparsers], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]
