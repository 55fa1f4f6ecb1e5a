"""Debugging (WORKER_DEBUG): off unless asked for, debugpy never imported on the
normal start path, and the relay that connects `docker exec` to the adapter."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dockerworker import debug
from dockerworker.config import ConfigError, load

ENV = {
    "WORKER_ID": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "AMQP_HOST": "amqp://guest:guest@mq:5672",
    "CODE_URL": "http://userworkers:3000/x/source",
}


def test_debugging_is_off_unless_asked_for_and_then_process_has_no_watchdog() -> None:
    plain = load(ENV)
    assert not plain.debug
    assert plain.process_timeout_s == 60.0
    debugging = load({**ENV, "WORKER_DEBUG": "1"})
    assert debugging.debug
    assert debugging.process_timeout_s == 0.0, "a process held at a breakpoint is not stuck"
    asked = load({**ENV, "WORKER_DEBUG": "1", "WORKER_PROCESS_TIMEOUT_S": "30"})
    assert asked.process_timeout_s == 30.0
    with pytest.raises(ConfigError, match="WORKER_DEBUG"):
        load({**ENV, "WORKER_DEBUG": "yes"})


def test_the_normal_start_path_never_imports_debugpy() -> None:
    # Everything `run` imports before and while consuming, in a fresh interpreter.
    script = (
        "import sys\n"
        "import dockerworker.__main__, dockerworker.app, dockerworker.messaging\n"
        "assert 'debugpy' not in sys.modules, 'debugpy imported'\n"
        "assert 'dockerworker.debug' not in sys.modules, 'debug imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root)


def test_relay_copies_both_ways_between_stdio_and_the_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_file = tmp_path / "debug-port"
    port_file.write_text(str(server.getsockname()[1]))
    monkeypatch.setattr(debug, "DEBUG_PORT_FILE", str(port_file))
    got = []

    def adapter() -> None:
        conn, _ = server.accept()
        with conn:
            got.append(conn.recv(100))
            conn.sendall(b"pong")
            conn.shutdown(socket.SHUT_WR)
            got.append(conn.recv(100))  # b"" once the client's side ended

    thread = threading.Thread(target=adapter)
    thread.start()
    read_end, write_end = os.pipe()
    os.write(write_end, b"ping")
    os.close(write_end)
    out = io.BytesIO()
    with os.fdopen(read_end, "rb") as stdin:
        assert debug.relay(stdin, out) == 0
    thread.join(timeout=10)
    server.close()
    assert got == [b"ping", b""]
    assert out.getvalue() == b"pong"


def test_relay_in_a_worker_without_debugging_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(debug, "DEBUG_PORT_FILE", str(tmp_path / "absent"))
    assert debug.relay(io.BytesIO(), io.BytesIO()) == debug.NOT_DEBUGGING
    assert "not started with --debug" in capsys.readouterr().err
