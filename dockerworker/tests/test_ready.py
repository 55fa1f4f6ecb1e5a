"""The ready report (WORKER_READY_URL) and the start-up order.

The reporter alone against a local HTTP listener first, then the worker
process against the real broker: the report follows the consumer's attach,
comes again after a reconnect, never holds up messages, and the code is
loaded before anything is consumed.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

from dockerworker import logs
from dockerworker.config import ConfigError, load
from dockerworker.health import Readiness, ReadyReporter, ReportPolicy

from .support import (
    AMQP_URL,
    Broker,
    TcpProxy,
    Worker,
    code_answer,
    free_port,
    http_status,
    pipeline_message,
    sensorbucket_zip,
    wait_until,
)

FAST = ReportPolicy(attempts=5, first_delay_s=0.01, timeout_s=0.5, repeats=0)
TOKEN = "s3cret-token"


@dataclass
class Report:
    at: float
    method: str
    path: str
    body: bytes


@dataclass
class ReadyListener:
    """A local HTTP server standing in for the controller's ready endpoint.

    `statuses` are answered in turn (the last repeats); `hang=True` accepts
    each request and never answers. `on_report` runs before the answer.
    """

    statuses: list[int] = field(default_factory=lambda: [204])
    hang: bool = False
    on_report: Callable[[], Any] | None = None
    reports: list[Report] = field(default_factory=list)
    seen: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        listener = self
        self._released = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                report = Report(time.monotonic(), "POST", self.path, self.rfile.read(length))
                if listener.on_report is not None:
                    listener.seen.append(listener.on_report())
                listener.reports.append(report)
                if listener.hang:
                    listener._released.wait(30)
                    return
                status = listener.statuses[min(len(listener.reports), len(listener.statuses)) - 1]
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/ready?token={TOKEN}"

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def listener() -> Iterator[Callable[..., ReadyListener]]:
    made: list[ReadyListener] = []

    def make(**kwargs: Any) -> ReadyListener:
        made.append(ReadyListener(**kwargs))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """What the runtime logs in this process, as parsed lines."""
    buffer = io.StringIO()
    monkeypatch.setattr(logs, "_real_stdout", buffer)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as logs.setup() does in the worker
    yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    root.setLevel(level)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/ready?token={TOKEN}"


# -- the reporter alone ------------------------------------------------------------


def test_the_report_is_one_empty_post_to_the_url_as_given_once_ready_and_not_before(
    listener: Callable[..., ReadyListener]
) -> None:
    ready_endpoint = listener()
    readiness = Readiness()
    reporter = ReadyReporter(ready_endpoint.url, readiness, FAST).start()
    try:
        readiness.set(code_loaded=True)
        time.sleep(0.2)
        assert ready_endpoint.reports == []

        readiness.set(consumer_attached=True)
        wait_until(lambda: len(ready_endpoint.reports) == 1, 5, "the ready report")
        [report] = ready_endpoint.reports
        assert (report.method, report.path, report.body) == ("POST", f"/ready?token={TOKEN}", b"")
        readiness.set(consumer_attached=True)  # still ready: nothing new to say
        time.sleep(0.2)
        assert len(ready_endpoint.reports) == 1
    finally:
        reporter.close()


def test_the_report_is_repeated_while_ready_then_the_reporter_sleeps(listener: Callable[..., ReadyListener]) -> None:
    ready_endpoint = listener()
    readiness = Readiness(code_loaded=True)
    policy = ReportPolicy(attempts=5, first_delay_s=0.01, timeout_s=0.5, repeat_every_s=0.05, repeats=3)
    reporter = ReadyReporter(ready_endpoint.url, readiness, policy).start()
    try:
        readiness.set(consumer_attached=True)
        wait_until(lambda: len(ready_endpoint.reports) == 4, 5, "the report and its 3 repeats")
        assert {(r.method, r.path) for r in ready_endpoint.reports} == {("POST", f"/ready?token={TOKEN}")}
        time.sleep(0.3)
        assert len(ready_endpoint.reports) == 4, "no more than `repeats`"
    finally:
        reporter.close()


def test_no_repeat_is_sent_once_the_worker_is_no_longer_ready(listener: Callable[..., ReadyListener]) -> None:
    ready_endpoint = listener()
    readiness = Readiness(code_loaded=True)
    policy = ReportPolicy(attempts=5, first_delay_s=0.01, timeout_s=0.5, repeat_every_s=0.2, repeats=5)
    reporter = ReadyReporter(ready_endpoint.url, readiness, policy).start()
    try:
        readiness.set(consumer_attached=True)
        wait_until(lambda: len(ready_endpoint.reports) == 1, 5, "the report")
        readiness.set(consumer_attached=False)
        time.sleep(0.6)
        assert len(ready_endpoint.reports) == 1
    finally:
        reporter.close()


def test_every_re_attach_is_reported_again(listener: Callable[..., ReadyListener]) -> None:
    ready_endpoint = listener()
    readiness = Readiness(code_loaded=True)
    reporter = ReadyReporter(ready_endpoint.url, readiness, FAST).start()
    try:
        for attach in range(1, 4):
            readiness.set(consumer_attached=True)
            wait_until(lambda: len(ready_endpoint.reports) == attach, 5, f"report {attach}")
            readiness.set(consumer_attached=False)  # the broker went away
    finally:
        reporter.close()


def test_a_worker_that_was_ready_before_the_reporter_started_is_reported(
    listener: Callable[..., ReadyListener]
) -> None:
    ready_endpoint = listener()
    reporter = ReadyReporter(ready_endpoint.url, Readiness(code_loaded=True, consumer_attached=True), FAST).start()
    try:
        wait_until(lambda: len(ready_endpoint.reports) == 1, 5, "the ready report")
    finally:
        reporter.close()


def test_server_errors_are_retried_until_an_answer_in_2xx(
    listener: Callable[..., ReadyListener], log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    ready_endpoint = listener(statuses=[503, 502, 200])
    reporter = ReadyReporter(ready_endpoint.url, Readiness(code_loaded=True, consumer_attached=True), FAST).start()
    try:
        wait_until(lambda: any(line["event"] == "ready_reported" for line in log_lines()), 5, "ready_reported")
        assert len(ready_endpoint.reports) == 3
        [line] = [line for line in log_lines() if line["event"].startswith("ready_report")]
        assert line["attempt"] == 3
    finally:
        reporter.close()


def test_a_refusal_is_logged_once_and_not_retried(
    listener: Callable[..., ReadyListener], log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    ready_endpoint = listener(statuses=[403])
    reporter = ReadyReporter(ready_endpoint.url, Readiness(code_loaded=True, consumer_attached=True), FAST).start()
    try:
        wait_until(lambda: any(line["event"] == "ready_report_refused" for line in log_lines()), 30, "the refusal")
    finally:
        reporter.close()
    # The reporter's thread has ended: whatever it was going to send, it sent.
    assert len(ready_endpoint.reports) == 1
    [line] = [line for line in log_lines() if line["event"].startswith("ready_report")]
    assert "403" in line["error"] and line["level"] == "warning"


def test_an_unreachable_url_is_tried_a_few_times_then_given_up_quietly_without_the_token(
    log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    url = closed_port_url()
    reporter = ReadyReporter(url, Readiness(code_loaded=True, consumer_attached=True), FAST).start()
    try:
        wait_until(lambda: any(line["event"] == "ready_report_failed" for line in log_lines()), 5, "giving up")
        [line] = [line for line in log_lines() if line["event"].startswith("ready_report")]
        assert line["attempts"] == 5
        assert TOKEN not in json.dumps(log_lines())
        assert line["url"] == url.split("?")[0]
    finally:
        reporter.close()


def test_a_report_still_being_retried_is_dropped_when_the_worker_is_no_longer_ready(
    log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    readiness = Readiness(code_loaded=True, consumer_attached=True)
    attempts: list[float] = []

    def refusing_post(url: str, timeout_s: float) -> int:
        attempts.append(time.monotonic())
        if len(attempts) == 2:
            readiness.set(consumer_attached=False)
        raise ConnectionRefusedError()

    reporter = ReadyReporter("http://127.0.0.1:9/ready", readiness, FAST, post=refusing_post).start()
    try:
        wait_until(lambda: any(line["event"] == "ready_report_dropped" for line in log_lines()), 30, "the drop")
    finally:
        reporter.close()
    # Its thread has ended: the two attempts before the drop were all (FAST allows five).
    assert len(attempts) == 2
    [line] = [line for line in log_lines() if line["event"] == "ready_report_dropped"]
    assert line["attempt"] == 3


def test_the_variable_is_optional_and_must_be_an_http_url() -> None:
    contract = {"WORKER_ID": str(uuid.uuid4()), "AMQP_HOST": "amqp://mq", "CODE_URL": "http://c/x/source"}

    assert load(contract).ready_url is None
    assert load({**contract, "WORKER_READY_URL": "http://workerctl:3000/r?t=abc"}).ready_url == "http://workerctl:3000/r?t=abc"
    with pytest.raises(ConfigError, match="WORKER_READY_URL"):
        load({**contract, "WORKER_READY_URL": "workerctl:3000/r"})


# -- the worker against the real broker -------------------------------------------------


def test_the_worker_reports_ready_once_its_consumer_is_attached(
    broker: Broker, make_worker: Callable[..., Worker], listener: Callable[..., ReadyListener]
) -> None:
    sink = broker.sink("next")
    holder: dict[str, Any] = {}
    ready_endpoint = listener(on_report=lambda: http_status(f"http://127.0.0.1:{holder['worker'].health_port}/readyz"))
    worker = holder["worker"] = make_worker(broker, WORKER_READY_URL=ready_endpoint.url).start()

    wait_until(lambda: len(ready_endpoint.reports) == 1, 20, f"the ready report; log:\n{worker.log_text()}")
    assert ready_endpoint.seen == [200], "reported before /readyz said ready"
    assert ready_endpoint.reports[0].path == f"/ready?token={TOKEN}"
    assert broker.consumer_count(worker.queue) == 1
    broker.publish(worker.worker_id, pipeline_message(), message_id="after-report")
    assert [m.message_id for m in broker.take(sink, 1)] == ["after-report"]
    assert worker.stop() == 0
    # Reported once: the POSTs after it, if the test took long enough, are
    # the quiet repeats of that same report (logged at debug level only).
    assert len(worker.events("ready_reported")) == 1


def test_the_worker_reports_ready_again_after_a_reconnect(
    broker: Broker, make_worker: Callable[..., Worker], listener: Callable[..., ReadyListener]
) -> None:
    parts = urlsplit(AMQP_URL)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    ready_endpoint = listener()
    worker = make_worker(broker, AMQP_HOST=via_proxy, WORKER_READY_URL=ready_endpoint.url).start()
    try:
        wait_until(lambda: len(worker.events("ready_reported")) == 1, 20, "the first report")
        proxy.cut()
        wait_until(lambda: len(worker.events("consuming")) == 2, 20, f"the re-attach; log:\n{worker.log_text()}")
        wait_until(lambda: len(worker.events("ready_reported")) == 2, 10, "the second report")
        assert worker.stop() == 0
    finally:
        proxy.close()


def test_without_the_variable_nothing_is_reported(broker: Broker, make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(broker).start().wait_ready()
    assert "WORKER_READY_URL" not in worker.env
    assert worker.stop() == 0
    assert not [line for line in worker.log_lines() if str(line.get("event", "")).startswith("ready_report")]


@pytest.mark.parametrize("ready_url_kind", ["hangs", "refuses"])
def test_a_ready_url_that_hangs_or_refuses_never_holds_up_messages(
    broker: Broker, make_worker: Callable[..., Worker], listener: Callable[..., ReadyListener], ready_url_kind: str
) -> None:
    hanging = listener(hang=True)
    url = hanging.url if ready_url_kind == "hangs" else closed_port_url()
    sink = broker.sink("next")
    worker = make_worker(broker, WORKER_READY_URL=url).start().wait_ready()

    broker.publish_many(worker.worker_id, [(f"h-{i}", json.dumps(pipeline_message()).encode()) for i in range(20)])
    broker.take_ids(sink, {f"h-{i}" for i in range(20)}, timeout=20)
    if ready_url_kind == "hangs":
        assert hanging.reports, "the report was sent"
        assert not worker.events("ready_reported"), "and is still waiting for its answer"
    assert worker.stop() == 0


# -- the start-up order ------------------------------------------------------------------


class SlowCodeServer:
    """A code endpoint that answers after `delay_s`."""

    def __init__(self, archive: bytes, delay_s: float) -> None:
        status, body = code_answer(archive)
        data = json.dumps(body).encode()
        self.asked = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.asked.set()
                time.sleep(delay_s)
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return

        server = self
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/source"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_nothing_is_consumed_before_the_code_is_loaded(broker: Broker, make_worker: Callable[..., Worker]) -> None:
    tagging = "def process(msg):\n    msg.metadata['seen_by'] = 'user code'\n    return msg\n"
    code = SlowCodeServer(sensorbucket_zip(tagging), delay_s=1.5)
    worker_id = str(uuid.uuid4())
    sink = broker.sink("next")
    # A new revision's container: its queue exists and holds a message.
    broker.declare_worker_queue(worker_id)
    broker.publish(worker_id, pipeline_message(), message_id="waiting")
    try:
        worker = make_worker(broker, worker_id=worker_id, code_url=code.url).start()
        assert code.asked.wait(20), "the code was never asked for"
        time.sleep(0.5)  # the download is on the wire: the broker side may be up, the consumer must not
        assert broker.consumer_count(worker.queue) == 0
        assert broker.message_count(worker.queue) == 1

        [result] = broker.take(sink, 1)
        assert json.loads(result.body)["metadata"]["seen_by"] == "user code"
        events = [line["event"] for line in worker.log_lines()]
        assert events.index("code_loaded") < events.index("consuming")
        assert worker.stop() == 0
    finally:
        code.close()


def test_a_controller_that_never_answers_is_still_exit_code_3(
    broker: Broker, make_worker: Callable[..., Worker]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/source"
    worker = make_worker(broker, code_url=url, WORKER_CODE_FETCH_ATTEMPTS="2").start()

    assert worker.wait(20) == 3
    assert worker.events("code_download_failed")
    assert not worker.events("consuming")


def test_a_broken_archive_is_still_exit_code_4_and_never_consumes(
    broker: Broker, make_worker: Callable[..., Worker]
) -> None:
    worker = make_worker(broker, code=b"this is not a zip").start()

    assert worker.wait(20) == 4
    assert worker.events("code_invalid")
    assert not worker.events("consuming")



def test_sigterm_while_the_controller_has_not_answered_yet_exits_0_at_once(
    broker: Broker, make_worker: Callable[..., Worker]
) -> None:
    code = SlowCodeServer(sensorbucket_zip("def process(msg):\n    return msg\n"), delay_s=30)
    try:
        worker = make_worker(broker, code_url=code.url).start()
        assert code.asked.wait(20), "the code was never asked for"
        # The code server holds its answer for 30 s: an exit with 0 and
        # without consuming is the stop cutting the wait short.
        assert worker.stop(timeout=25) == 0
        assert not worker.events("consuming")
        assert worker.events("shutdown_requested"), worker.log_text()
    finally:
        code.close()
