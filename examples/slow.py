"""An example worker that takes a while over each message: what autoscaling is for.

Give it a backlog and a second replica comes (scripts/smoke does exactly this):

    workerctl worker create --name slow --code examples/slow.py --wait
    workerctl worker scale slow --max 2
    # ... publish a few hundred messages to it; `workerctl worker list` shows REPLICAS 2/2

Try it without any stack (from the repository root):

    python -m dockerworker run-once --code examples/slow.py --message examples/message.json
"""

import time


def process(message):
    time.sleep(0.2)
    message.metadata["slow"] = True
    return message
