"""The worker against a real RabbitMQ: routing, errors, poison, retries, shutdown, reconnects."""

from __future__ import annotations

import json
import signal
import time
import uuid
from urllib.parse import urlsplit

from dockerworker import processing

from .support import (
    AMQP_URL,
    Broker,
    TcpProxy,
    code_answer,
    free_port,
    http_status,
    pipeline_message,
    sensorbucket_zip,
    wait_until,
)

RAISING_CODE = "def process(msg):\n    return 1 / 0\n"


def test_message_goes_to_the_next_step_with_its_message_id_and_a_timestamp_header(broker: Broker, make_worker):
    sink = broker.sink("next")
    worker = make_worker(broker).start().wait_ready()
    message = pipeline_message()

    before = int(time.time() * 1000)
    broker.publish(worker.worker_id, message, message_id="m-1")
    [result] = broker.take(sink, 1)

    body = json.loads(result.body)
    assert result.message_id == "m-1"
    assert before <= result.headers["timestamp"] <= int(time.time() * 1000)
    assert body["step_index"] == 1
    assert body["tracing_id"] == message["tracing_id"]
    assert body["payload"] == message["payload"]
    assert worker.stop() == 0


def test_worker_declares_a_durable_quorum_queue_bound_to_its_id(broker: Broker, make_worker):
    worker = make_worker(broker).start().wait_ready()
    sink = broker.sink("next")
    assert broker.is_durable_quorum_queue(worker.queue)

    # Publishing to the worker's routing key reaches the queue it declared.
    broker.publish(worker.worker_id, pipeline_message(), message_id="m-q")
    broker.take(sink, 1)
    assert worker.stop() == 0
    broker.publish(worker.worker_id, pipeline_message(), message_id="kept")
    assert broker.message_count(worker.queue) == 1  # durable, and still bound with nobody consuming


def test_a_raising_process_sends_the_contract_error_body_to_errors(broker: Broker, make_worker):
    errors = broker.sink("errors")
    next_step = broker.sink("next")
    worker = make_worker(broker, RAISING_CODE).start().wait_ready()
    message = pipeline_message()

    broker.publish(worker.worker_id, message, message_id="m-err")
    [error] = broker.take(errors, 1)

    body = json.loads(error.body)
    assert list(body) == list(processing.ERROR_FIELDS)
    assert body["received_by_worker"] == message
    assert body["worker"] == body["queue"] == worker.worker_id
    assert "ZeroDivisionError" in body["error"] and "Traceback" in body["error"]
    assert abs(body["timestamp"] - time.time()) < 60  # seconds
    assert error.headers[processing.ATTEMPT_HEADER] == 1
    assert error.message_id == "m-err"
    assert broker.drain(next_step) == []
    assert worker.stop() == 0
    assert broker.message_count(worker.queue) == 0  # acknowledged, not redelivered


def test_poison_messages_go_to_errors_and_are_not_redelivered(broker: Broker, make_worker):
    errors = broker.sink("errors")
    worker = make_worker(broker).start().wait_ready()
    missing_fields = {"tracing_id": "t", "hello": "world"}

    broker.publish(worker.worker_id, b"this is not json", message_id="p-1")
    broker.publish(worker.worker_id, missing_fields, message_id="p-2")
    poisoned = broker.take(errors, 2)

    assert {message.message_id for message in poisoned} == {"p-1", "p-2"}
    bodies = {message.message_id: json.loads(message.body) for message in poisoned}
    assert bodies["p-1"]["received_by_worker"] == "this is not json"
    assert "not valid JSON" in bodies["p-1"]["error"]
    assert "missing required properties" in bodies["p-2"]["error"]
    assert worker.stop() == 0
    assert broker.message_count(worker.queue) == 0
    # A second worker on the same queue gets nothing to choke on.
    again = make_worker(broker, worker_id=worker.worker_id).start().wait_ready()
    time.sleep(0.5)
    assert broker.drain(errors) == []
    assert again.stop() == 0


def test_a_message_past_the_last_step_is_an_error(broker: Broker, make_worker):
    errors = broker.sink("errors")
    worker = make_worker(broker).start().wait_ready()

    broker.publish(worker.worker_id, pipeline_message(pipeline_steps=["only-me"]), message_id="end")
    [error] = broker.take(errors, 1)

    assert "no step at index 1" in json.loads(error.body)["error"]
    assert worker.stop() == 0


