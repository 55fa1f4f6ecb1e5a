"""Downloading the code from a local HTTP server: retries, backoff, sha256, bad answers."""

from __future__ import annotations

import hashlib
import threading

import pytest

from dockerworker.codefetch import CodeFetchError, FetchPolicy, Interrupted, fetch

from .support import code_answer, free_port, sensorbucket_zip

ARCHIVE = sensorbucket_zip("def process(m):\n    return m\n")
FAST = FetchPolicy(attempts=5, timeout_s=2.0, first_delay_s=0.01, max_delay_s=0.05)


def test_the_archive_is_decoded_from_the_data_field(http_stub):
    server = http_stub(code_answer(ARCHIVE))

    assert fetch(server.url + "/w/source", None, FAST) == ARCHIVE
    assert server.script.requests[0][0] == "/w/source"


def test_a_controller_that_is_still_starting_is_retried(http_stub):
    server = http_stub((503, {}), (502, {}), code_answer(ARCHIVE))

    assert fetch(server.url, None, FAST) == ARCHIVE
    assert len(server.script.requests) == 3


def test_a_controller_that_is_not_listening_yet_is_retried_then_given_up_on():
    url = f"http://127.0.0.1:{free_port()}/source"

    with pytest.raises(CodeFetchError, match="after 5 attempts"):
        fetch(url, None, FAST)


def test_a_404_is_retried_only_a_few_times(http_stub):
    server = http_stub((404, {"message": "not found"}))

    with pytest.raises(CodeFetchError, match="404"):
        fetch(server.url, None, FetchPolicy(attempts=10, timeout_s=2.0, first_delay_s=0.01, max_delay_s=0.01))
    assert len(server.script.requests) == 3


def test_a_400_is_not_retried(http_stub):
    server = http_stub((400, {"message": "bad id"}))

    with pytest.raises(CodeFetchError, match="400"):
        fetch(server.url, None, FAST)
    assert len(server.script.requests) == 1


def test_a_matching_sha256_passes(http_stub):
    server = http_stub(code_answer(ARCHIVE))

    assert fetch(server.url, hashlib.sha256(ARCHIVE).hexdigest(), FAST) == ARCHIVE


def test_a_sha256_mismatch_is_refused_without_retrying(http_stub):
    server = http_stub(code_answer(ARCHIVE))

    with pytest.raises(CodeFetchError, match="sha256 mismatch"):
        fetch(server.url, "0" * 64, FAST)
    assert len(server.script.requests) == 1


@pytest.mark.parametrize(
    "answer, reason",
    [
        ((200, {"message": "no data"}), "'data'"),
        ((200, {"data": ""}), "empty"),
        ((200, {"data": "***not base64***"}), "not base64"),
        ((200, ["a", "list"]), "'data'"),
    ],
)
def test_answers_without_a_usable_archive_are_refused(http_stub, answer, reason):
    server = http_stub(answer)

    with pytest.raises(CodeFetchError, match=reason):
        fetch(server.url, None, FAST)


def test_a_stop_request_interrupts_the_backoff(http_stub):
    server = http_stub((503, {}))
    stop = threading.Event()
    stop.set()

    with pytest.raises(Interrupted):
        fetch(server.url, None, FetchPolicy(attempts=5, timeout_s=2.0, first_delay_s=30, max_delay_s=30), stop)
