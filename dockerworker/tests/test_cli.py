"""The command line: `run-once` for users, and the exit codes of `run` that need no broker."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from .support import PACKAGE_ROOT, code_answer, pipeline_message, sensorbucket_zip, wait_until

USERCODE = """
def process(msg):
    print("decoding", msg.payload)
    msg.create_measurement(int(msg.payload.decode()), "count", "1").add()
    return msg
"""


def run_cli(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dockerworker", *args],
        cwd=PACKAGE_ROOT,
        input=stdin,
        capture_output=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
    )


def write_message(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "message.json"
    path.write_text(json.dumps(pipeline_message(**overrides)))
    return path


def test_run_once_prints_the_routing_key_and_the_resulting_body(tmp_path):
    code = tmp_path / "code.zip"
    code.write_bytes(sensorbucket_zip(USERCODE))
    message = write_message(tmp_path, payload="NDI=")  # "42"

    result = run_cli("run-once", "--code", str(code), "--message", str(message))

    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout)
    assert (out["outcome"], out["routing_key"]) == ("forwarded", "next")
    assert out["body"]["step_index"] == 1
    assert out["body"]["measurements"][0]["value"] == 42.0
    assert b"decoding b'42'" in result.stderr


def test_run_once_takes_a_single_file_and_a_message_on_stdin(tmp_path):
    code = tmp_path / "transform.py"
    code.write_text("def process(msg):\n    msg.metadata['seen'] = True\n    return msg\n")

    result = run_cli("run-once", "--code", str(code), "--message", "-", stdin=json.dumps(pipeline_message()).encode())

    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["body"]["metadata"] == {"seen": True}


def test_run_once_shows_the_error_body_and_exits_1_when_process_raises(tmp_path):
    code = tmp_path / "usercode.py"
    code.write_text("def process(msg):\n    raise KeyError('sensor')\n")

    result = run_cli("run-once", "--code", str(code), "--message", str(write_message(tmp_path)))

    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert out["routing_key"] == "errors"
    assert "KeyError: 'sensor'" in out["body"]["error"]


def test_run_once_exits_4_on_code_that_does_not_load(tmp_path):
    code = tmp_path / "usercode.py"
    code.write_text("def process(msg:\n")

    result = run_cli("run-once", "--code", str(code), "--message", str(write_message(tmp_path)))

    assert result.returncode == 4
    assert b"syntax error" in result.stdout + result.stderr


def test_run_exits_2_on_a_config_error_with_a_json_log_line():
    result = run_cli("run", env={"CODE_URL": "http://x", "AMQP_HOST": "amqp://mq"})

    assert result.returncode == 2
    line = json.loads(result.stdout.decode().splitlines()[-1])
    assert line["event"] == "config_error" and "WORKER_ID" in line["error"]


def _worker_env(tmp_path: Path, code_url: str, **extra: str) -> dict[str, str]:
    return {
        "WORKER_ID": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "AMQP_HOST": "amqp://guest:guest@127.0.0.1:9",
        "AMQP_XCHG": "unused",
        "CODE_URL": code_url,
        "WORKER_HEALTH_PORT": "0",
        "WORKER_CODE_DIR": str(tmp_path / "code"),
        "WORKER_CODE_FETCH_ATTEMPTS": "2",
        **extra,
    }


def test_run_exits_3_when_the_code_does_not_match_its_sha256(tmp_path, http_stub):
    server = http_stub(code_answer(sensorbucket_zip("def process(m):\n    return m\n")))

    result = run_cli("run", env=_worker_env(tmp_path, server.url, CODE_SHA256="0" * 64))

    assert result.returncode == 3
    assert b"sha256 mismatch" in result.stdout


def test_run_exits_3_when_the_code_cannot_be_downloaded(tmp_path, http_stub):
    server = http_stub((404, {"message": "unknown worker"}))

    result = run_cli("run", env=_worker_env(tmp_path, server.url))

    assert result.returncode == 3
    assert b"code_download_failed" in result.stdout


def test_run_exits_4_on_code_without_process_and_says_why_once(tmp_path, http_stub):
    archive = sensorbucket_zip("def transform(m):\n    return m\n")
    server = http_stub(code_answer(archive))

    result = run_cli("run", env=_worker_env(tmp_path, server.url, CODE_SHA256=hashlib.sha256(archive).hexdigest()))

    assert result.returncode == 4
    [line] = [json.loads(line) for line in result.stdout.decode().splitlines() if "code_invalid" in line]
    assert "defines no 'process' function" in line["error"]


def test_sigterm_during_the_download_backoff_exits_0_without_downloading_again(tmp_path, http_stub):
    server = http_stub((503, {}))
    env = {"PATH": os.environ.get("PATH", ""), **_worker_env(tmp_path, server.url, WORKER_CODE_FETCH_ATTEMPTS="50")}
    process = subprocess.Popen([sys.executable, "-m", "dockerworker", "run"], cwd=PACKAGE_ROOT, env=env, stdout=subprocess.PIPE)
    assert process.stdout is not None
    events: list[dict[str, Any]] = []
    reader = threading.Thread(target=_read_json_lines, args=(process.stdout, events), daemon=True)
    reader.start()
    try:
        # After the fifth failed download the worker waits 4 to 8 s (the
        # backoff doubles from 0.5 s, with jitter) before asking again.
        wait_until(lambda: _count(events, "code_fetch_retry") >= 5, 60, "the fifth backoff")
        asked = len(server.script.requests)
        process.terminate()
        assert process.wait(timeout=60) == 0
        assert len(server.script.requests) == asked, "the backoff was cut short: no download after SIGTERM"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)


def _read_json_lines(stream: IO[bytes], into: list[dict[str, Any]]) -> None:
    for line in stream:
        try:
            into.append(json.loads(line))
        except ValueError:
            continue


def _count(events: list[dict[str, Any]], name: str) -> int:
    return sum(1 for event in list(events) if event.get("event") == name)
