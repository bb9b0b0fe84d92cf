"""The ``edgephi`` command line (edgephi/cli/): one table of commands behind one dispatcher, argument errors that
exit 2 naming the fix, and exit statuses that are :class:`ExitCode` members. In-process, with a fake gRPC client
and fake doctor checks: no daemon, no subprocess (``python -m edgephi.cli`` itself: tests/integration)."""

from __future__ import annotations

import argparse
import ast
import builtins
import importlib
import importlib.util
import json
import os
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest

import edgephi.cli
import edgephi.client
import edgephi.devmodel
import edgephi.doctor
from edgephi.cli import COMMANDS, GROUPS, main, parser
from edgephi.exit_codes import ExitCode
from edgephi.v1 import inference_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
ALL_COMMANDS = [
    "serve",
    "generate",
    "chat",
    "health",
    "info",
    "count-tokens",
    "doctor",
    "devmodel",
    "quantize",
    "fetch",
    "verify",
    "models",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("EDGEPHI_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _subcommands(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# ----------------------------------------------------------------------------------------- the table


def test_the_table_covers_every_command_in_help_order() -> None:
    assert list(COMMANDS) == ALL_COMMANDS
    assert list(_subcommands(parser())) == ALL_COMMANDS
    for name, command in COMMANDS.items():
        assert command.name == name
        sub = argparse.ArgumentParser(prog="edgephi").add_subparsers()
        assert command.add_parser(sub).prog == f"edgephi {name}"  # each adds exactly its own parser
        assert list(sub.choices) == [name]


def test_one_module_per_command_group() -> None:
    groups = {g.__name__.rsplit(".", 1)[1]: [c.name for c in g.COMMANDS] for g in GROUPS}
    assert groups == {
        "serve": ["serve"],
        "client": ["generate", "chat", "health", "info", "count-tokens"],
        "doctor": ["doctor"],
        "devmodel": ["devmodel"],
        "models": ["quantize", "fetch", "verify", "models"],
    }


def test_the_console_script_and_python_m_reach_the_one_dispatcher() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["edgephi"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    assert importlib.util.find_spec("edgephi.cli.__main__") is not None  # python -m edgephi.cli
    assert importlib.util.find_spec("edgephi.__main__") is not None  # python -m edgephi


def test_no_cli_module_has_exit_constants_of_its_own() -> None:
    """Exit statuses come from edgephi.exit_codes: no ``EXIT_*`` names, no ``return 2`` in edgephi/cli/."""
    for path in sorted((REPO / "edgephi" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                assert not node.id.startswith("EXIT_"), f"{path.name}:{node.lineno} defines {node.id}"
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                assert not isinstance(node.value.value, int), f"{path.name}:{node.lineno} returns a literal"


# ---------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["info", "--port", "99999"], "argument --port: '99999' is not a TCP port (1-65535; also EDGEPHI_CLIENT_PORT)"),
        (["generate"], "the following arguments are required: prompt"),
        (["fetch", "https://example.org/a.tar"], "the following arguments are required: --sha256"),
        (
            ["quantize", "--model", "m", "--name", "n", "--profile", "huge"],
            "argument --profile: invalid choice: 'huge'",
        ),
        (["bogus"], "invalid choice: 'bogus'"),
        (["serve", "--nope"], "unrecognized arguments: --nope"),
        ([], "the following arguments are required: command"),
    ],
)
def test_argument_errors_exit_2_naming_the_fix(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_bad_client_port_variable_is_named(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("EDGEPHI_CLIENT_PORT", "http")
    with pytest.raises(SystemExit) as exc:
        main(["health"])
    assert exc.value.code == ExitCode.USAGE
    assert "'http' is not a TCP port (1-65535; also EDGEPHI_CLIENT_PORT)" in capsys.readouterr().err


# ------------------------------------------------------------------------------ client commands (fake)


class FakeClient:
    """Stands in for edgephi.client.Client: records what the command asked for, answers from class fields."""

    instances: ClassVar[list[FakeClient]] = []
    status = "SERVING"
    error: grpc.RpcError | None = None

    def __init__(self, conn: edgephi.client.Connection) -> None:
        self.conn = conn
        self.calls: list[tuple[str, Any]] = []
        self.closed = False
        FakeClient.instances.append(self)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.closed = True

    def _call(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if self.error is not None:
            raise self.error

    def health(self, service: str, timeout: float) -> str:
        self._call("health", (service, timeout))
        return self.status

    def model_info(self, timeout: float) -> str:
        self._call("model_info", timeout)
        return "model_name: tiny\n"

    def count_tokens(self, text: str, timeout: float) -> int:
        self._call("count_tokens", (text, timeout))
        return len(text.split())

    def generate(self, prompt: str, opts: pb.SamplingOptions, timeout: float | None) -> Iterator[pb.GenerateResponse]:
        self._call("generate", (prompt, opts, timeout))
        yield pb.GenerateResponse(text="Hel")
        yield pb.GenerateResponse(
            text="lo", finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=3, completion_tokens=2)
        )

    def chat(self, messages: list[tuple[str, str]], opts: pb.SamplingOptions, timeout: float | None) -> Iterator[Any]:
        self._call("chat", list(messages))
        yield pb.ChatResponse(text=f"reply {len(messages)}", finish_reason=pb.FINISH_REASON_STOP)


class FakeRpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "engine dead"


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(edgephi.client, "Client", FakeClient)
    monkeypatch.setattr(FakeClient, "instances", [])
    return FakeClient


def test_health_exits_0_only_when_serving(
    fake_client: type[FakeClient], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    rc = main(["health", "--host", "10.0.0.2", "--port", "6000", "--token-file", str(token)])
    assert rc is ExitCode.OK and capsys.readouterr().out == "SERVING\n"
    client = fake_client.instances[-1]
    assert (client.conn.host, client.conn.port, client.conn.token) == ("10.0.0.2", 6000, "s3cret")
    assert client.calls == [("health", ("", 10.0))] and client.closed  # unary default deadline: 10 s
    monkeypatch.setattr(FakeClient, "status", "NOT_SERVING")
    assert main(["health", "--timeout", "2.5"]) is ExitCode.FAILED
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert fake_client.instances[-1].calls == [("health", ("", 2.5))]


def test_info_and_count_tokens_print_the_answer(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info"]) is ExitCode.OK
    assert capsys.readouterr().out == "model_name: tiny\n"
    assert main(["count-tokens", "three little words"]) is ExitCode.OK
    assert capsys.readouterr().out == "3\n"


def test_generate_streams_text_then_reason_and_usage(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "hi", "--max-tokens", "2", "--temperature", "0.5", "--stop", "\n"]) is ExitCode.OK
    out = capsys.readouterr()
    assert out.out == "Hello\n"
    assert out.err.strip().endswith("[length; prompt 3 tokens, completion 2 tokens]")
    ((name, (prompt, opts, timeout)),) = fake_client.instances[-1].calls
    assert (name, prompt, timeout) == ("generate", "hi", None)  # streams get no deadline unless asked
    assert opts.max_tokens == 2 and opts.temperature == 0.5 and list(opts.stop) == ["\n"]
    assert not opts.HasField("top_p")  # unset stays unset: the server's default


def test_chat_sends_the_history_with_each_scripted_turn(
    fake_client: type[FakeClient], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chat", "--system", "be brief", "-m", "one", "-m", "two"]) is ExitCode.OK
    calls = fake_client.instances[-1].calls
    assert calls == [
        ("chat", [("system", "be brief"), ("user", "one")]),
        ("chat", [("system", "be brief"), ("user", "one"), ("assistant", "reply 2"), ("user", "two")]),
    ]
    assert capsys.readouterr().out == "phi> reply 2\nphi> reply 4\n"


def test_interactive_chat_skips_blank_lines_and_ends_at_eof(
    fake_client: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = iter(["hello", "   ", "again"])

    def fake_input(prompt: str) -> str:
        assert prompt == "you> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat"]) is ExitCode.OK
    assert [msgs[-1] for _, msgs in fake_client.instances[-1].calls] == [("user", "hello"), ("user", "again")]


def test_a_failed_rpc_exits_1_with_its_status(
    fake_client: type[FakeClient], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(FakeClient, "error", FakeRpcError())
    assert main(["generate", "hi"]) is ExitCode.FAILED
    assert capsys.readouterr().err.strip() == "edgephi: UNAVAILABLE: engine dead"
    assert fake_client.instances[-1].closed


@pytest.mark.parametrize("flag", ["--token-file", "--ca", "--cert", "--key"])
def test_an_unreadable_file_exits_2_before_connecting(
    fake_client: type[FakeClient], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent.pem"
    assert main(["info", flag, str(missing)]) is ExitCode.USAGE
    assert capsys.readouterr().err.strip() == f"edgephi: {flag} {missing}: no such readable file"
    assert fake_client.instances == []


# ---------------------------------------------------------------------------------- the other groups


def test_serve_with_a_bad_setting_exits_78_before_loading(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("EDGEPHI_PROT", "1")
    assert main(["serve"]) is ExitCode.CONFIG
    assert "EDGEPHI_PROT (did you mean EDGEPHI_PORT?)" in capsys.readouterr().err
    clean_env.delenv("EDGEPHI_PROT")
    assert main(["serve", "--env-file", str(tmp_path / "absent.env")]) is ExitCode.CONFIG
    assert "absent.env does not exist" in capsys.readouterr().err


def test_doctor_exits_1_naming_the_failed_checks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checks = [
        edgephi.doctor.Check("config", True, "valid (environment)"),
        edgephi.doctor.Check("gpu", False, "NVML unavailable", "install the NVIDIA driver"),
        edgephi.doctor.Check("unit", None, "systemctl not found"),
    ]
    asked: list[tuple[Path | None, bool]] = []

    def run_checks(env_file: Path | None, cpu_only: bool = False) -> list[edgephi.doctor.Check]:
        asked.append((env_file, cpu_only))
        return checks

    monkeypatch.setattr(edgephi.doctor, "run_checks", run_checks)
    assert main(["doctor"]) is ExitCode.FAILED
    out = capsys.readouterr().out
    assert "[FAIL] gpu: NVML unavailable\n        fix: install the NVIDIA driver" in out
    assert out.endswith("cannot serve: gpu\n")
    checks[1] = edgephi.doctor.Check("gpu", None, "skipped: --cpu-only (vLLM CPU backend)")
    assert main(["doctor", "--cpu-only", "--env-file", "/etc/edgephi/edgephi.env"]) is ExitCode.OK
    assert capsys.readouterr().out.endswith("can serve\n")
    assert asked == [(None, False), (Path("/etc/edgephi/edgephi.env"), True)]


def test_devmodel_prints_the_artifact_or_the_bf16_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[tuple[Path | None, int]] = []

    def build_dev_artifact(cache_dir: Path | None = None, iters: int = 32) -> tuple[Path, Path]:
        built.append((cache_dir, iters))
        return tmp_path / "bf16", tmp_path / "w4a16"

    monkeypatch.setattr(edgephi.devmodel, "build_dev_artifact", build_dev_artifact, raising=False)
    assert main(["devmodel", "--cache-dir", str(tmp_path)]) is ExitCode.OK
    assert capsys.readouterr().out == f"{tmp_path / 'w4a16'}\n"
    assert main(["devmodel", "--bf16", "--iters", "4"]) is ExitCode.OK
    assert capsys.readouterr().out == f"{tmp_path / 'bf16'}\n"
    assert built == [(tmp_path, 32), (None, 4)]


def test_store_commands_exit_with_exit_code_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--store", str(tmp_path / "absent")]) is ExitCode.FAILED
    assert "no artifact store at" in capsys.readouterr().err
    assert main(["models", "list", "--json", "--store", str(tmp_path)]) is ExitCode.OK
    assert json.loads(capsys.readouterr().out) == {"store": str(tmp_path), "current": None, "artifacts": []}
    assert main(["verify", "nothing-here", "--store", str(tmp_path)]) is ExitCode.FAILED
    assert "no such artifact" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(env_file: Path | None, cpu_only: bool = False) -> list[edgephi.doctor.Check]:
        raise KeyboardInterrupt

    monkeypatch.setattr(edgephi.doctor, "run_checks", interrupted)
    assert main(["doctor"]) == 130


def test_nothing_listening_names_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["count-tokens", "hi", "--port", str(port), "--timeout", "2"]) == ExitCode.FAILED
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and f"is `edgephi serve` running and listening on 127.0.0.1:{port}?" in err
