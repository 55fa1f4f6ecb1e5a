"""The health endpoint: live always, ready only with code loaded and a consumer attached."""

from __future__ import annotations

from dockerworker.health import HealthServer, Readiness

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