def test_a_next_step_nobody_listens_to_is_reported_on_errors(broker: Broker, make_worker):
    errors = broker.sink("errors")
    worker = make_worker(broker).start().wait_ready()

    broker.publish(worker.worker_id, pipeline_message(pipeline_steps=["me", "nobody-home"]), message_id="lost?")
    [error] = broker.take(errors, 1)

    body = json.loads(error.body)
    assert "nobody-home" in body["error"]
    assert body["processing_attempt"]["step_index"] == 1
    # The error can arrive before the worker has written its log line.
    wait_until(lambda: worker.events("message"), 20, "the message log line")
    assert [line["outcome"] for line in worker.events("message")] == ["unroutable"]
    assert worker.stop() == 0


def test_one_json_log_line_per_message_carries_the_outcome_and_what_user_code_printed(broker: Broker, make_worker):
    code = "def process(msg):\n    print('saw', msg.tracing_id)\n    return msg\n"
    sink = broker.sink("next")
    worker = make_worker(broker, code, WORKER_REVISION="7").start().wait_ready()
    message = pipeline_message()

    broker.publish(worker.worker_id, message, message_id="logged")
    broker.take(sink, 1)
    wait_until(lambda: worker.events("message"), 5, "the message log line")

    [line] = worker.events("message")
    assert line["outcome"] == "forwarded"
    assert line["tracing_id"] == message["tracing_id"]
    assert line["worker_id"] == worker.worker_id
    assert line["revision"] == "7"
    assert line["output"] == f"saw {message['tracing_id']}\n"
    assert isinstance(line["duration_ms"], float)
    assert worker.stop() == 0
    assert all("unparsed" not in line for line in worker.log_lines())


def test_a_worker_stopped_mid_stream_loses_nothing(broker: Broker, make_worker):
    code = "import time\n\ndef process(msg):\n    time.sleep(0.005)\n    return msg\n"
    sink = broker.sink("next")
    worker_id = str(uuid.uuid4())
    first = make_worker(broker, code, worker_id=worker_id).start().wait_ready()
    count = 400
    broker.publish_many(worker_id, [(f"m-{i}", json.dumps(pipeline_message()).encode()) for i in range(count)])

    wait_until(lambda: len(first.events("message")) >= 50, 20, "the first worker to get going")
    assert first.stop(signal.SIGTERM, timeout=60) == 0
    assert len(first.events("message")) < count, "the worker was stopped too late to test anything"

    second = make_worker(broker, code, worker_id=worker_id).start().wait_ready()
    arrived = broker.take_ids(sink, {f"m-{i}" for i in range(count)})
    assert {message.message_id for message in arrived} == {f"m-{i}" for i in range(count)}
    assert second.stop() == 0


def test_sigint_stops_the_worker_cleanly_too(broker: Broker, make_worker):
    worker = make_worker(broker).start().wait_ready()
    assert worker.stop(signal.SIGINT) == 0
    assert worker.events("stopped")


def test_a_devices_endpoint_outage_is_retried_until_it_passes(broker: Broker, make_worker, http_stub):
    devices = http_stub((503, {"message": "down"}), (503, {"message": "down"}), (200, {"data": [{"id": 42}]}))
    code = "def process(msg):\n    msg.match_device({'eui': 'abc'})\n    return msg\n"
    sink = broker.sink("next")
    worker = make_worker(
        broker, code, ENDPOINT_DEVICES=devices.url + "/devices", WORKER_RETRY_DELAY_MS="100", WORKER_MAX_ATTEMPTS="5"
    ).start().wait_ready()

    broker.publish(worker.worker_id, pipeline_message(access_token="secret"), message_id="dev")
    [result] = broker.take(sink, 1)

    assert json.loads(result.body)["device"] == {"id": 42}
    assert result.message_id == "dev"
    # The result can arrive before the worker has written its log line.
    wait_until(lambda: len(worker.events("message")) >= 3, 20, "the third message log line")
    assert [line["outcome"] for line in worker.events("message")] == ["retry", "retry", "forwarded"]
    path, headers = devices.script.requests[-1]
    assert path.startswith("/devices?properties=")
    assert headers.get("authorization") == "bearer secret"
    assert worker.stop() == 0


