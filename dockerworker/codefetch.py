"""Downloading the worker's code archive from the controller (CODE_URL).

Owns: the GET with retries and exponential backoff (the controller may still
be starting when the container is), the decoding of the `{"data": "<base64>"}`
answer, and the sha256 check against CODE_SHA256.
Must not do: unpack or import anything (that is `codeload`).

It uses `minihttp`, not `requests`: importing requests (urllib3,
charset_normalizer, idna, importlib.metadata...) cost a container about a
third of its start-up, for one GET; nor urllib.request, which brings
http.client, the email package, tempfile, shutil, bz2 and lzma for the same
GET. It follows redirects itself.
"""

from __future__ import annotations

import base64
import binascii
import threading
from typing import Callable, NamedTuple
from urllib.parse import urljoin

import orjson

from . import logs, minihttp

# Answers that may change if we ask again: the controller is restarting, a
# proxy in front of it is, or the row is being written right now.
_RETRYABLE_STATUSES = frozenset({404, 408, 425, 429, 500, 502, 503, 504})
# A 404 is retried only a few times: it usually means "disabled or deleted",
# which waiting will not fix, but a controller that has just started may
# answer it for a moment before its store is loaded.
_MAX_404_ATTEMPTS = 3
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 15.0


class CodeFetchError(Exception):
    """The code could not be downloaded or is not the expected archive (exit code 3)."""


class Interrupted(Exception):
    """Shutdown was requested while waiting to retry the download."""


class FetchPolicy(NamedTuple):
    attempts: int = 10
    timeout_s: float = 10.0
    first_delay_s: float = _FIRST_DELAY_S
    max_delay_s: float = _MAX_DELAY_S


def fetch(
    url: str,
    expected_sha256: str | None,
    policy: FetchPolicy,
    stop: threading.Event | None = None,
    get: Get | None = None,
) -> bytes:
    """Download the zip behind `url`, retrying what may pass; return its bytes."""
    stop = stop or threading.Event()
    get = get or _get
    not_found = 0
    for attempt in range(1, policy.attempts + 1):
        try:
            archive = _fetch_once(url, policy.timeout_s, get)
            _verify(archive, expected_sha256)
            return archive
        except _Retryable as exc:
            not_found += exc.status == 404
            if attempt == policy.attempts or not_found >= _MAX_404_ATTEMPTS:
                raise CodeFetchError(f"giving up on {url} after {attempt} attempts: {exc}") from exc
            delay = _backoff(attempt, policy)
            logs.event("code_fetch_retry", attempt=attempt, delay_s=round(delay, 2), reason=str(exc))
            if stop.wait(delay):
                raise Interrupted() from exc
    raise AssertionError("unreachable: the loop returns or raises")


class _Retryable(Exception):
    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class Answer(NamedTuple):
    status: int
    body: bytes


# A GET with a timeout: the answer, whatever its status; OSError when there
# is none, ValueError for a URL that is not http(s).
Get = Callable[[str, float], Answer]


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


def _get(url: str, timeout_s: float) -> Answer:
    for _ in range(_MAX_REDIRECTS + 1):
        response = minihttp.request("GET", url, timeout_s, headers={"Accept": "application/json"})
        location = response.headers.get("location")
        if response.status not in _REDIRECTS or not location:
            return Answer(response.status, response.body)
        url = urljoin(url, location)
    raise minihttp.HttpError(f"more than {_MAX_REDIRECTS} redirects")


def _fetch_once(url: str, timeout_s: float, get: Get) -> bytes:
    try:
        answer = get(url, timeout_s)
    except (OSError, ValueError) as exc:
        # ValueError: a URL that is not http(s) at all (config checks the scheme).
        raise _Retryable(f"request failed: {type(exc).__name__}: {exc}") from exc
    if answer.status in _RETRYABLE_STATUSES:
        raise _Retryable(f"controller answered {answer.status}", answer.status)
    if answer.status != 200:
        text = answer.body[:200].decode("utf-8", errors="replace")
        raise CodeFetchError(f"controller answered {answer.status}: {text}")
    return _decode(answer.body)


def _decode(body: bytes) -> bytes:
    try:
        encoded = orjson.loads(body)["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CodeFetchError(f"code answer is not JSON with a 'data' field: {exc!r}") from exc
    if not isinstance(encoded, str) or not encoded:
        raise CodeFetchError("code answer's 'data' is empty or not a string")
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise CodeFetchError(f"code answer's 'data' is not base64: {exc}") from exc


def _verify(archive: bytes, expected_sha256: str | None) -> None:
    if expected_sha256 is None:
        return
    import hashlib  # only here: it loads OpenSSL's libcrypto

    actual = hashlib.sha256(archive).hexdigest()
    if actual != expected_sha256:
        # Not retried: the controller serves the latest revision, so a
        # mismatch means this container is stale and is about to be replaced.
        raise CodeFetchError(f"code sha256 mismatch: expected {expected_sha256}, got {actual}")


def _backoff(attempt: int, policy: FetchPolicy) -> float:
    # Exponential with jitter, so a fleet of workers restarted together does
    # not hammer a recovering controller in lockstep.
    import random  # only on a retry

    ceiling = min(policy.max_delay_s, policy.first_delay_s * 2.0 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)
