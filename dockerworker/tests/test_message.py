"""The message API user code sees, as SensorBucket's wrapper defines it."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest

from dockerworker.devices import (
    DevicesEndpointError,
    DevicesEndpointUnavailable,
    MissingRequiredEnvironmentVariable,
    PropertiesMatchedNotExactlyOneDevice,
)
from dockerworker.message import ErrMessageNoSteps, Measurement, Message, PoisonMessage, dumps

from .support import free_port, pipeline_message


def parse(**overrides) -> Message:
    return Message.from_json(json.dumps(pipeline_message(**overrides)))


def test_fields_are_exposed_as_attributes_and_the_payload_as_bytes():
    msg = parse(payload=base64.b64encode(b"\x01\x02raw").decode(), metadata={"k": "v"}, device={"id": 1})

    assert msg.payload == b"\x01\x02raw"
    assert msg.metadata == {"k": "v"}
    assert msg.device == {"id": 1}
    assert msg.measurements == []
    assert msg.step_index == 0 and msg.pipeline_steps == ["this-worker", "next"]


def test_a_missing_payload_is_empty_bytes_and_missing_collections_are_empty():
    data = pipeline_message()
    for name in ("payload", "measurements", "metadata", "device"):
        del data[name]

    msg = Message.from_json(json.dumps(data))

    assert msg.payload == b"" and msg.measurements == [] and msg.metadata == {} and msg.device is None


def test_serialisation_round_trips_and_keeps_fields_it_does_not_know():
    data = pipeline_message(future_field={"x": 1})

    out = json.loads(dumps(Message.from_json(json.dumps(data))))

    assert out == data


def test_a_payload_set_to_text_is_sent_as_text_and_bytes_as_base64():
    msg = parse()
    msg.payload = "test: hello"
    assert json.loads(dumps(msg))["payload"] == "test: hello"
    msg.payload = b"\xff"
    assert json.loads(dumps(msg))["payload"] == base64.b64encode(b"\xff").decode()


def test_create_measurement_builder_sets_every_field_and_add_appends_it():
    msg = parse(timestamp=1_700_000_000_000)

    msg.create_measurement(21.5, "temperature", "Cel").set_sensor("s1").set_metadata({"q": 1}).set_location(
        51.5, 3.9, 2.0
    ).add()
    msg.create_measurement(1, "x", "u").set_timestamp(5).add()
    msg.create_measurement(2, "y", "u").set_time(datetime(2024, 1, 1, tzinfo=timezone.utc)).add()

    first, second, third = json.loads(dumps(msg))["measurements"]
    assert first == {
        "timestamp": 1_700_000_000_000,
        "sensor_external_id": "s1",
        "value": 21.5,
        "observed_property": "temperature",
        "unit_of_measurement": "Cel",
        "latitude": 51.5,
        "longitude": 3.9,
        "altitude": 2.0,
        "properties": {"q": 1},
    }
    assert second["timestamp"] == 5
    assert third["timestamp"] == 1_704_067_200_000


def test_set_time_sets_the_message_timestamp_in_milliseconds():
    msg = parse()

    assert msg.set_time(datetime(2024, 1, 1, 0, 0, 1, 500000, tzinfo=timezone.utc)) is msg
    assert msg.timestamp == 1_704_067_201_500


def test_current_and_next_step():
    msg = parse(pipeline_steps=["a", "b"], step_index=0)

    assert msg.current_step() == "a"
    assert msg.next_step() == "b"
    assert msg.step_index == 1
    with pytest.raises(ErrMessageNoSteps):
        msg.next_step()


def test_measurement_constructor_keeps_zero_coordinates():
    measurement = Measurement(1, "s", 1, "p", "u", latitude=0.0, longitude=0.0, altitude=0.0)

    assert (measurement.latitude, measurement.longitude, measurement.altitude) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"nope", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (json.dumps({"tracing_id": "t"}).encode(), "missing required properties"),
        (json.dumps(pipeline_message(step_index="0")).encode(), "step_index must be an integer"),
        (json.dumps(pipeline_message(pipeline_steps="a,b")).encode(), "pipeline_steps must be a list"),
        (json.dumps(pipeline_message(payload=12)).encode(), "payload must be a base64 string"),
        (json.dumps(pipeline_message(payload="abc")).encode(), "not valid base64"),
    ],
)
def test_bodies_that_are_not_pipeline_messages_are_poison(body, reason):
    with pytest.raises(PoisonMessage, match=reason):
        Message.from_json(body)


def test_datetimes_in_metadata_serialise_as_iso_8601():
    msg = parse()
    msg.metadata["seen"] = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)

    assert json.loads(dumps(msg))["metadata"]["seen"] == "2024-05-06T07:08:09+00:00"


# -- match_device against a stub devices endpoint ------------------------------------


def test_match_device_sends_the_properties_and_the_bearer_token_and_stores_the_device(http_stub):
    devices = http_stub((200, {"data": [{"id": 7, "code": "dev"}]}))
    msg = Message.from_dict(pipeline_message(access_token="tok"), devices.url + "/devices")

    msg.match_device({"eui": "0011"})

    assert msg.device == {"id": 7, "code": "dev"}
    path, headers = devices.script.requests[0]
    assert path == "/devices?properties=%7B%22eui%22%3A+%220011%22%7D"
    assert headers["authorization"] == "bearer tok"


@pytest.mark.parametrize("found", [[], [{"id": 1}, {"id": 2}]], ids=["none", "several"])
def test_match_device_needs_exactly_one_device(http_stub, found):
    devices = http_stub((200, {"data": found}))
    msg = Message.from_dict(pipeline_message(), devices.url)

    with pytest.raises(PropertiesMatchedNotExactlyOneDevice):
        msg.match_device({"eui": "x"})


def test_match_device_outage_is_a_transient_failure_and_a_refusal_is_not(http_stub):
    down = http_stub((503, {}))
    refused = http_stub((401, {"message": "no"}))

    with pytest.raises(DevicesEndpointUnavailable):
        Message.from_dict(pipeline_message(), down.url).match_device({})
    with pytest.raises(DevicesEndpointUnavailable):
        Message.from_dict(pipeline_message(), f"http://127.0.0.1:{free_port()}").match_device({})
    with pytest.raises(DevicesEndpointError, match="401"):
        Message.from_dict(pipeline_message(), refused.url).match_device({})


def test_match_device_without_an_endpoint_says_what_is_missing():
    with pytest.raises(MissingRequiredEnvironmentVariable, match="ENDPOINT_DEVICES"):
        Message.from_dict(pipeline_message(), None).match_device({})
