"""The runtime's own HTTP client against scripted servers: the answers real servers give."""

from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

from dockerworker import minihttp


class Scripted:
    """Accepts connections and sends each the next canned answer, raw; records the requests."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def _serve(self) -> None:
        while self.answers:
            connection, _ = self._socket.accept()
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(4096)
                self.requests.append(request)
                connection.sendall(self.answers.pop(0))

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def scripted() -> Iterator[type[Scripted]]:
    made: list[Scripted] = []

    def make(*answers: bytes) -> Scripted:
        made.append(Scripted(*answers))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in made:
        server.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nhe\r\n3\r\nllo\r\n0\r\nTrailer: t\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nhello",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    ],
    ids=["content-length", "chunked", "until-close", "after-100-continue"],
)
def test_every_way_of_delimiting_a_body_is_read(scripted, answer: bytes) -> None:
    server = scripted(answer)

    response = minihttp.request("GET", server.url + "/w/source?token=t", 2.0, headers={"Accept": "application/json"})

    assert (response.status, response.body) == (200, b"hello")
    request = server.requests[0].decode()
    assert request.startswith("GET /w/source?token=t HTTP/1.1\r\n")
    assert "Host: 127.0.0.1:" in request and "Accept: application/json" in request


def test_a_post_has_an_empty_body_and_the_status_is_given_whatever_it_is(scripted) -> None:
    server = scripted(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    assert minihttp.request("POST", server.url + "/ready", 2.0).status == 503
    assert "Content-Length: 0" in server.requests[0].decode()


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b"HTTP/1.1 20"],
    ids=["not-http", "cut-body", "cut-head"],
)
def test_a_broken_answer_is_an_os_error(scripted, answer: bytes) -> None:
    server = scripted(answer)

    with pytest.raises(OSError):
        minihttp.request("GET", server.url, 2.0)


def test_only_http_urls_are_taken() -> None:
    with pytest.raises(ValueError):
        minihttp.request("GET", "ftp://example.invalid/x", 1.0)


def test_the_code_download_follows_redirects(scripted) -> None:
    from dockerworker.codefetch import _get

    target = scripted(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
    redirect = scripted(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target.url}/there\r\nContent-Length: 0\r\n\r\n".encode())

    answer = _get(redirect.url + "/here", 2.0)

    assert (answer.status, answer.body) == (200, b"{}")
    assert target.requests[0].startswith(b"GET /there HTTP/1.1")