def test_a_failure_that_does_not_pass_is_dead_lettered_after_the_last_attempt(broker: Broker, make_worker, http_stub):
    devices = http_stub((503, {"message": "down"}))
    code = "def process(msg):\n    msg.match_device({'eui': 'abc'})\n    return msg\n"
    errors = broker.sink("errors")
    worker = make_worker(
        broker, code, ENDPOINT_DEVICES=devices.url, WORKER_RETRY_DELAY_MS="50", WORKER_MAX_ATTEMPTS="3"
    ).start().wait_ready()
    message = pipeline_message()

    broker.publish(worker.worker_id, message, message_id="doomed")
    [error] = broker.take(errors, 1)

    body = json.loads(error.body)
    assert "gave up after 3 attempts" in body["error"]
    assert "DevicesEndpointUnavailable" in body["error"]
    assert body["received_by_worker"] == message
    assert len(devices.script.requests) == 3
    time.sleep(0.3)
    assert broker.drain(errors) == []
    assert worker.stop() == 0
    assert broker.message_count(worker.queue) == 0
    assert broker.message_count(worker.queue + ".retry") == 0


def test_a_message_the_worker_dies_on_is_dead_lettered_after_the_redelivery_limit(broker: Broker, make_worker):
    code = "import os\n\ndef process(msg):\n    os._exit(9)\n"
    errors = broker.sink("errors")
    worker_id = str(uuid.uuid4())

    def restart():
        return make_worker(broker, code, worker_id=worker_id, WORKER_MAX_REDELIVERIES="2").start()

    first = restart().wait_ready()
    broker.publish(worker_id, pipeline_message(), message_id="killer")
    assert first.wait() == 9
    crashes = 1
    while crashes < 5:  # a container restart policy, by hand
        worker = restart()
        wait_until(lambda: worker.process.poll() is not None or broker.message_count(errors) > 0, 20, "crash or error")
        if worker.process.poll() is None:
            break
        crashes += 1

    [error] = broker.take(errors, 1)
    assert "redelivered 2 times" in json.loads(error.body)["error"]
    assert crashes == 2
    assert worker.stop() == 0


def test_a_process_that_hangs_sends_its_message_to_errors_and_the_worker_exits_6(broker: Broker, make_worker):
    code = "import time\n\ndef process(msg):\n    if msg.metadata.get('hang'):\n        time.sleep(3600)\n    return msg\n"
    errors = broker.sink("errors")
    next_step = broker.sink("next")
    worker_id = str(uuid.uuid4())

    def start():
        return make_worker(broker, code, worker_id=worker_id, WORKER_PROCESS_TIMEOUT_S="1").start().wait_ready()

    first = start()
    broker.publish(worker_id, pipeline_message(), message_id="before")
    [before] = broker.take(next_step, 1)
    assert before.message_id == "before"
    broker.publish(worker_id, pipeline_message(metadata={"hang": True}), message_id="hangs")
    broker.publish(worker_id, pipeline_message(), message_id="after")

    [error] = broker.take(errors, 1)
    assert error.message_id == "hangs"
    body = json.loads(error.body)
    assert body["received_by_worker"]["metadata"] == {"hang": True}
    assert "process() did not return within 1s for message hangs" in body["error"]
    assert "for message hangs at usercode.py:5 in process" in body["error"], body["error"]
    assert body["error"].endswith('It was running:\n  File "usercode.py", line 5, in process\n    time.sleep(3600)\n')
    assert first.wait() == 6
    [line] = first.events("process_timeout")
    assert "did not return within 1s" in line["error"]
    assert [m["outcome"] for m in first.events("message")] == ["forwarded", "timed_out"]

    # Restarted, the worker goes on with what was queued behind the hang.
    second = start()
    [after] = broker.take(next_step, 1)
    assert after.message_id == "after"
    assert second.stop() == 0
    assert broker.message_count(f"worker_{worker_id}") == 0


def test_the_worker_reconnects_when_the_broker_connection_drops_and_loses_nothing(broker: Broker, make_worker):
    parts = urlsplit(AMQP_URL)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    via_proxy = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    code = "import time\n\ndef process(msg):\n    time.sleep(0.005)\n    return msg\n"
    sink = broker.sink("next")
    worker = make_worker(broker, code, AMQP_HOST=via_proxy).start().wait_ready()
    count = 300
    try:
        broker.publish_many(worker.worker_id, [(f"r-{i}", json.dumps(pipeline_message()).encode()) for i in range(count)])
        wait_until(lambda: len(worker.events("message")) >= 50, 20, "the worker to get going")
        proxy.cut()

        arrived = broker.take_ids(sink, {f"r-{i}" for i in range(count)})
        assert {message.message_id for message in arrived} == {f"r-{i}" for i in range(count)}
        assert worker.events("broker_connection_lost")
        assert len(worker.events("consuming")) >= 2
        wait_until(lambda: http_status(f"http://127.0.0.1:{worker.health_port}/readyz") == 200, 10, "ready again")
        assert worker.stop() == 0
    finally:
        proxy.close()


