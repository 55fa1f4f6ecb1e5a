"""The container's command, `python -m dockerworker run`: wiring and exit codes.

Owns: the order of startup, signal handling, and the mapping of every fatal
failure to an exit code, so the controller can tell them apart without
reading logs:

    0  clean shutdown (SIGTERM/SIGINT)
    1  unexpected internal error
    2  configuration error (a variable missing or malformed, port in use)
    3  code download failed (controller unreachable after retries, 4xx, bad
       answer, sha256 mismatch)
    4  code invalid (bad zip, unsafe member, syntax error, no entrypoint)
    5  the broker refused the worker's exchange or queues (e.g. `worker_<id>`
       exists with other arguments)
    6  `process` did not return within WORKER_PROCESS_TIMEOUT_S; its message
       went to `errors`, and a restart gets the worker going again

An unreachable broker is not fatal: the worker retries with backoff.

Start-up, in order: config → health endpoint (and the ready reporter, with
WORKER_READY_URL) → the code download starts on a thread of its own → the
AMQP side (`messaging` and what it imports: pamqp, the reactor) is imported
while the download waits on the network → the archive is unpacked and the
user's module imported, on the main thread (user code may expect it) →
consume. The consumer attaches only once the code is loaded, so a broken
archive never takes a message; readiness, `/readyz` and the ready report
follow from the attach.
"""

from __future__ import annotations

import enum
import gc
import logging
import signal
import threading
from typing import Mapping

from . import bundle, codefetch, codeload, config as config_module, logs
from .codeload import UserCode
from .config import Config, ConfigError
from .health import READY_FILE_REFRESH_S, HealthServer, Readiness, ReadyFile, ReadyReporter, runtime_file
from .reactor import Reactor


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    CONFIG = 2
    CODE_DOWNLOAD = 3
    CODE_INVALID = 4
    BROKER_TOPOLOGY = 5
    PROCESS_TIMEOUT = 6


def run(env: Mapping[str, str]) -> int:
    """Run the worker until a signal; return the process exit code."""
    logs.setup()
    try:
        config = config_module.load(env)
    except ConfigError as exc:
        logs.event("config_error", level=logging.ERROR, error=str(exc))
        return ExitCode.CONFIG
    logs.setup(level=config.log_level)
    stop = threading.Event()
    reactor = Reactor()
    for signum in (signal.SIGTERM, signal.SIGINT):
        reactor.add_signal_handler(signum, lambda signum: _on_signal(stop, signum))
    try:
        return _run_configured(config, stop, reactor)
    except Exception:
        logging.getLogger("dockerworker").exception("internal_error")
        return ExitCode.INTERNAL


HEALTH_PORT_FILE = runtime_file("dockerworker.health-port")


def _record_health_port(port: int) -> None:
    """Leaves the bound port where the image's HEALTHCHECK finds it: with
    WORKER_HEALTH_PORT=0 (workers sharing the host network) only the process
    knows which port it got."""
    try:
        with open(HEALTH_PORT_FILE, "w", encoding="ascii") as f:
            f.write(str(port))
    except OSError as exc:  # a health check that can't find the port is not worth dying for
        logs.event("health_port_unrecorded", level=logging.WARNING, error=str(exc))


def _run_configured(config: Config, stop: threading.Event, reactor: Reactor) -> int:
    readiness = Readiness()
    try:
        health = HealthServer(readiness, config.health_port).start()
    except OSError as exc:
        logs.event("config_error", level=logging.ERROR, error=f"health port {config.health_port}: {exc}")
        return ExitCode.CONFIG
    _record_health_port(health.port)
    ready_file = ReadyFile().attach(readiness)
    if config.ready_url is not None:
        ReadyReporter(config.ready_url, readiness).start()
    debug_port = _start_debugging() if config.debug else None
    if config.debug and debug_port is None:
        return ExitCode.CONFIG
    logs.event("starting", worker_id=config.worker_id, revision=config.revision, health_port=health.port)
    download = _Download(config, stop, reactor).start()
    from . import messaging  # noqa: F401  (imported while the download is on the wire)

    # The runtime's imports are done: user code imports as Python always does.
    bundle.uninstall()

    try:
        code = _load_code(config, download.result())
    except _Fatal as fatal:
        return fatal.code
    if code is None:
        return ExitCode.OK  # stopped while downloading
    if debug_port is not None:
        from . import debug

        debug.announce(debug_port)
    readiness.set(code_loaded=True)
    # The collector was off for the start (`__main__`). What the start made
    # lives as long as the process: frozen, it is not scanned again, and the
    # first collection is not one over every object of the start.
    gc.freeze()
    gc.enable()
    return _consume(config, code, readiness, ready_file, stop, reactor)


