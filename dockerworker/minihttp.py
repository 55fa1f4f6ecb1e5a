"""The little HTTP the runtime speaks, over plain sockets: one request per connection.

Owns: the client side of the code download (GET) and of the ready report
(POST), and the server side of the health endpoint, as far as those need:
HTTP/1.1 with `Connection: close`, bodies delimited by Content-Length, by
chunks or by the end of the connection, no keep-alive, no pipelining.

Why not http.client and http.server: the standard library's HTTP imports the
`email` package (a dozen modules, to parse headers) and the server side
socketserver, html and mimetypes; together about a tenth of a container's
start, for three requests in its life. `https://` URLs are handed to
http.client (and ssl), imported then.

Must not do: retry, decide what an answer means (the callers do).
"""

from __future__ import annotations

import socket
import threading
from typing import Callable, NamedTuple
from urllib.parse import urlsplit

# The most of an answer's or a request's head read; more is a protocol error.
_MAX_HEAD_BYTES = 64 * 1024


class HttpError(OSError):
    """The peer spoke something that is not the HTTP expected (an OSError: callers treat it as a failed request)."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


def request(method: str, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> Response:
    """One request with an empty body; the whole answer. Raises OSError (HttpError included) when there is none,
    ValueError for a URL that is not http(s)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        return _via_http_client(method, parts.hostname or "", parts.port, target, timeout_s, headers or {})
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    host = parts.netloc.rpartition("@")[2]  # as written: an IPv6 address keeps its brackets
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return _read_response(_Reader(sock), method)


def _via_http_client(
    method: str, host: str, port: int | None, target: str, timeout_s: float, headers: dict[str, str]
) -> Response:
    import http.client  # https only: it brings ssl and the email package

    connection = http.client.HTTPSConnection(host, port, timeout=timeout_s)
    try:
        connection.request(method, target, body=b"", headers={**headers, "content-length": "0", "connection": "close"})
        answer = connection.getresponse()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
    except http.client.HTTPException as exc:
        raise HttpError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()


class _Reader:
    """Buffered reads from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.eof = False

    def fill(self) -> bool:
        """Read more; False at the end of the connection."""
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def until(self, marker: bytes, limit: int) -> bytes:
        """Up to and without `marker`, which is consumed."""
        while (index := self.buffer.find(marker)) < 0:
            if len(self.buffer) > limit or not self.fill():
                raise HttpError("connection closed, or a line too long, before the end of a head")
        line = bytes(self.buffer[:index])
        del self.buffer[: index + len(marker)]
        return line

    def exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self.fill():
                raise HttpError(f"connection closed {count - len(self.buffer)} bytes before the end of the body")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def rest(self) -> bytes:
        while self.fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _read_response(reader: _Reader, method: str) -> Response:
    while True:
        status, headers = _read_head(reader)
        if not 100 <= status < 200:  # an interim answer (100 Continue) is skipped
            break
    if method == "HEAD" or status in (204, 304):
        return Response(status, headers, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Response(status, headers, _read_chunked(reader))
    length = headers.get("content-length")
    if length is not None:
        try:
            return Response(status, headers, reader.exactly(int(length)))
        except ValueError as exc:
            raise HttpError(f"bad content-length {length!r}") from exc
    return Response(status, headers, reader.rest())


def _read_head(reader: _Reader) -> tuple[int, dict[str, str]]:
    head = reader.until(b"\r\n\r\n", _MAX_HEAD_BYTES).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/"):
        raise HttpError(f"not an HTTP answer: {status_line[:80]!r}")
    try:
        status = int(rest[:3])
    except ValueError as exc:
        raise HttpError(f"bad status line {status_line[:80]!r}") from exc
    return status, _headers(lines)


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def _read_chunked(reader: _Reader) -> bytes:
    body = bytearray()
    while True:
        size_line = reader.until(b"\r\n", _MAX_HEAD_BYTES).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError as exc:
            raise HttpError(f"bad chunk size {size_line[:20]!r}") from exc
        if size == 0:
            while reader.until(b"\r\n", _MAX_HEAD_BYTES):  # trailers, up to the empty line
                pass
            return bytes(body)
        body += reader.exactly(size)
        reader.exactly(2)  # the chunk's CRLF


# -- the server side ----------------------------------------------------------------------

# A request's path → (status, JSON body).
Handler = Callable[[str], tuple[int, bytes]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Server:
    """Answers GET requests with `handler(path)`, one connection at a time, on a daemon thread.

    The thread waits in `accept` for as long as nobody asks (no polling);
    each connection gets `timeout_s` to send its request, so a client that
    sends nothing holds the others up that long at most. `stop` wakes the
    thread with a connection of its own.
    """

    def __init__(self, host: str, port: int, handler: Handler, timeout_s: float = 2.0) -> None:
        self._socket = socket.create_server((host, port), reuse_port=False)
        self._handler = handler
        self._timeout_s = timeout_s
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)

    @property
    def port(self) -> int:
        port: int = self._socket.getsockname()[1]
        return port

    def start(self) -> "Server":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
        except OSError:
            pass  # not listening on loopback: the thread is a daemon and ends with the process
        self._thread.join(timeout=2.0)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            with connection:
                if not self._stopping:
                    self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(self._timeout_s)
            request_line = _Reader(connection).until(b"\r\n\r\n", _MAX_HEAD_BYTES).split(b"\r\n", 1)[0]
            method, _, rest = request_line.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].split("?", 1)[0]
            status, body = self._handler(path) if method in ("GET", "HEAD") else (405, b'{"status": "GET only"}')
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            connection.sendall(head.encode("latin-1") + (b"" if method == "HEAD" else body))
        except OSError:
            pass  # the client went away or said nothing in time
