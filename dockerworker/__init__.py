"""dockerworker: the Python runtime inside each user-worker container.

It downloads the worker's code from the controller, loads the user's
`process(message)`, consumes the worker's quorum queue and publishes each
result to the next pipeline step (docs/compatibility.md §2 to 4).

Code map (one concern per module):

- `config`      the environment variables, their defaults and validation
- `codefetch`   downloading the code archive (retries, backoff, sha256)
- `codeload`    safe unpacking and importing; which function to call
- `message`     the message API user code sees (`Message`, measurements); wire JSON
- `devices`     the devices endpoint behind `Message.match_device`
- `processing`  the decision for one message (`Verdict`), without AMQP (pure but for user code)
- `messaging`   the connection lives: sessions, reconnect backoff, readiness, shutdown
- `amqp`        the broker bridge (AMQP 0-9-1 on pamqp's codec): connect, declare, consume, publish, ack
- `pump`        the message path: to the user thread, publishes, confirms, acks
- `handover`    all that the event loop and the user thread share (deliveries in, results out)
- `ledger`      which inputs may be acknowledged (pure bookkeeping)
- `reactor`     the main thread's event loop (`selectors`): the socket, timers, calls from threads
- `userthread`  the one thread user code runs on, off the reactor
- `health`      `/healthz`, `/readyz`, the ready file the HEALTHCHECK tests, the ready report to `WORKER_READY_URL`
- `minihttp`    the little HTTP the runtime speaks (code GET, ready POST, health answers) over plain sockets
- `logs`        JSON log lines, named levels; capture of user prints per message
- `app`         the container's command: wiring, signals, exit codes
- `bundle`      the start path's compiled modules in one file made with the image, served until user code loads
- `harness`     `run-once`: one message through user code, no broker
- `trial`       try mode (`python -m dockerworker.trial`): recorded messages through two codes, no broker

Beside the package, not in it (nor in the image): `tools/`, the runtime's
benchmarks (throughput beside the limit client, start → consuming, idle
cost, the floors); `tests/`, its pytest suite.

Architecture invariants: `processing` and `message` never touch AMQP; only
only `amqp` speaks AMQP; an input is acknowledged only after the broker confirmed
the publish of its result (`pump`, `ledger`); user code runs on one thread,
one message at a time.

Exit codes of `run` (see `app.ExitCode`): 0 clean shutdown, 1 internal error,
2 configuration error, 3 code download failed, 4 code invalid, 5 broker
refused the topology, 6 `process` did not return within
WORKER_PROCESS_TIMEOUT_S.
"""
