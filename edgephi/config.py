"""Daemon settings: one flat pydantic-settings model read from ``EDGEPHI_*`` variables and an env file.

The systemd unit loads ``/etc/edgephi/edgephi.env`` with ``EnvironmentFile=``, so a typo there arrives as an
unknown ``EDGEPHI_*`` environment variable: :func:`load_settings` rejects those too (pydantic-settings only
rejects unknown keys of the env file itself), naming the unknown key and the closest known one.

Nobody else parses the environment; :func:`engine_args` is the one place settings become vLLM arguments.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

ENV_PREFIX = "EDGEPHI_"

# Engine sequence slots kept beyond max_concurrent_streams for the watchdog's liveness probe.
PROBE_SEATS = 1


class ConfigError(Exception):
    """The configuration is invalid; the message names the setting and the fix."""


class Settings(BaseSettings):
    """Every daemon setting. Environment variable = ``EDGEPHI_`` + the upper-cased field name."""

    # allow_inf_nan=False: "inf" or "nan" is never a valid limit, timeout or grace.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False)

    # --- model / engine -------------------------------------------------------------------------------
    model: str = Field(
        "/var/lib/edgephi/models/current",
        description="Artifact directory (or symlink such as the store's `current`) or hub repo id.",
    )
    served_model_name: str = Field("phi-4-w4a16", description="Name reported by GetModelInfo.")
    max_model_len: int = Field(16384, gt=0, description="Context length in tokens (prompt + completion).")
    dtype: str = Field("auto", description="Activation dtype passed to vLLM (auto, bfloat16, float16).")
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype passed to vLLM (auto, fp8, ...).")
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0, description="vLLM's device-memory share.")
    kv_cache_space_gib: float | None = Field(
        None, gt=0, description="KV-cache size in GiB (vLLM kv_cache_memory_bytes); unset = vLLM profiles it."
    )
    max_num_batched_tokens: int | None = Field(None, gt=0, description="vLLM scheduler token budget/step.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile (faster start).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    engine_extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Extra vLLM EngineArgs as JSON (escape hatch)."
    )
    artifact_digest: str = Field("", description="Override for GetModelInfo's digest (else manifest's).")

    # --- defaults applied to requests that leave a sampling field unset -------------------------------
    default_max_tokens: int = Field(256, gt=0)
    default_temperature: float = Field(0.0, ge=0.0, le=2.0, description="vLLM accepts temperatures in [0, 2].")
    max_stop_strings: int = Field(8, ge=0, description="Longest stop list a request may send.")
    max_stop_string_chars: int = Field(64, gt=0)

    # --- server ---------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 or a LAN address to serve the LAN.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    port_file: Path | None = Field(
        None, description='Once listening, write {"grpc": port, "metrics": port} here as JSON (tests).'
    )
    metrics_host: str = Field("127.0.0.1", description="Prometheus endpoint bind address.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus endpoint port; unset = off.")
    drain_grace_s: float = Field(
        30.0, ge=0.0, le=3600.0, description="SIGTERM: time in-flight streams get to finish (s)."
    )
    stream_write_timeout_s: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="A stream whose client reads nothing for this long (s) is aborted and its slot freed.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # --- connections: HTTP/2 keepalive (edgephi.grpc_door.server.channel_options maps them to grpc's args) --
    keepalive_time_s: float = Field(
        30.0,
        gt=0.0,
        le=7200.0,
        description="The server pings a connection that sent it nothing for this long (s), idle or not "
        "(grpc's server default: 2 h).",
    )
    keepalive_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=3600.0,
        description="A peer that acknowledges neither that ping nor sent data within this long (s) is dropped: "
        "its streams end, their engine requests are aborted and their slots freed (grpc's default: 20 s).",
    )
    min_client_ping_interval_s: float = Field(
        5.0,
        ge=0.0,
        le=7200.0,
        description="Client pings closer together than this (s) are strikes, with or without calls in flight; "
        "the third strike with no data sent in between gets GOAWAY too_many_pings (grpc's default: 300 s, and "
        "none without calls). 5 lets clients ping every 10 s with room for timer slop; 0 = any rate.",
    )

    # --- LAN security -------------------------------------------------------------------------------------
    auth_token_file: Path | None = Field(None, description="Bearer token file (mode 0600); unset = no auth.")
    tls_cert_file: Path | None = Field(None, description="Server certificate chain (PEM); unset = plaintext.")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(None, description="CA for client certificates: enables mTLS.")

    # --- memory guards ------------------------------------------------------------------------------------
    vram_budget_gib: float | None = Field(
        None, gt=0, description="Device memory this service may use; context/KV dtype are fitted to it."
    )
    memory_soft_limit_gib: float | None = Field(None, gt=0, description="Service RSS: shed new requests above.")
    memory_hard_limit_gib: float | None = Field(None, gt=0, description="Service RSS: drain and exit above.")
    min_available_soft_gib: float | None = Field(None, ge=0, description="Host available RAM: shed below.")
    min_available_hard_gib: float | None = Field(None, ge=0, description="Host available RAM: exit below.")
    memory_check_interval_s: float = Field(2.0, gt=0)

    # --- admission control ----------------------------------------------------------------------------
    max_concurrent_streams: int = Field(16, gt=0, description="Streams generating at once (engine slots).")
    max_queued_requests: int = Field(32, ge=0, description="Requests waiting for a slot; beyond: refused.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("port_file")
    @classmethod
    def _port_file_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.parent.is_dir():
            raise ValueError(f"directory {value.parent} does not exist")
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(
                f"EDGEPHI_DEFAULT_MAX_TOKENS ({self.default_max_tokens}) must be below EDGEPHI_MAX_MODEL_LEN "
                f"({self.max_model_len})"
            )
        if (
            self.memory_soft_limit_gib
            and self.memory_hard_limit_gib
            and self.memory_soft_limit_gib >= self.memory_hard_limit_gib
        ):
            raise ValueError("EDGEPHI_MEMORY_SOFT_LIMIT_GIB must be below EDGEPHI_MEMORY_HARD_LIMIT_GIB")
        return self


def _unknown_env_keys(environ: dict[str, str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    known |= CLI_ENV_KEYS
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


# Read by the CLI client commands and the dev-model builder, not by the daemon (but allowed beside it).
CLI_ENV_KEYS = frozenset(ENV_PREFIX + k for k in ("ENV_FILE", "CACHE_DIR", "CLIENT_HOST", "CLIENT_PORT", "STORE_DIR"))


def load_settings(env_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings from ``EDGEPHI_*`` variables, then ``env_file`` (if given), then ``overrides``.

    Raises:
        ConfigError: unknown ``EDGEPHI_*`` key (in the environment or the file), missing env file, or an
            invalid value; the message names every offending setting.
    """
    unknown = _unknown_env_keys(dict(os.environ))
    if unknown:
        raise ConfigError(_unknown_message(unknown, "environment"))
    if env_file is not None and not env_file.is_file():
        raise ConfigError(f"env file {env_file} does not exist (set --env-file or EDGEPHI_ENV_FILE)")
    try:
        return Settings(_env_file=env_file, **overrides)
    except SettingsError as exc:  # a value pydantic-settings cannot even parse, e.g. bad JSON for a dict
        raise ConfigError(f"invalid configuration: {exc}; dict settings take a JSON object") from None
    except ValidationError as exc:
        problems = []
        extras = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":  # an env file's unknown key: its loc is the key as written
                key = name.upper()
                extras.append(key if key.startswith(ENV_PREFIX) else ENV_PREFIX + key)
            elif not name:  # a check across settings: its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
            else:
                problems.append(f"{ENV_PREFIX}{name.upper()}: {err['msg']}")
        if extras:
            problems.append(_unknown_message(extras, f"env file {env_file}"))
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _unknown_message(keys: list[str], where: str) -> str:
    # Compared without the shared prefix, which would make every EDGEPHI_ name look close to every other.
    known = [n.upper() for n in Settings.model_fields] + [k.removeprefix(ENV_PREFIX) for k in sorted(CLI_ENV_KEYS)]
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key.upper().removeprefix(ENV_PREFIX), known, n=1)
        parts.append(f"{key}" + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""))
    return f"unknown setting(s) in {where}: " + ", ".join(parts)


def engine_args(settings: Settings) -> dict[str, Any]:
    """The keyword arguments for vLLM's ``AsyncEngineArgs`` that these settings imply.

    ``max_num_seqs`` is the admission limit on concurrent streams plus one seat for the watchdog's one-token
    probe, so the engine's batch never exceeds what admission control lets in (CUDA-graph capture sizes
    match it) and the probe is never queued behind admitted streams (a full daemon is not a wedged one).
    """
    args: dict[str, Any] = {
        "model": settings.model,
        "served_model_name": settings.served_model_name,
        "max_model_len": settings.max_model_len,
        "dtype": settings.dtype,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_num_seqs": settings.max_concurrent_streams + PROBE_SEATS,
        "enforce_eager": settings.enforce_eager,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "disable_log_stats": True,
        "enable_prefix_caching": True,
    }
    if settings.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if settings.kv_cache_space_gib is not None:
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_space_gib * 2**30)
    args.update(settings.engine_extra_args)
    return args
