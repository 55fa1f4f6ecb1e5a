"""An example user worker, as a SensorBucket user would write it in the dashboard.

The uplink payload is JSON from a thermometer reporting hundredths of a degree:
the worker turns it into one temperature measurement and tags the message.
What it prints ends up in the worker's log line for the message
(`workerctl worker logs <id>`).

Try it without any stack (from the repository root):

    python -m dockerworker run-once --code examples/hello.py --message examples/message.json
"""

import json


def process(message):
    reading = json.loads(message.payload)
    celsius = reading["temperature_centi"] / 100
    print(f"hello: sensor {reading['sensor']} reads {celsius} degC")
    message.create_measurement(celsius, "temperature", "Cel").set_sensor(reading["sensor"]).add()
    message.metadata["greeting"] = "hello from examples/hello.py"
    return message
