"""Session fixtures: one tiny Phi-4 stand-in, one 4-bit artifact, one running daemon for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgephi.testing import Daemon, run_daemon

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGEPHI_CACHE_DIR", REPO / ".cache"))

# The shared daemon's admission limits: small, so the limit test can hit them with a few streams.
MAX_STREAMS = 3
MAX_QUEUED = 1
STREAM_WRITE_TIMEOUT_S = 5


@pytest.fixture(scope="session")
def dev_models() -> tuple[Path, Path]:
    """``(bf16 checkpoint, W4A16 artifact)`` of the tiny Phi-4 stand-in (built once, cached in .cache/)."""
    from edgephi.devmodel import build_dev_artifact
    from tests._models import third_party_pipes_collected

    with third_party_pipes_collected():  # the first build runs auto-round in this process
        return build_dev_artifact(CACHE)


@pytest.fixture(scope="session")
def artifact(request: pytest.FixtureRequest) -> Path:
    """The artifact the daemons serve: the tiny W4A16 stand-in, or ``$EDGEPHI_TEST_ARTIFACT`` if set."""
    override = os.environ.get("EDGEPHI_TEST_ARTIFACT")
    if override:
        return Path(override)
    return request.getfixturevalue("dev_models")[1]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def daemon(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The session's one real daemon (real vLLM engine, real gRPC on 127.0.0.1, port 0)."""
    with run_daemon(
        artifact,
        tmp_path_factory.mktemp("daemon"),
        max_concurrent_streams=MAX_STREAMS,
        max_queued_requests=MAX_QUEUED,
        stream_write_timeout_s=STREAM_WRITE_TIMEOUT_S,
    ) as d:
        yield d
