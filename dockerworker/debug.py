"""Breakpoints in user code: the debug adapter of a worker started with
`workerctl worker dev --debug` (WORKER_DEBUG=1), and the relay that reaches it.

Owns: starting debugpy, where the user's code lives while debugging (a fixed
path, for the client's path mapping), which threads may stop at a breakpoint,
and `python -m dockerworker debug-relay`.

debugpy is imported here only, and this module only when WORKER_DEBUG is set:
a worker that is not debugged never loads it (test_debug.py checks).

The adapter listens on the container's own loopback, on a port the kernel
picks (two containers of one worker on the host network cannot collide), and
the port is left in DEBUG_PORT_FILE. Nothing publishes it: the developer's
client reaches it through `workerctl worker dev --debug`, which listens on the
host's loopback and runs `debug-relay` in the container (`docker exec`) for
each connection: that command connects to the adapter and copies bytes both
ways between its stdin/stdout and the socket.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import BinaryIO

from . import logs
from .health import runtime_file

# Where the adapter's port is left for the relay.
DEBUG_PORT_FILE = runtime_file("dockerworker.debug-port")
# The directory the code is unpacked into while debugging, under
# WORKER_CODE_DIR: always the same, so that a client's path mapping
# (`/tmp/usercode/debug/usercode.py`) holds across revisions.
DEBUG_CODE_SUBDIR = "debug"
# The exit code of `debug-relay` in a worker that runs no debug adapter.
NOT_DEBUGGING = 3
# What `debug-relay` says on stderr once it is connected (src/runtime/debug.rs).
CONNECTED = "debug-relay: connected"


def listen() -> int:
    """Start the debug adapter on 127.0.0.1 (a free port); return the port.

    Threads started from now on are traced (the user-code thread among
    them); those started before (health endpoint, ready reporter) are not,
    so they never stop at a breakpoint. The relay finds the adapter only
    once `announce` has run."""
    # pydevd warns at every start that the interpreter's frozen standard
    # modules may miss breakpoints: only user code is debugged here.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    import debugpy

    _host, bound = debugpy.listen(("127.0.0.1", 0))
    return int(bound)


def announce(port: int) -> None:
    """Let the relay reach the adapter: called once the code is unpacked,
    so that a client's first breakpoints find the file they are set in
    (debugpy refuses a breakpoint in a file that does not exist yet)."""
    with open(DEBUG_PORT_FILE, "w", encoding="ascii") as f:
        f.write(str(port))
    logs.event("debug_listening", port=port, code_dir=DEBUG_CODE_SUBDIR)


def untrace_this_thread() -> None:
    """The runtime's event loop must keep turning while `process` is held at
    a breakpoint (broker heartbeats, publisher confirms, signals, the ready
    file): an untraced thread is never suspended, even when a breakpoint
    stops all threads."""
    import debugpy

    debugpy.trace_this_thread(False)


def relay(stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Copy bytes between stdin/stdout and the adapter until either side ends."""
    source = stdin or sys.stdin.buffer
    sink = stdout or sys.stdout.buffer
    try:
        with open(DEBUG_PORT_FILE, encoding="ascii") as f:
            port = int(f.read().strip())
    except (OSError, ValueError):
        print(
            "this worker runs no debug adapter: it was not started with --debug (or its code is not loaded yet)",
            file=sys.stderr,
        )
        return NOT_DEBUGGING
    try:
        conn = socket.create_connection(("127.0.0.1", port))
    except OSError as exc:
        print(f"the debug adapter on port {port} does not answer: {exc}", file=sys.stderr)
        return NOT_DEBUGGING
    # The one line the other end waits for before it sends anything.
    print(CONNECTED, file=sys.stderr, flush=True)
    inbound = threading.Thread(target=_copy_in, args=(source, conn), name="relay-in", daemon=True)
    inbound.start()
    try:
        while chunk := conn.recv(65536):
            sink.write(chunk)
            sink.flush()
    except OSError as exc:
        logs.event("debug_relay_ended", level=logging.DEBUG, error=str(exc))
    finally:
        conn.close()
    return 0


def _copy_in(source: BinaryIO, conn: socket.socket) -> None:
    try:
        while chunk := os.read(source.fileno(), 65536):
            conn.sendall(chunk)
    except OSError:
        pass
    try:
        # The client went away: the adapter sees its connection end, as if
        # the client had disconnected from it directly.
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
