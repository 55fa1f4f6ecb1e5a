"""Configuration of the runtime, read once from the environment.

Owns: the names of every environment variable the dockerworker reads, their
defaults and their validation. Everything else receives a `Config` value and
never looks at `os.environ` itself.

The names of docs/compatibility.md §3 (WORKER_ID, AMQP_HOST, AMQP_XCHG, CODE_URL,
CODE_ENTRYPOINT, ENDPOINT_DEVICES) are enough to run; everything else is an
optional extra with a default, so an older controller that only knows those
names still gets a working worker.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Mapping, NamedTuple
from urllib.parse import urlsplit

DEFAULT_ENTRYPOINT = "main.main"
DEFAULT_EXCHANGE = "pipeline.messages"
ERRORS_ROUTING_KEY = "errors"


class ConfigError(Exception):
    """The environment does not describe a runnable worker (exit code 2)."""


class Limits(NamedTuple):
    """Bounds on what an unpacked code archive may contain."""

    max_unpacked_bytes: int = 50 * 1024 * 1024
    max_members: int = 1000


_DEFAULT_LIMITS = Limits()


class Config(NamedTuple):
    """Everything the runtime needs to know, as one typed value."""

    worker_id: str
    amqp_url: str
    exchange: str
    code_url: str | None
    entrypoint: str = DEFAULT_ENTRYPOINT
    devices_endpoint: str | None = None
    revision: str | None = None
    code_sha256: str | None = None
    health_port: int = 8080
    prefetch: int = 64
    max_attempts: int = 5
    retry_delay_ms: int = 5000
    max_redeliveries: int = 20
    code_dir: str = "/tmp/usercode"
    code_fetch_attempts: int = 10
    code_fetch_timeout_s: float = 10.0
    shutdown_grace_s: float = 5.0
    process_timeout_s: float = 60.0
    ready_url: str | None = None
    log_level: int = logging.INFO
    stats_interval_s: float = 10.0
    debug: bool = False
    # Records its last `record_keep` messages for workerctl (`recording`); 0: off.
    record_keep: int = 0
    limits: Limits = _DEFAULT_LIMITS

    @property
    def queue(self) -> str:
        """The worker's own quorum queue, as docs/compatibility.md §4 names it."""
        return f"worker_{self.worker_id}"

    @property
    def retry_queue(self) -> str:
        """The delay queue a transient failure waits in before its next attempt."""
        return f"worker_{self.worker_id}.retry"

    @property
    def routing_key(self) -> str:
        """The pipeline step name of this worker: its UUID."""
        return self.worker_id


def load(env: Mapping[str, str], *, need_code_url: bool = True) -> Config:
    """Build a `Config` from an environment mapping, or raise `ConfigError`."""
    code_url = _optional(env, "CODE_URL")
    debug = _flag(env, "WORKER_DEBUG")
    if need_code_url and code_url is None:
        raise ConfigError("CODE_URL must be set: the worker has no code to run")
    return Config(
        worker_id=_worker_id(env),
        amqp_url=_amqp_url(_required(env, "AMQP_HOST")),
        exchange=_exchange(env),
        code_url=code_url,
        entrypoint=_entrypoint(env),
        devices_endpoint=_optional(env, "ENDPOINT_DEVICES"),
        revision=_optional(env, "WORKER_REVISION"),
        code_sha256=_sha256(env),
        health_port=_int(env, "WORKER_HEALTH_PORT", 8080, minimum=0, maximum=65535),
        prefetch=_int(env, "WORKER_PREFETCH", 64, minimum=1, maximum=65535),
        max_attempts=_int(env, "WORKER_MAX_ATTEMPTS", 5, minimum=1),
        retry_delay_ms=_int(env, "WORKER_RETRY_DELAY_MS", 5000, minimum=0),
        max_redeliveries=_int(env, "WORKER_MAX_REDELIVERIES", 20, minimum=1),
        code_dir=_optional(env, "WORKER_CODE_DIR") or "/tmp/usercode",
        code_fetch_attempts=_int(env, "WORKER_CODE_FETCH_ATTEMPTS", 10, minimum=1),
        code_fetch_timeout_s=_float(env, "WORKER_CODE_FETCH_TIMEOUT_S", 10.0),
        shutdown_grace_s=_float(env, "WORKER_SHUTDOWN_GRACE_S", 5.0),
        # A `process` held at a breakpoint is not stuck: no watchdog while
        # debugging, unless one is asked for.
        process_timeout_s=_float(env, "WORKER_PROCESS_TIMEOUT_S", 0.0 if debug else 60.0),
        ready_url=_http_url(env, "WORKER_READY_URL"),
        log_level=_log_level(env),
        stats_interval_s=_float(env, "WORKER_STATS_INTERVAL_S", 10.0),
        debug=debug,
        record_keep=_int(env, "WORKER_RECORD_KEEP", 0, minimum=0, maximum=100_000),
        limits=Limits(
            max_unpacked_bytes=_int(env, "WORKER_CODE_MAX_BYTES", _DEFAULT_LIMITS.max_unpacked_bytes, minimum=1),
            max_members=_int(env, "WORKER_CODE_MAX_MEMBERS", _DEFAULT_LIMITS.max_members, minimum=1),
        ),
    )


