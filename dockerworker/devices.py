"""Client of the core service's devices endpoint (ENDPOINT_DEVICES).

Owns: the one HTTP call behind `Message.match_device`, and the split of its
failures into those worth retrying later (the endpoint is down or overloaded)
and those that are the user's to fix (bad token, no or several devices).

`requests` is imported on the first `match_device`, not with this module:
most workers never call it, and the import is a good part of a container's
start-up time.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

REQUEST_TIMEOUT_S = 10.0

# Statuses that say "not now" rather than "never": the message is retried.
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransientFailure(Exception):
    """A failure that may pass: the message is retried after a delay.

    User code may raise it too, to ask for a later attempt.
    """


class DevicesEndpointUnavailable(TransientFailure):
    """The devices endpoint could not be reached or answered with a server error."""


class DevicesEndpointError(Exception):
    """The devices endpoint refused the request (a 4xx answer, or a body we cannot read)."""


class MissingRequiredEnvironmentVariable(Exception):
    """ENDPOINT_DEVICES is not set but user code asked to match a device."""


class PropertiesMatchedNotExactlyOneDevice(Exception):
    """`match_device` found no device, or more than one, for the given properties."""


_session_local = threading.local()


def _session() -> requests.Session:
    # One keep-alive session per thread: user code runs on one thread, so
    # this is one connection pool per worker in practice.
    session: requests.Session | None = getattr(_session_local, "session", None)
    if session is None:
        import requests

        session = _session_local.session = requests.Session()
    return session


def find_devices(endpoint: str | None, access_token: str, properties: dict[str, Any]) -> list[Any]:
    """Ask the devices endpoint which devices have these properties."""
    if not endpoint:
        raise MissingRequiredEnvironmentVariable("ENDPOINT_DEVICES must be set to match devices")
    import requests

    try:
        response = _session().get(
            endpoint,
            params={"properties": json.dumps(properties)},
            headers={"authorization": "bearer " + (access_token or "")},
            timeout=REQUEST_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        raise DevicesEndpointUnavailable(f"devices endpoint unreachable: {exc}") from exc
    return _devices_from(response)


def match_one(endpoint: str | None, access_token: str, properties: dict[str, Any]) -> Any:
    """The single device with these properties; zero or several is an error."""
    devices = find_devices(endpoint, access_token, properties)
    if not devices:
        raise PropertiesMatchedNotExactlyOneDevice(f"can't find device with properties: {properties}")
    if len(devices) > 1:
        raise PropertiesMatchedNotExactlyOneDevice(f"too many devices match properties: {properties}")
    return devices[0]


def _devices_from(response: requests.Response) -> list[Any]:
    if response.status_code in _RETRYABLE_STATUSES:
        raise DevicesEndpointUnavailable(f"devices endpoint answered {response.status_code}")
    if response.status_code >= 400:
        raise DevicesEndpointError(f"devices endpoint answered {response.status_code}: {response.text[:200]}")
    try:
        devices = response.json()["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DevicesEndpointError(f"devices endpoint answered an unreadable body: {exc}") from exc
    if not isinstance(devices, list):
        raise DevicesEndpointError("devices endpoint answered 'data' that is not a list")
    return devices
