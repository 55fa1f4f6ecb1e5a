"""A worker that knows only the contract: a stand-in for SensorBucket's own dockerworker.

Owns: nothing workerctl ships. It exists so that workerctl's tests can run a
worker image that behaves like the one a drop-in user points `docker.image`
at, and show that workerctl's defaults (read-only root, a tmpfs at /tmp and
at /usercode, capabilities dropped) still run it. Like that image it runs as
root, reads only the environment of docs/compatibility.md §3, writes the
downloaded zip to /tmp/code.zip, unpacks it into /usercode, imports
CODE_ENTRYPOINT (`main.main`: the archive's wrapper, which calls
`usercode.process`) from there and calls it with each message as a dict.
Per message (section 4): parse, call, `step_index += 1`, publish to
`pipeline_steps[step_index]` with the input's message_id and a `timestamp`
header; on an exception, the errors body to routing key `errors`.

Deliberately plain: no health endpoint, no ready report, no retries, no
reconnects. A failure at start is a traceback and exit code 1. As
SensorBucket's image does, it acknowledges each message *before* publishing
its result, runs as PID 1 with no SIGTERM handler (so SIGTERM is ignored),
and on SIGINT (KeyboardInterrupt) stops consuming, closes its connection and
exits 0.
"""

import base64
import importlib
import json
import os
import sys
import time
import traceback
import urllib.request
import zipfile

import pika

CODE_ZIP = "/tmp/code.zip"
CODE_DIR = "/usercode"


def load_entrypoint():
    with urllib.request.urlopen(os.environ["CODE_URL"], timeout=30) as answer:
        archive = base64.b64decode(json.load(answer)["data"])
    with open(CODE_ZIP, "wb") as f:
        f.write(archive)
    os.makedirs(CODE_DIR, exist_ok=True)
    with zipfile.ZipFile(CODE_ZIP) as zf:
        zf.extractall(CODE_DIR)
    sys.path.insert(0, CODE_DIR)
    module, _, function = (os.environ.get("CODE_ENTRYPOINT") or "main.main").rpartition(".")
    return getattr(importlib.import_module(module), function)


def main():
    worker_id = os.environ["WORKER_ID"]
    exchange = os.environ.get("AMQP_XCHG") or "pipeline.messages"
    queue = f"worker_{worker_id}"
    entrypoint = load_entrypoint()
    print(json.dumps({"event": "code_loaded", "worker_id": worker_id}), flush=True)

    connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_HOST"]))
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(queue, exchange, worker_id)
    channel.basic_qos(prefetch_count=1)

    def on_message(ch, method, properties, body):
        headers = {"timestamp": int(time.time() * 1000)}
        try:
            message = json.loads(body)
            result = entrypoint(message)
            result["step_index"] += 1
            routing_key = result["pipeline_steps"][result["step_index"]]
            out = json.dumps(result).encode()
        except Exception:
            routing_key = "errors"
            out = json.dumps(
                {
                    "received_by_worker": _json_or_text(body),
                    "processing_attempt": None,
                    "worker": worker_id,
                    "queue": queue,
                    "timestamp": int(time.time() * 1000),
                    "error": traceback.format_exc(),
                }
            ).encode()
        ch.basic_ack(method.delivery_tag)
        ch.basic_publish(
            exchange, routing_key, out, pika.BasicProperties(message_id=properties.message_id, headers=headers)
        )
        print(json.dumps({"event": "message", "routing_key": routing_key, "message_id": properties.message_id}), flush=True)

    channel.basic_consume(queue, on_message)
    print(json.dumps({"event": "consuming", "queue": queue}), flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        channel.stop_consuming()
        connection.close()
        print(json.dumps({"event": "stopped", "signal": "SIGINT"}), flush=True)


def _json_or_text(body):
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace")


if __name__ == "__main__":
    main()
