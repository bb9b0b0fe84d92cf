"""``edgephi`` command line: the daemon (``serve``), clients (``generate``, ``chat``, ``health``, ``info``,
``count-tokens``), the dev model (``devmodel``) and the artifact store (``quantize``, ``fetch``, ``verify``,
``models``).

Exit codes: 0 ok; 1 runtime failure (engine died, RPC failed); 2 usage error; 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

from edgephi.config import ConfigError, load_settings
from edgephi.devmodel import build_dev_artifact
from edgephi.exit_codes import ExitCode


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgephi", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC daemon (settings: EDGEPHI_* variables / --env-file)")
    s.add_argument("--env-file", type=Path, default=os.environ.get("EDGEPHI_ENV_FILE"))

    g = sub.add_parser("generate", help="stream a completion of PROMPT")
    g.add_argument("prompt")
    _add_conn(g)
    _add_sampling(g)

    c = sub.add_parser("chat", help="interactive chat (or one turn with --message)")
    c.add_argument("--system", help="system message")
    c.add_argument("--message", "-m", action="append", help="user message; no prompt loop when given")
    _add_conn(c)
    _add_sampling(c)

    h = sub.add_parser("health", help="print the daemon's health (exit 0 only when SERVING)")
    h.add_argument("--service", default="")
    _add_conn(h)

    i = sub.add_parser("info", help="print GetModelInfo")
    _add_conn(i)

    t = sub.add_parser("count-tokens", help="count the tokens of TEXT")
    t.add_argument("text")
    _add_conn(t)

    dr = sub.add_parser("doctor", help="say whether this box can serve, and why not")
    dr.add_argument("--env-file", type=Path, default=os.environ.get("EDGEPHI_ENV_FILE"))
    dr.add_argument("--cpu-only", action="store_true", help="skip GPU checks (vLLM CPU backend)")

    d = sub.add_parser("devmodel", help="build the tiny Phi-4 stand-in (and its 4-bit artifact); print path")
    d.add_argument("--cache-dir", type=Path, default=None)
    d.add_argument("--bf16", action="store_true", help="print the bf16 checkpoint instead of the 4-bit one")
    d.add_argument("--iters", type=int, default=32, help="auto-round iterations for the 4-bit artifact")

    # the artifact store: quantize, fetch, verify, models (edgephi/artifacts/commands.py)
    from edgephi.artifacts.commands import add_parsers as add_artifact_parsers

    add_artifact_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = os.environ.get("EDGEPHI_LOG_LEVEL", "INFO").upper()  # `serve` validates it with the other settings
    logging.basicConfig(
        level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "devmodel":
            return _devmodel(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command in ("quantize", "fetch", "verify", "models"):
            from edgephi.artifacts import commands

            return commands.run(args)
        return _client_command(args)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.env_file)
    except ConfigError as exc:
        print(f"edgephi: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    logging.getLogger().setLevel(settings.log_level)
    from edgephi.server import serve

    try:
        code = asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"edgephi: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    # Collect the engine client now, while modules are intact (vLLM's AsyncLLM.__del__ fails at teardown).
    gc.collect()
    return code


def _devmodel(args: argparse.Namespace) -> int:
    bf16, w4 = build_dev_artifact(args.cache_dir, args.iters)
    print(bf16 if args.bf16 else w4)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from edgephi.doctor import run_checks

    checks = run_checks(args.env_file, args.cpu_only)
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if c.ok is False]
    print("can serve" if not failed else f"cannot serve: {', '.join(failed)}")
    return 1 if failed else 0


def _client_command(args: argparse.Namespace) -> int:
    import grpc

    from edgephi.client import Client, Connection, sampling

    for flag in ("token_file", "ca", "cert", "key"):
        path = getattr(args, flag, None)
        if path is not None and not os.access(path, os.R_OK):
            print(f"edgephi: --{flag.replace('_', '-')} {path}: no such readable file", file=sys.stderr)
            return 2
    token = args.token_file.read_text().strip() if getattr(args, "token_file", None) else None
    conn = Connection(args.host, args.port, token, args.ca, args.cert, args.key)
    unary_timeout = args.timeout if args.timeout is not None else 10.0
    try:
        with Client(conn) as client:
            if args.command == "health":
                status = client.health(args.service, timeout=unary_timeout)
                print(status)
                return 0 if status == "SERVING" else 1
            if args.command == "info":
                print(client.model_info(timeout=unary_timeout), end="")
                return 0
            if args.command == "count-tokens":
                print(client.count_tokens(args.text, timeout=unary_timeout))
                return 0
            opts = sampling(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
            )
            if args.command == "generate":
                _print_stream(client.generate(args.prompt, opts, args.timeout))
                return 0
            return _chat(client, args, opts)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"\nedgephi: {code.name if code else 'error'}: {details}", file=sys.stderr)
        return 1


def _print_stream(stream: object) -> str:
    """Print a Generate/Chat stream as it arrives, then the finish reason and usage on stderr; return the text."""
    last = None
    text = []
    for msg in stream:  # type: ignore[attr-defined]
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


def _chat(client: object, args: argparse.Namespace, opts: object) -> int:
    messages: list[tuple[str, str]] = [("system", args.system)] if args.system else []
    scripted = list(args.message or [])
    while True:
        if args.message is not None:
            if not scripted:
                return 0
            user = scripted.pop(0)
        else:
            try:
                user = input("you> ")
            except EOFError:
                return 0
            if not user.strip():
                continue
        messages.append(("user", user))
        stream = client.chat(messages, opts, args.timeout)  # type: ignore[attr-defined]
        sys.stdout.write("phi> ")
        messages.append(("assistant", _print_stream(stream)))


if __name__ == "__main__":
    sys.exit(main())
