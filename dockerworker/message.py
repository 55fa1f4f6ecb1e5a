"""The pipeline message as user code sees it (docs/compatibility.md §4).

Owns: `Message`, `Measurement` and `MeasurementBuilder`, with the names and
behaviour of SensorBucket's own Python wrapper, so code written for the
dashboard runs unchanged; the parse of an incoming body (and the verdict that
it is poison) and the serialisation of the result.

Compatibility notes: `payload` is decoded from base64 to bytes on the way in
and encoded back on the way out (a `str` payload is sent as it is);
`measurements` holds dicts as received plus `Measurement` objects added by
the builder; fields the contract does not name are kept and passed on.
Must not do: any messaging or logging; the only I/O is `match_device`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import date, datetime
from typing import Any

import orjson

from . import devices
from .devices import MissingRequiredEnvironmentVariable, PropertiesMatchedNotExactlyOneDevice  # noqa: F401 (re-export)

REQUIRED_FIELDS = (
    "tracing_id",
    "tenant_id",
    "access_token",
    "received_at",
    "pipeline_id",
    "step_index",
    "pipeline_steps",
    "timestamp",
)
OPTIONAL_FIELDS = ("device", "measurements", "payload", "metadata")


class ErrMessageNoSteps(Exception):
    """The message has no pipeline step at the requested index."""


class MissingRequiredProperties(Exception):
    """The incoming JSON lacks fields every pipeline message has."""


class ErrUserCodeFailure(Exception):
    """`process` returned something that is not a message."""


class PoisonMessage(Exception):
    """The body can never be processed: not JSON, or not a pipeline message."""


class Serializer(json.JSONEncoder):
    """JSON for messages: bytes as base64, objects through their `json_dict`."""

    def default(self, obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray)):
            return base64.b64encode(obj).decode("ascii")
        if callable(getattr(obj, "json_dict", None)):
            return obj.json_dict()
        # Users put datetimes in metadata more often than not; ISO 8601 is
        # what they would have written by hand.
        if isinstance(obj, (datetime, date)):
            return obj.isoformat()
        return super().default(obj)


_ENCODER = Serializer(separators=(",", ":"))
# Keys that are not strings are written as strings, as the stdlib does.
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _orjson_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray)):
        return base64.b64encode(obj).decode("ascii")
    if callable(getattr(obj, "json_dict", None)):
        return obj.json_dict()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """Serialise a message (or an error body) to the bytes that go on the wire.

    orjson first (a tenth of the stdlib's time for a pipeline message); what
    it refuses (an integer wider than 64 bits, an object it does not know)
    goes through the stdlib `Serializer`, whose output and errors are the
    reference. Unlike the stdlib, a NaN or infinite float is written as
    `null`: JSON has no such numbers, and the next step's parser may refuse
    them.
    """
    try:
        return orjson.dumps(value, default=_orjson_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError is one
        return _ENCODER.encode(value).encode("utf-8")


class Measurement:
    """One measurement as the storage step expects it."""

    def __init__(
        self,
        timestamp: int,
        sensor_external_id: str,
        value: float,
        observed_property: str,
        unit_of_measurement: str,
        latitude: float | None = None,
        longitude: float | None = None,
        altitude: float | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        self.timestamp = int(timestamp)
        self.sensor_external_id = str(sensor_external_id)
        self.value = float(value)
        self.observed_property = str(observed_property)
        self.unit_of_measurement = str(unit_of_measurement)
        self.latitude = float(latitude) if latitude is not None else None
        self.longitude = float(longitude) if longitude is not None else None
        self.altitude = float(altitude) if altitude is not None else None
        self.properties = properties if properties else {}

    def json_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Message:
    """A pipeline message; user code receives one and returns it."""

    def __init__(
        self,
        tracing_id: str,
        tenant_id: int,
        access_token: str,
        received_at: int,
        pipeline_id: str,
        step_index: int,
        pipeline_steps: list[str],
        timestamp: int,
        device: Any | None = None,
        measurements: list[Any] | None = None,
        payload: bytes | str | None = None,
        metadata: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        self.tracing_id = tracing_id
        self.tenant_id = tenant_id
        self.access_token = access_token
        self.received_at = received_at
        self.pipeline_id = pipeline_id
        self.step_index = step_index
        self.pipeline_steps = pipeline_steps
        self.timestamp = timestamp
        self.device = device
        self.measurements = measurements if measurements else []
        self.metadata = metadata if metadata else {}
        self.payload = payload
        # Not in the constructor's named fields but present on the wire:
        # kept so a newer producer's fields survive this step.
        self._extra = extra
        self._devices_endpoint: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], devices_endpoint: str | None = None) -> "Message":
        """Build a message from parsed JSON (checked by `check_pipeline_fields`)."""
        known = {name: data[name] for name in REQUIRED_FIELDS + OPTIONAL_FIELDS if name in data}
        known["payload"] = _decode_payload(known.get("payload"))
        message = cls(**known)
        message._extra = {key: value for key, value in data.items() if key not in known}
        message._devices_endpoint = devices_endpoint
        return message

    @classmethod
    def from_json(cls, body: str | bytes, devices_endpoint: str | None = None) -> "Message":
        """Parse a wire body, or raise `PoisonMessage`."""
        data = parse_json(body)
        check_pipeline_fields(data)
        return cls.from_dict(data, devices_endpoint)

    def match_device(self, properties: dict[str, Any]) -> None:
        """Find the one device with these properties and store it in `device`."""
        self.device = devices.match_one(self._devices_endpoint, self.access_token, properties)

    def create_measurement(self, value: float, obs: str, uom: str) -> "MeasurementBuilder":
        """Start a measurement stamped with the message's time; finish it with `add()`."""
        return MeasurementBuilder(self).set_value(value, obs, uom)

    def current_step(self) -> str:
        return _step_at(self.pipeline_steps, self.step_index)

    def next_step(self) -> str:
        """Advance `step_index` and return the routing key of the step now current."""
        self.step_index += 1
        return _step_at(self.pipeline_steps, self.step_index)

    def set_time(self, dt: datetime) -> "Message":
        self.timestamp = _unix_ms(dt)
        return self

    def json_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in REQUIRED_FIELDS + OPTIONAL_FIELDS}
        data.update(self._extra)
        return data

    def __repr__(self) -> str:
        return f"Message(tracing_id={self.tracing_id!r}, step_index={self.step_index!r})"


