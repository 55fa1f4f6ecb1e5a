"""dockerworker: the Python runtime inside each user-worker container.

It downloads the worker's code from the controller, loads the user's
`process(message)`, consumes the worker's quorum queue and publishes each
result to the next pipeline step (CONTRACT.md sections 2 to 4).

Code map (one concern per module):

- `config`      the environment variables, their defaults and validation
- `codefetch`   downloading the code archive (retries, backoff, sha256)
- `codeload`    safe unpacking and importing; which function to call
- `message`     the message API user code sees (`Message`, measurements)
- `devices`     the devices endpoint behind `Message.match_device`
- `processing`  the decision for one message, without AMQP (pure but for user code)
- `messaging`   AMQP (pika): declare, consume, publish with confirms, ack, reconnect
- `userthread`  the one thread user code runs on, off the event loop
- `health`      `/healthz` and `/readyz`
- `logs`        JSON log lines; capture of user prints per message
- `app`         the container's command: wiring, signals, exit codes
- `harness`     `run-once`: one message through user code, no broker
- `bench`       the throughput benchmark against a real broker

Architecture invariants: `processing` and `message` never touch AMQP; an
input is acknowledged only after the broker confirmed the publish of its
result; user code runs on one thread, one message at a time.

Exit codes of `run` (see `app`): 0 clean shutdown, 1 internal error,
2 configuration error, 3 code download failed, 4 code invalid,
5 broker refused the topology.
"""