def _optional(env: Mapping[str, str], name: str) -> str | None:
    # An empty variable is how compose files and controllers say "unset".
    value = env.get(name, "").strip()
    return value or None


def _required(env: Mapping[str, str], name: str) -> str:
    value = _optional(env, name)
    if value is None:
        raise ConfigError(f"{name} must be set")
    return value


def _worker_id(env: Mapping[str, str]) -> str:
    raw = _required(env, "WORKER_ID")
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ConfigError(f"WORKER_ID must be a UUID, got {raw!r}") from None


def _amqp_url(raw: str) -> str:
    # The existing controller passes a full URL; a bare "host[:port]" is
    # accepted too because hand-written compose files often do that.
    if "://" not in raw:
        raw = f"amqp://guest:guest@{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ConfigError(f"AMQP_HOST must be an amqp:// or amqps:// URL, got scheme {parts.scheme!r}")
    return raw


# The exchange names the AMQP client's codec (pamqp) accepts: at most 127 of these characters.
_EXCHANGE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]{1,127}")


def _exchange(env: Mapping[str, str]) -> str:
    value = _optional(env, "AMQP_XCHG") or DEFAULT_EXCHANGE
    if not _EXCHANGE_NAME.fullmatch(value):
        raise ConfigError(
            f"AMQP_XCHG must be at most 127 letters, digits and -_.:@#,/+ or spaces, got {value!r}"
        )
    return value


def _entrypoint(env: Mapping[str, str]) -> str:
    value = _optional(env, "CODE_ENTRYPOINT") or DEFAULT_ENTRYPOINT
    module, _, function = value.rpartition(".")
    if not module or not function.isidentifier():
        raise ConfigError(f"CODE_ENTRYPOINT must be 'module.function', got {value!r}")
    return value


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    # Otherwise opaque (its query holds the controller's token): only what a
    # POST needs is checked, so a typo shows at start, not as silent reports.
    value = _optional(env, name)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL, got scheme {parts.scheme!r}")
    return value


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _log_level(env: Mapping[str, str]) -> int:
    value = (_optional(env, "WORKER_LOG_LEVEL") or "info").lower()
    if value not in LOG_LEVELS:
        raise ConfigError(f"WORKER_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return LOG_LEVELS[value]


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = (_optional(env, name) or "0").lower()
    if value not in ("0", "1", "false", "true"):
        raise ConfigError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def _sha256(env: Mapping[str, str]) -> str | None:
    value = _optional(env, "CODE_SHA256")
    if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ConfigError("CODE_SHA256 must be 64 hex digits")
    return value.lower() if value else None


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = _optional(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum or 'any'}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _optional(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value
