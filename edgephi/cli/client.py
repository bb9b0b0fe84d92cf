"""``edgephi generate``, ``chat``, ``health``, ``info`` and ``count-tokens``: talk to a running daemon.

Each takes ``--host``/``--port`` (defaults ``$EDGEPHI_CLIENT_HOST``/``$EDGEPHI_CLIENT_PORT``), ``--token-file``,
``--ca``/``--cert``/``--key`` (TLS / mTLS) and ``--timeout``. Exits 0 ok; 1 (``ExitCode.FAILED``) when an RPC
fails or ``health`` is not SERVING; 2 (``ExitCode.USAGE``) for a bad port or a named file that cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgephi.cli.command import Command, Subparsers
from edgephi.exit_codes import ExitCode

if TYPE_CHECKING:
    from edgephi.client import Client

#: A client command's body: given a connected client and the arguments, do the work, return an exit code.
Body = Callable[["Client", argparse.Namespace], int]

#: Deadline (s) of the unary calls (health, info, count-tokens) without --timeout; streams have none.
UNARY_TIMEOUT_S = 10.0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535; also EDGEPHI_CLIENT_PORT)")
    return port


def _add_conn(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("EDGEPHI_CLIENT_HOST", "127.0.0.1"))
    # A string default goes through type= too, so a bad EDGEPHI_CLIENT_PORT gets the same clear message.
    p.add_argument("--port", type=_port, default=os.environ.get("EDGEPHI_CLIENT_PORT", "50051"))
    p.add_argument("--token-file", type=Path, help="file holding the bearer token")
    p.add_argument("--ca", help="CA certificate (PEM): use TLS")
    p.add_argument("--cert", help="client certificate (PEM) for mTLS")
    p.add_argument("--key", help="client private key (PEM) for mTLS")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])


# ------------------------------------------------------------------------------------------------ parsers


def add_generate(sub: Subparsers) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="stream a completion of PROMPT")
    g.add_argument("prompt")
    _add_conn(g)
    _add_sampling(g)
    return g


def add_chat(sub: Subparsers) -> argparse.ArgumentParser:
    c = sub.add_parser("chat", help="interactive chat (or one turn with --message)")
    c.add_argument("--system", help="system message")
    c.add_argument("--message", "-m", action="append", help="user message; no prompt loop when given")
    _add_conn(c)
    _add_sampling(c)
    return c


def add_health(sub: Subparsers) -> argparse.ArgumentParser:
    h = sub.add_parser("health", help="print the daemon's health (exit 0 only when SERVING)")
    h.add_argument("--service", default="")
    _add_conn(h)
    return h


def add_info(sub: Subparsers) -> argparse.ArgumentParser:
    i = sub.add_parser("info", help="print GetModelInfo")
    _add_conn(i)
    return i


def add_count_tokens(sub: Subparsers) -> argparse.ArgumentParser:
    t = sub.add_parser("count-tokens", help="count the tokens of TEXT")
    t.add_argument("text")
    _add_conn(t)
    return t


# --------------------------------------------------------------------------------------------------- runs


def connected(body: Body) -> Callable[[argparse.Namespace], int]:
    """The command's ``run``: check the named files, connect, run ``body``; a failed RPC exits 1 with its status."""

    def run(args: argparse.Namespace) -> int:
        import grpc

        from edgephi.client import Client, Connection

        for flag in ("token_file", "ca", "cert", "key"):
            path = getattr(args, flag, None)
            if path is not None and not os.access(path, os.R_OK):
                print(f"edgephi: --{flag.replace('_', '-')} {path}: no such readable file", file=sys.stderr)
                return ExitCode.USAGE
        token = args.token_file.read_text().strip() if getattr(args, "token_file", None) else None
        conn = Connection(args.host, args.port, token, args.ca, args.cert, args.key)
        try:
            with Client(conn) as client:
                return body(client, args)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"\nedgephi: {code.name if code else 'error'}: {details}", file=sys.stderr)
            if code is grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
                print(
                    f"edgephi: is `edgephi serve` running and listening on {args.host}:{args.port}? "
                    "(--host/--port, or EDGEPHI_CLIENT_HOST/EDGEPHI_CLIENT_PORT)",
                    file=sys.stderr,
                )
            return ExitCode.FAILED

    return run


def _unary_timeout(args: argparse.Namespace) -> float:
    return float(args.timeout) if args.timeout is not None else UNARY_TIMEOUT_S


def _sampling(args: argparse.Namespace) -> Any:
    from edgephi.client import sampling

    return sampling(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )


def health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service, timeout=_unary_timeout(args))
    print(status)
    return ExitCode.OK if status == "SERVING" else ExitCode.FAILED


def info(client: Client, args: argparse.Namespace) -> int:
    print(client.model_info(timeout=_unary_timeout(args)), end="")
    return ExitCode.OK


def count_tokens(client: Client, args: argparse.Namespace) -> int:
    print(client.count_tokens(args.text, timeout=_unary_timeout(args)))
    return ExitCode.OK


def generate(client: Client, args: argparse.Namespace) -> int:
    print_stream(client.generate(args.prompt, _sampling(args), args.timeout))
    return ExitCode.OK


def chat(client: Client, args: argparse.Namespace) -> int:
    """A prompt loop on stdin until EOF, or the ``--message`` turns in order; the history goes with each turn."""
    opts = _sampling(args)
    messages: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    scripted = list(args.message or [])
    while True:
        if args.message is not None:
            if not scripted:
                return ExitCode.OK
            user = scripted.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                return ExitCode.OK
            if not user.strip():
                continue
        messages.append(("user", user))
        stream = client.chat(messages, opts, args.timeout)
        sys.stdout.write("phi> ")
        messages.append(("assistant", print_stream(stream)))


def print_stream(stream: Iterable[Any]) -> str:
    """Print a Generate/Chat stream as it arrives, then the finish reason and usage on stderr; return the text."""
    last = None
    text = []
    for msg in stream:
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        text.append(msg.text)
        last = msg
    sys.stdout.write("\n")
    if last is not None and last.HasField("usage"):
        from edgephi.v1 import inference_pb2 as pb

        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        print(
            f"[{reason}; prompt {last.usage.prompt_tokens} tokens, completion {last.usage.completion_tokens} tokens]",
            file=sys.stderr,
        )
    return "".join(text)


COMMANDS = (
    Command("generate", add_generate, connected(generate)),
    Command("chat", add_chat, connected(chat)),
    Command("health", add_health, connected(health)),
    Command("info", add_info, connected(info)),
    Command("count-tokens", add_count_tokens, connected(count_tokens)),
)
