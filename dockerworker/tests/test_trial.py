"""Try mode: two versions of the code over the same messages, over stdin/stdout, no broker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any

from .support import PACKAGE_ROOT, pipeline_message, sensorbucket_zip

CURRENT = """
def process(msg):
    if msg.payload == b"bad":
        raise ValueError("bad payload")
    msg.create_measurement(int(msg.payload.decode()), "count", "1").add()
    return msg
"""
CANDIDATE = """
def process(msg):
    if msg.payload == b"bad":
        return msg
    print("seen", msg.payload)
    msg.create_measurement(int(msg.payload.decode()) * 2, "count", "1").add()
    return msg
"""
HANGS = """
def process(msg):
    while True:
        pass
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def message(payload: bytes) -> bytes:
    return json.dumps(pipeline_message(payload=b64(payload))).encode()


def trial(request: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dockerworker.trial"],
        cwd=PACKAGE_ROOT,
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
    )


def request(current: str | None, candidate: str, *payloads: bytes, timeout_s: float = 10) -> dict[str, Any]:
    return {
        "entrypoint": "main.main",
        "worker_id": "00000000-0000-0000-0000-0000000000aa",
        "timeout_s": timeout_s,
        "codes": {
            "current": b64(sensorbucket_zip(current)) if current else None,
            "candidate": b64(sensorbucket_zip(candidate)),
        },
        "inputs": [b64(message(p)) for p in payloads],
    }


def test_each_code_runs_every_message_and_reports_what_it_would_publish():
    done = trial(request(CURRENT, CANDIDATE, b"3", b"bad"))
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    current, candidate = runs["current"], runs["candidate"]
    assert current["loaded"] and candidate["loaded"]
    assert [r["outcome"] for r in current["results"]] == ["forwarded", "failed"]
    assert [r["outcome"] for r in candidate["results"]] == ["forwarded", "forwarded"]
    assert current["results"][0]["body"]["measurements"][0]["value"] == 3
    assert candidate["results"][0]["body"]["measurements"][0]["value"] == 6
    assert candidate["results"][0]["printed"].startswith("seen")
    assert current["results"][1]["routing_key"] == "errors"
    assert "ValueError: bad payload" in current["results"][1]["error"]


def test_code_that_does_not_load_is_reported_and_the_other_still_runs():
    done = trial(request("def process(msg:\n", CANDIDATE, b"1"))
    runs = json.loads(done.stdout)["runs"]
    assert not runs["current"]["loaded"]
    assert "syntax error" in runs["current"]["error"]
    assert runs["candidate"]["results"][0]["outcome"] == "forwarded"


def test_a_process_that_hangs_raises_after_the_timeout():
    done = trial(request(None, HANGS, b"1", timeout_s=0.5))
    result = json.loads(done.stdout)["runs"]["candidate"]["results"][0]
    assert result["outcome"] == "failed"
    assert "ProcessTimeout" in result["error"]


def test_an_unreadable_request_is_exit_2():
    done = subprocess.run(
        [sys.executable, "-m", "dockerworker.trial"], cwd=PACKAGE_ROOT, input=b"{", capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"unreadable request" in done.stderr