def _start_debugging() -> int | None:
    """The debug adapter (WORKER_DEBUG=1), after the threads that must never
    stop at a breakpoint and before the one that runs user code; its port,
    or None if it cannot start."""
    from . import debug

    try:
        return debug.listen()
    except Exception as exc:  # e.g. an image without debugpy
        logs.event("config_error", level=logging.ERROR, error=f"cannot start the debug adapter: {exc!r}")
        return None


class _Fatal(Exception):
    def __init__(self, code: ExitCode) -> None:
        self.code = code


class _Download:
    """The code download, on a thread of its own; `result()` waits for it.

    Only the download: unpacking and importing the user's code stay on the
    main thread.
    """

    def __init__(self, config: Config, stop: threading.Event, reactor: Reactor) -> None:
        assert config.code_url is not None
        self._reactor = reactor
        self._url = config.code_url
        self._sha256 = config.code_sha256
        self._policy = codefetch.FetchPolicy(attempts=config.code_fetch_attempts, timeout_s=config.code_fetch_timeout_s)
        self._stop = stop
        self._archive: bytes | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="code-download", daemon=True)

    def start(self) -> "_Download":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._archive = codefetch.fetch(self._url, self._sha256, self._policy, self._stop)
        except BaseException as exc:  # handed to the main thread by result()
            self._error = exc
        finally:
            self._done.set()
            self._reactor.wake()

    def result(self) -> bytes | None:
        """The archive; None when stopped meanwhile. Raises `_Fatal` when the download failed.

        Runs the reactor meanwhile: a signal's callback runs there."""
        self._reactor.run_until(lambda: self._done.is_set() or self._stop.is_set())
        if not self._done.is_set():
            # Even in the middle of a request that has not timed out yet:
            # the thread is a daemon, and is left behind.
            return None
        if isinstance(self._error, codefetch.Interrupted):
            return None
        if isinstance(self._error, codefetch.CodeFetchError):
            logs.event("code_download_failed", level=logging.ERROR, error=str(self._error), url=self._url)
            raise _Fatal(ExitCode.CODE_DOWNLOAD) from self._error
        if self._error is not None:
            raise self._error
        return self._archive


def _load_code(config: Config, archive: bytes | None) -> UserCode | None:
    if archive is None:
        return None
    try:
        subdir: str | None = None
        if config.debug:
            from .debug import DEBUG_CODE_SUBDIR as subdir
        code = codeload.load_archive(archive, config.code_dir, config.entrypoint, config.limits, subdir)
    except codeload.CodeInvalid as exc:
        logs.event("code_invalid", level=logging.ERROR, error=str(exc), revision=config.revision)
        raise _Fatal(ExitCode.CODE_INVALID) from exc
    logs.event("code_loaded", entrypoint=code.entrypoint, revision=config.revision, bytes=len(archive))
    return code


def _consume(
    config: Config, code: UserCode, readiness: Readiness, ready_file: ReadyFile, stop: threading.Event, reactor: Reactor
) -> int:
    """Consume until a signal; the exit code for how it ended."""
    from . import messaging

    if config.debug:
        from . import debug

        debug.untrace_this_thread()
    if stop.is_set():
        return ExitCode.OK
    _refresh_every(reactor, ready_file, READY_FILE_REFRESH_S)
    try:
        messaging.run(config, code, readiness, reactor, stop)
    except messaging.TopologyError as exc:
        logs.event("broker_topology_error", level=logging.ERROR, error=str(exc))
        return ExitCode.BROKER_TOPOLOGY
    except messaging.ProcessStuck as exc:
        logs.event("process_timeout", level=logging.ERROR, error=str(exc))
        return ExitCode.PROCESS_TIMEOUT
    logs.event("stopped")
    return ExitCode.OK


def _refresh_every(reactor: Reactor, ready_file: ReadyFile, interval_s: float) -> None:
    """Touch the ready file from the reactor every `interval_s`, for as
    long as it turns: the liveness the HEALTHCHECK reads from its age.
    One timer; it stops with the reactor."""

    def refresh() -> None:
        ready_file.refresh()
        reactor.call_later(interval_s, refresh)

    reactor.call_later(interval_s, refresh)


def _on_signal(stop: threading.Event, signum: int) -> None:
    """SIGTERM or SIGINT, on the reactor's thread: stop (the download's
    backoff sleeps and every wait of the connection's life look at `stop`)."""
    if not stop.is_set():
        logs.event("shutdown_requested", signal=signal.Signals(signum).name)
    stop.set()