class MeasurementBuilder:
    """Fluent builder for one measurement; `add()` appends it to the message."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self.measurement = Measurement(
            timestamp=message.timestamp,
            sensor_external_id="",
            value=0.0,
            observed_property="",
            unit_of_measurement="",
            properties={},
        )

    def set_timestamp(self, ts: int) -> "MeasurementBuilder":
        self.measurement.timestamp = ts
        return self

    def set_time(self, dt: datetime) -> "MeasurementBuilder":
        self.measurement.timestamp = _unix_ms(dt)
        return self

    def set_sensor(self, eid: str) -> "MeasurementBuilder":
        self.measurement.sensor_external_id = eid
        return self

    def set_value(self, value: float, obs: str, uom: str) -> "MeasurementBuilder":
        self.measurement.value = value
        self.measurement.observed_property = obs
        self.measurement.unit_of_measurement = uom
        return self

    def set_metadata(self, meta: dict[str, Any]) -> "MeasurementBuilder":
        self.measurement.properties = meta
        return self

    def set_location(self, latitude: float, longitude: float, altitude: float | None = None) -> "MeasurementBuilder":
        self.measurement.latitude = latitude
        self.measurement.longitude = longitude
        self.measurement.altitude = altitude
        return self

    def add(self) -> Message:
        self.message.measurements.append(self.measurement)
        return self.message


def parse_json(body: str | bytes) -> dict[str, Any]:
    """The body as a JSON object, or `PoisonMessage`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # The stdlib accepts a little more (NaN, Infinity) and words its
        # errors as users know them.
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PoisonMessage(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PoisonMessage(f"body is JSON {type(data).__name__}, not an object")
    return data


def check_pipeline_fields(data: dict[str, Any]) -> None:
    """Raise `PoisonMessage` unless `data` has what routing a pipeline message needs."""
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        raise PoisonMessage(f"missing required properties: {', '.join(missing)}")
    step_index = data["step_index"]
    if not isinstance(step_index, int) or isinstance(step_index, bool):
        raise PoisonMessage(f"step_index must be an integer, got {step_index!r}")
    steps = data["pipeline_steps"]
    if not isinstance(steps, list) or not all(isinstance(step, str) for step in steps):
        raise PoisonMessage("pipeline_steps must be a list of strings")


def _decode_payload(payload: Any) -> bytes | Any:
    # The wrapper SensorBucket ships decodes base64 into bytes and treats a
    # missing payload as empty bytes; user code relies on both.
    if payload is None or payload == "":
        return b""
    if not isinstance(payload, str):
        raise PoisonMessage(f"payload must be a base64 string, got {type(payload).__name__}")
    try:
        # Not validating, like the original: MIME-style line breaks pass.
        return base64.b64decode(payload)
    except binascii.Error as exc:
        raise PoisonMessage(f"payload is not valid base64: {exc}") from exc


def _step_at(steps: list[str], index: int) -> str:
    if 0 <= index < len(steps):
        return steps[index]
    raise ErrMessageNoSteps(f"pipeline message has no step at index {index} (steps: {steps})")


def _unix_ms(dt: datetime) -> int:
    # Milliseconds (the contract's unit), keeping sub-second precision the
    # original wrapper dropped.
    return int(dt.timestamp() * 1000)