def test_a_publish_the_broker_refuses_is_retried_then_dead_lettered(broker: Broker, make_worker):
    # A next step that rejects every publish: the broker answers basic.nack.
    broker.sink("full", arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    errors = broker.sink("errors")
    worker = make_worker(broker, WORKER_RETRY_DELAY_MS="50", WORKER_MAX_ATTEMPTS="3").start().wait_ready()

    broker.publish(worker.worker_id, pipeline_message(pipeline_steps=["me", "full"]), message_id="refused")
    [error] = broker.take(errors, 1)

    assert "publish refused by the broker" in json.loads(error.body)["error"]
    wait_until(lambda: len(worker.events("message")) >= 3, 20, "the third message log line")
    assert [line["outcome"] for line in worker.events("message")] == ["retry", "retry", "dead_lettered"]
    assert worker.stop() == 0
    assert broker.message_count(worker.queue) == 0


def test_a_broker_that_is_not_up_yet_is_waited_for_with_backoff(broker: Broker, make_worker):
    parts = urlsplit(AMQP_URL)
    port = free_port()
    not_yet = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()
    sink = broker.sink("next")
    worker = make_worker(broker, AMQP_HOST=not_yet).start()

    wait_until(lambda: len(worker.events("broker_unavailable")) >= 2, 20, "retries against the absent broker")
    assert http_status(f"http://127.0.0.1:{worker.health_port}/healthz") == 200
    assert http_status(f"http://127.0.0.1:{worker.health_port}/readyz") == 503
    delays = [line["retry_in_s"] for line in worker.events("broker_unavailable")]
    assert delays[1] > delays[0]

    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5672), port=port)
    try:
        worker.wait_ready(timeout=20)
        broker.publish(worker.worker_id, pipeline_message(), message_id="late")
        assert [message.message_id for message in broker.take(sink, 1)] == ["late"]
        assert worker.stop() == 0
    finally:
        proxy.close()


def test_a_queue_that_exists_with_other_arguments_is_exit_code_5(broker: Broker, make_worker):
    worker_id = str(uuid.uuid4())
    # What SensorBucket's old runtime declared: a transient classic queue.
    broker.declare_queue(f"worker_{worker_id}", durable=False)
    worker = make_worker(broker, worker_id=worker_id).start()

    assert worker.wait(timeout=20) == 5
    [line] = worker.events("broker_topology_error")
    assert "PRECONDITION_FAILED" in line["error"]


def test_code_from_a_controller_that_is_still_starting_is_fetched_after_retries(broker: Broker, make_worker, http_stub):
    archive = sensorbucket_zip("def process(msg):\n    msg.metadata['v'] = 2\n    return msg\n")
    controller = http_stub((503, {}), (502, {}), code_answer(archive))
    sink = broker.sink("next")
    worker = make_worker(broker, code_url=controller.url + "/w/source").start().wait_ready()

    broker.publish(worker.worker_id, pipeline_message(), message_id="v2")
    [result] = broker.take(sink, 1)

    assert json.loads(result.body)["metadata"] == {"v": 2}
    assert len(controller.script.requests) == 3
    assert len(worker.events("code_fetch_retry")) == 2
    assert worker.stop() == 0


def test_at_the_default_level_only_failures_get_a_line_each_and_a_summary_counts_them_all(broker: Broker, make_worker):
    code = "def process(msg):\n    if msg.metadata.get('fail'):\n        raise ValueError('no')\n    return msg\n"
    sink = broker.sink("next")
    errors = broker.sink("errors")
    worker = make_worker(broker, code, WORKER_LOG_LEVEL="info", WORKER_STATS_INTERVAL_S="0.2").start().wait_ready()

    for index in range(3):
        broker.publish(worker.worker_id, pipeline_message(), message_id=f"ok-{index}")
    broker.publish(worker.worker_id, pipeline_message(metadata={"fail": True}), message_id="bad")
    broker.take(sink, 3)
    broker.take(errors, 1)

    def counted(outcome: str) -> int:
        return sum(line.get(outcome, 0) for line in worker.events("messages"))

    wait_until(lambda: counted("forwarded") == 3 and counted("failed") == 1, 10, "the summary lines")
    assert [(line["outcome"], line["level"]) for line in worker.events("message")] == [("failed", "warning")]
    assert worker.events("messages")[0]["level"] == "info"
    assert worker.stop() == 0
