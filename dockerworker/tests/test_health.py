"""The health endpoint: live always, ready only with code loaded and a consumer attached."""

from __future__ import annotations

import os
import subprocess
import time

from dockerworker.health import HealthServer, Readiness, ReadyFile

from .support import http_status


def test_healthz_is_live_and_readyz_follows_readiness():
    readiness = Readiness()
    server = HealthServer(readiness, 0, host="127.0.0.1").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert http_status(base + "/healthz") == 200
        assert http_status(base + "/readyz") == 503
        readiness.set(code_loaded=True)
        assert http_status(base + "/readyz") == 503
        readiness.set(consumer_attached=True)
        assert http_status(base + "/readyz") == 200
        readiness.set(consumer_attached=False)  # the broker went away
        assert http_status(base + "/readyz") == 503
        assert http_status(base + "/nothing-here") == 404
    finally:
        server.stop()


def test_the_bound_health_port_is_recorded_for_the_image_healthcheck(tmp_path, monkeypatch):
    from dockerworker import app

    target = tmp_path / "dockerworker.health-port"
    monkeypatch.setattr(app, "HEALTH_PORT_FILE", str(target))
    app._record_health_port(43210)
    assert target.read_text() == "43210"


def test_the_server_stops_at_once_though_it_never_polls():
    server = HealthServer(Readiness(), 0, host="127.0.0.1").start()
    base = f"http://127.0.0.1:{server.port}"
    assert http_status(base + "/healthz") == 200
    server.stop()
    assert http_status(base + "/healthz") is None, "no longer listening"


def test_the_ready_file_exists_exactly_while_ready(tmp_path):
    path = tmp_path / "dockerworker.ready"
    readiness = Readiness()
    ReadyFile(str(path)).attach(readiness)
    assert not path.exists()
    readiness.set(code_loaded=True, consumer_attached=True)
    assert path.exists()
    readiness.set(consumer_attached=False)  # the broker went away
    assert not path.exists()
    readiness.set(consumer_attached=True)
    assert path.exists()


def test_a_refresh_makes_the_ready_file_fresh_and_creates_none(tmp_path):
    path = tmp_path / "dockerworker.ready"
    readiness = Readiness()
    ready_file = ReadyFile(str(path)).attach(readiness)
    ready_file.refresh()
    assert not path.exists(), "not ready: nothing to keep fresh"
    readiness.set(code_loaded=True, consumer_attached=True)
    os.utime(path, (time.time() - 600, time.time() - 600))
    ready_file.refresh()
    assert time.time() - path.stat().st_mtime < 60
