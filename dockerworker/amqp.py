"""The broker bridge: one AMQP 0-9-1 connection and one confirm-mode channel, as plain calls.

Owns: everything that speaks AMQP: connecting, declaring the worker's
topology, consuming, publishing, acknowledging, cancelling and closing,
heartbeats, and turning the broker's frames into calls on a `Listener`. The
frames are encoded and decoded by pamqp; the socket is the `reactor`'s. It
keeps no message bookkeeping: what a publish was for, and when an input may
be acknowledged, is `ledger` and `pump`'s business.

Why not pika: its package imports every adapter (asyncio's included), and
with them ssl, decimal, platform and ast; with asyncio that was most of a
worker's start (docs/benchmarks.md, "The start path"). A worker needs one
channel and a dozen methods of it, which is what is here.

Architecture Invariant: every method and every listener call runs on the
reactor's thread. A publish returns its confirm number (1, 2, 3, ... on the
channel), the number `Listener.on_confirm` later speaks of; once
`Listener.on_lost` has been called, nothing more is delivered or confirmed,
and `publish` raises `BrokerLost`. What one reactor turn writes leaves in
one `send()`.

Topology (all idempotent): the durable topic exchange AMQP_XCHG; the durable
quorum queue `worker_<id>` bound with routing key `<id>`; and the durable
queue `worker_<id>.retry`, whose messages the broker dead-letters back to the
exchange with routing key `<id>` when their per-message TTL runs out.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import deque
from typing import Any, Callable, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from pamqp import body as amqp_body
from pamqp import commands, encode, exceptions as amqp_exceptions, frame, header, heartbeat

from . import logs
from .config import Config
from .reactor import Reactor, Timer

CONNECT_TIMEOUT_S = 10.0
RPC_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
_PERSISTENT = 2
_CHANNEL = 1
# Reply codes that mean our declarations clash with what exists: retrying
# cannot help (ACCESS_REFUSED, RESOURCE_LOCKED, PRECONDITION_FAILED).
_TOPOLOGY_REPLY_CODES = frozenset({403, 405, 406})
_FRAME_MAX = 131072
_READ_BYTES = 256 * 1024
_FRAME_HEADER = struct.Struct(">BHI")
_METHOD_INDEX = struct.Struct(">I")
_FRAME_METHOD, _FRAME_HEADER_TYPE, _FRAME_BODY = 1, 2, 3
_FRAME_END = 0xCE
_CLIENT_CAPABILITIES = {
    "authentication_failure_close": True,
    "basic.nack": True,
    "connection.blocked": True,
    "consumer_cancel_notify": True,
    "publisher_confirms": True,
}

Basic = commands.Basic
Connection = commands.Connection
Channel = commands.Channel

_pamqp_table_value = encode.encode_table_value


def _table_value(value: Any) -> bytes:
    """A header value as pika (and the broker's other clients) encode it:
    pamqp writes a float as a 32-bit `f`, losing precision, and refuses
    `bytes`, which is what it decodes a header that is not UTF-8 into. A
    header the worker passes on keeps both."""
    if isinstance(value, float):
        return b"d" + encode.double(value)
    if isinstance(value, bytes):
        return b"x" + encode.byte_array(bytearray(value))
    return _pamqp_table_value(value)


# pamqp's table encoders look the function up by name at each call.
encode.encode_table_value = _table_value


class TopologyError(Exception):
    """The broker refused our declarations (exit code 5): e.g. `worker_<id>` exists with other arguments."""


class BrokerLost(Exception):
    """The connection or channel is gone (or never came): reconnect."""


class Stopped(BrokerLost):
    """The worker is stopping: the connection being opened was given up."""


class Unpublishable(Exception):
    """A message that cannot be encoded as AMQP (e.g. a routing key over 255 bytes):
    publishing it again cannot help."""


BROKER_ERRORS: tuple[type[BaseException], ...] = (BrokerLost, ConnectionError, OSError)


class Delivery(NamedTuple):
    """One message as the broker delivered it."""

    tag: int
    body: bytes
    message_id: str | None
    content_type: str | None
    headers: dict[str, Any]
    # The key it was published with (the worker's id, for a pipeline message).
    routing_key: str = ""


class Listener(Protocol):
    """What the bridge reports, on the reactor's thread."""

    def on_delivery(self, delivery: Delivery) -> None: ...

    def on_confirm(self, seq: int, multiple: bool, acked: bool) -> None:
        """The broker confirmed (or refused, `acked=False`) publish `seq`, and
        with `multiple` every publish up to it."""

    def on_return(self, routing_key: str, body: bytes) -> None:
        """A mandatory publish no queue was bound for; its confirm follows."""

    def on_lost(self, error: Exception, *, expected: bool) -> None:
        """The connection or channel is gone; `error` says why (`TopologyError`
        when the broker refused a declaration); `expected` when the worker
        closed it itself. Called once."""


class Endpoint(NamedTuple):
    """Where and as whom to connect, from an amqp:// or amqps:// URL."""

    host: str
    port: int
    tls: bool
    username: str
    password: str
    vhost: str
    heartbeat_s: int | None
    # Query options of the URL this client does not act on (pika's ssl_options, ...).
    ignored: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        # As pika read it: no path, or "/" alone, is the default vhost "/".
        vhost = unquote(parts.path[1:]) if parts.path not in ("", "/") else "/"
        options = parse_qs(parts.query)
        heartbeat_s = options.get("heartbeat")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            tls=tls,
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=vhost,
            heartbeat_s=int(heartbeat_s[0]) if heartbeat_s else None,
            ignored=frozenset(options) - {"heartbeat"},
        )


class _Incoming:
    """A delivery or a return whose header and body frames are still coming."""

    __slots__ = ("method", "properties", "size", "parts", "received")

    def __init__(self, method: Basic.Deliver | Basic.Return) -> None:
        self.method = method
        self.properties: Basic.Properties | None = None
        self.size = 0
        self.parts: list[bytes] = []
        self.received = 0


class Bridge:
    """One connection and one channel in confirm mode, for one `Listener`."""

    def __init__(
        self, config: Config, listener: Listener, reactor: Reactor, abort: Callable[[], bool] = lambda: False
    ) -> None:
        self.config = config
        self.listener = listener
        self.reactor = reactor
        # While opening: give up when this says so (a shutdown).
        self.abort = abort
        self.lost = False
        # Set by `close`: the loss that follows is our own doing.
        self.closing = False
        self._socket: socket.socket | None = None
        self._tls = False
        self._in = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._writer_waiting = False
        self._consuming = False
        self._reported = False
        self._consumer_tag: str | None = None
        self._cancelled = False
        self._closed = False
        self._publish_seq = 0
        self._frame_max = _FRAME_MAX
        # Basic.Publish frames by (exchange, routing key, mandatory): a worker
        # publishes to a handful of destinations, the same bytes each time.
        self._publish_frames: dict[tuple[str, str, bool], bytes] = {}
        self._incoming: _Incoming | None = None
        # The replies still owed to our calls, in the order they were sent,
        # and those that came and were not yet taken.
        self._awaited: deque[type[Any]] = deque()
        self._replies: deque[Any] = deque()
        self._error: Exception | None = None
        self._heartbeat_s = 0
        self._heartbeat_timer: Timer | None = None
        self._received_at = self._sent_at = time.monotonic()

    # -- opening ------------------------------------------------------------------

    def open(self) -> None:
        """Connect, open the channel in confirm mode with the prefetch, declare the topology."""
        endpoint = Endpoint.parse(self.config.amqp_url)
        if endpoint.ignored:
            logs.event(
                "amqp_url_options_ignored", level=logs.WARNING, options=sorted(endpoint.ignored),
                supported=["heartbeat"],
            )
        self._connect(endpoint)
        self._handshake(endpoint)
        # The channel's set-up and the topology in one write: the broker
        # answers a channel's methods in order, and a refusal closes the
        # channel (Channel.Close), which ends the open as it did one call
        # at a time.
        self._calls(
            (Channel.Open(), Channel.OpenOk),
            (commands.Confirm.Select(), commands.Confirm.SelectOk),
            (Basic.Qos(prefetch_count=self.config.prefetch), Basic.QosOk),
            *self._topology(),
        )

    def _connect(self, endpoint: Endpoint) -> None:
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if endpoint.tls:
                import ssl  # only for amqps://: most of a start's worth of imports otherwise

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=endpoint.host)
        except OSError as exc:
            raise BrokerLost(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}") from exc
        sock.setblocking(False)
        self._socket = sock
        self._tls = endpoint.tls
        self.reactor.add_reader(sock, self._on_readable)
        self._write(header.ProtocolHeader().marshal())

    def _handshake(self, endpoint: Endpoint) -> None:
        self._wait_for(Connection.Start)
        properties: dict[str, Any] = {
            "product": "dockerworker",
            "connection_name": f"dockerworker {self.config.worker_id}",
            "capabilities": _CLIENT_CAPABILITIES,
        }
        response = f"\0{endpoint.username}\0{endpoint.password}"
        start_ok = Connection.StartOk(client_properties=properties, mechanism="PLAIN", response=response)
        tune = self._call(start_ok, Connection.Tune, channel=0)
        self._frame_max = min(tune.frame_max or _FRAME_MAX, _FRAME_MAX)
        self._heartbeat_s = endpoint.heartbeat_s if endpoint.heartbeat_s is not None else tune.heartbeat
        self._send(0, Connection.TuneOk(tune.channel_max or 2047, self._frame_max, self._heartbeat_s))
        self._call(Connection.Open(virtual_host=endpoint.vhost), Connection.OpenOk, channel=0)
        if self._heartbeat_s:
            self._heartbeat_timer = self.reactor.call_later(self._heartbeat_s / 2, self._on_heartbeat_timer)

    def _topology(self) -> list[tuple[Any, type[Any]]]:
        """The declarations of the worker's exchange and queues, each with its reply."""
        config = self.config
        quorum: dict[str, Any] = {"x-queue-type": "quorum"}
        retry_arguments: dict[str, Any] = {"x-dead-letter-exchange": config.exchange, "x-dead-letter-routing-key": config.routing_key}
        return [
            (commands.Exchange.Declare(exchange=config.exchange, exchange_type="topic", durable=True),
             commands.Exchange.DeclareOk),
            (commands.Queue.Declare(queue=config.queue, durable=True, arguments=quorum), commands.Queue.DeclareOk),
            (commands.Queue.Bind(queue=config.queue, exchange=config.exchange, routing_key=config.routing_key),
             commands.Queue.BindOk),
            (commands.Queue.Declare(queue=config.retry_queue, durable=True, arguments=retry_arguments),
             commands.Queue.DeclareOk),
        ]  # fmt: skip

    def consume(self) -> None:
        """Attach the consumer; deliveries go to `Listener.on_delivery` from now on."""
        reply = self._call(Basic.Consume(queue=self.config.queue), Basic.ConsumeOk)
        self._consumer_tag = reply.consumer_tag
        self._consuming = True

    # -- the per-message calls ------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None,
        headers: dict[str, Any],
        mandatory: bool,
        content_type: str | None = "application/json",
        expiration: str | None = None,
    ) -> int:
        """Publish a persistent message; return its confirm number."""
        if self.lost or self.closing or self._socket is None:
            raise BrokerLost("publish failed: no channel")
        try:
            properties = Basic.Properties(
                content_type=content_type,
                headers=headers,
                delivery_mode=_PERSISTENT,
                expiration=expiration,
                message_id=message_id,
            )
            key = (exchange, routing_key, mandatory)
            method = self._publish_frames.get(key)
            if method is None:
                if len(self._publish_frames) >= 64:
                    self._publish_frames.clear()
                publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                method = frame.marshal(publish, _CHANNEL)
                self._publish_frames[key] = method
            frames = [method, frame.marshal(header.ContentHeader(0, len(body), properties), _CHANNEL)]
        except (TypeError, ValueError, struct.error, amqp_exceptions.PAMQPException) as exc:
            raise Unpublishable(f"cannot encode a publish to {exchange!r} with routing key {routing_key!r}: {exc}") from exc
        step = self._frame_max - 8
        for start in range(0, len(body), step):
            frames.append(frame.marshal(amqp_body.ContentBody(body[start : start + step]), _CHANNEL))
        self._write(b"".join(frames))
        self._publish_seq += 1
        return self._publish_seq

    def ack(self, tag: int, *, multiple: bool) -> None:
        self._send_if_open(Basic.Ack(delivery_tag=tag, multiple=multiple))

    def nack(self, tag: int) -> None:
        """Hand the input back to the queue."""
        self._send_if_open(Basic.Nack(delivery_tag=tag, requeue=True))

    def _send_if_open(self, method: Any) -> None:
        if not (self.lost or self.closing or self._socket is None):
            self._send(_CHANNEL, method)
        # otherwise the channel is gone: the broker requeues whatever was not acked

    # -- closing -----------------------------------------------------------------

    def cancel(self, timeout_s: float = 1.0) -> None:
        """Stop deliveries (what is in hand stays in hand); waits up to `timeout_s` for the broker."""
        if self.lost or self._consumer_tag is None:
            return  # the close that follows stops deliveries as well
        self._send(_CHANNEL, Basic.Cancel(consumer_tag=self._consumer_tag))
        self.reactor.run_until(lambda: self._cancelled or self.lost, timeout_s)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the connection (unacknowledged inputs go back to the queue) and wait up to `timeout_s` for it."""
        self.closing = True
        if self._socket is not None and not self.lost:
            self._send(0, Connection.Close(reply_code=200, reply_text="worker stopping", class_id=0, method_id=0))
            self.reactor.run_until(lambda: self._closed or self.lost, timeout_s)
        self._lose(BrokerLost("connection closed by the worker"))
        self._drop_socket()

    # -- the broker's frames -----------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._socket
        if sock is None:
            return
        try:
            while True:
                data = sock.recv(_READ_BYTES)
                if not data:
                    self._read_frames()  # what came before the end: a Connection.Close's reason, confirms
                    self._fail(BrokerLost("connection closed by the broker (end of stream)"))
                    return
                self._in += data
                # A TLS socket may hold decrypted records the selector cannot see.
                if len(data) < _READ_BYTES and not (self._tls and sock.pending()):  # type: ignore[attr-defined]
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if type(exc).__name__ not in ("SSLWantReadError", "SSLWantWriteError"):
                self._fail(BrokerLost(f"connection lost: {exc!r}"))
                return
        self._received_at = time.monotonic()
        self._read_frames()

    def _read_frames(self) -> None:
        """Decode every whole frame received so far.

        The frame's envelope (type, channel, size, end octet) is read here, so
        that a body frame's payload goes to the message as it is, and a
        method or header frame is decoded by pamqp's class for it: no
        intermediate object per frame (every message is three frames)."""
        buffer = self._in
        position = 0
        try:
            while len(buffer) - position >= 8 and self._socket is not None:
                frame_type, channel, size = _FRAME_HEADER.unpack_from(buffer, position)
                end = position + 8 + size
                if len(buffer) < end:
                    break
                if buffer[end - 1] != _FRAME_END:
                    raise ValueError(f"frame of type {frame_type} does not end with 0xCE")
                payload = bytes(buffer[position + 7 : end - 1])
                position = end
                if frame_type == _FRAME_BODY:
                    if self._incoming is not None:
                        self._assemble_body(self._incoming, payload)
                elif frame_type == _FRAME_HEADER_TYPE:
                    content = header.ContentHeader()
                    content.unmarshal(payload)
                    if self._incoming is not None:
                        self._assemble_header(self._incoming, content)
                elif frame_type == _FRAME_METHOD:
                    (index,) = _METHOD_INDEX.unpack_from(payload)
                    method = commands.INDEX_MAPPING[index]()
                    method.unmarshal(payload[4:])
                    self._dispatch(channel, method)
                # a heartbeat (type 8): its arrival is all it says
        except (amqp_exceptions.PAMQPException, KeyError, ValueError, struct.error) as exc:
            self._fail(BrokerLost(f"cannot read the broker's frames: {exc!r}"))
            return
        del buffer[:position]

    def _dispatch(self, channel: int, value: Any) -> None:
        if isinstance(value, (Basic.Ack, Basic.Nack)):
            if not self.lost:
                self.listener.on_confirm(value.delivery_tag, bool(value.multiple), isinstance(value, Basic.Ack))
        elif isinstance(value, (Basic.Deliver, Basic.Return)):
            self._incoming = _Incoming(value)
        elif self._awaited and isinstance(value, self._awaited[0]):
            self._awaited.popleft()
            self._replies.append(value)
        elif isinstance(value, Basic.CancelOk):
            self._cancelled = True
        elif isinstance(value, Basic.Cancel):
            # The broker cancelled our consumer (the queue was deleted): end the
            # session so that the next one declares the queue again.
            self._fail(BrokerLost("consumer cancelled by the broker"), close_connection=True)
        elif isinstance(value, Channel.Close):
            self._send(_CHANNEL, Channel.CloseOk())
            reason = f"{value.reply_code} {value.reply_text}"
            error: Exception
            if not self._consuming and value.reply_code in _TOPOLOGY_REPLY_CODES:
                error = TopologyError(f"the broker refused the worker's exchange or queues: {reason}")
            else:
                error = BrokerLost(f"channel closed by the broker: {reason}")
            self._fail(error, close_connection=True)  # a fresh connection gets a fresh channel
        elif isinstance(value, Connection.Close):
            self._send(0, Connection.CloseOk())
            self._fail(BrokerLost(f"connection closed by the broker: {value.reply_code} {value.reply_text}"))
        elif isinstance(value, Connection.CloseOk):
            self._closed = True
        elif isinstance(value, Connection.Blocked):
            logs.event("broker_blocked", level=logs.WARNING, reason=value.reason)
        elif isinstance(value, Connection.Unblocked):
            logs.event("broker_unblocked")

    def _assemble_header(self, incoming: _Incoming, content: header.ContentHeader) -> None:
        incoming.properties, incoming.size = content.properties, content.body_size
        if incoming.size == 0:
            self._deliver(incoming)

    def _assemble_body(self, incoming: _Incoming, payload: bytes) -> None:
        incoming.parts.append(payload)
        incoming.received += len(payload)
        if incoming.properties is not None and incoming.received >= incoming.size:
            self._deliver(incoming)

    def _deliver(self, incoming: _Incoming) -> None:
        assert incoming.properties is not None, "a content header came first"
        self._incoming = None
        body = incoming.parts[0] if len(incoming.parts) == 1 else b"".join(incoming.parts)
        method = incoming.method
        if isinstance(method, Basic.Return):
            self.listener.on_return(method.routing_key or "", body)
        elif not self.lost:
            properties = incoming.properties
            self.listener.on_delivery(
                Delivery(
                    method.delivery_tag or 0,
                    body,
                    properties.message_id,
                    properties.content_type,
                    dict(properties.headers) if properties.headers else {},
                    method.routing_key or "",
                )
            )

    # -- heartbeats --------------------------------------------------------------------

    def _on_heartbeat_timer(self) -> None:
        if self._socket is None:
            return
        now, interval = time.monotonic(), self._heartbeat_s
        if now - self._received_at > 2 * interval:
            self._fail(BrokerLost(f"no frame from the broker for {now - self._received_at:.0f}s (heartbeat {interval}s)"))
            return
        if now - self._sent_at >= interval / 2:
            self._write(heartbeat.Heartbeat.marshal())
        self._heartbeat_timer = self.reactor.call_later(interval / 2, self._on_heartbeat_timer)

    # -- writing -----------------------------------------------------------------------

    def _send(self, channel: int, method: Any) -> None:
        self._write(frame.marshal(method, channel))

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_scheduled and not self._writer_waiting:
            self._flush_scheduled = True
            self.reactor.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what was written since the last turn, in one `send()`."""
        self._flush_scheduled = False
        sock = self._socket
        if sock is None or not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if type(exc).__name__ not in ("SSLWantReadError", "SSLWantWriteError"):
                self._fail(BrokerLost(f"connection lost: {exc!r}"))
                return
            sent = 0
        self._sent_at = time.monotonic()
        if sent < len(data):
            self._out.insert(0, data[sent:])
            if not self._writer_waiting:
                self._writer_waiting = True
                self.reactor.add_writer(sock, self._flush)
        elif self._writer_waiting:
            self._writer_waiting = False
            self.reactor.remove_writer(sock)

    # -- waiting for a reply -------------------------------------------------------------

    def _call(self, method: Any, reply: type[Any], *, channel: int = _CHANNEL) -> Any:
        """Send `method` and run the reactor until its reply comes."""
        self._send(channel, method)
        return self._wait_for(reply)

    def _calls(self, *calls: tuple[Any, type[Any]]) -> list[Any]:
        """Send the methods of one channel in one write, then take their replies in order."""
        for method, reply in calls:
            self._send(_CHANNEL, method)
            self._awaited.append(reply)
        return [self._take(reply) for _, reply in calls]

    def _wait_for(self, reply: type[Any]) -> Any:
        self._awaited.append(reply)
        return self._take(reply)

    def _take(self, reply: type[Any]) -> Any:
        """The next reply owed, `reply`; runs the reactor until it comes.
        A wait that ends otherwise leaves nothing owed behind."""
        try:
            if not self.lost:
                self.reactor.run_until(lambda: bool(self._replies) or self.lost or self.abort(), RPC_TIMEOUT_S)
            if not self.lost and not self._replies:
                self._fail(
                    Stopped("stopped while connecting")
                    if self.abort()
                    else BrokerLost(f"no {reply.__name__} from the broker within {RPC_TIMEOUT_S:g}s")
                )
            if self.lost:
                raise self._error or BrokerLost("connection closed")
        except BaseException:
            self._awaited.clear()
            self._replies.clear()
            raise
        return self._replies.popleft()

    # -- losing the connection ----------------------------------------------------------

    def _fail(self, error: Exception, *, close_connection: bool = False) -> None:
        """The connection or channel is gone, or must go: tell the listener, once, and drop the socket.

        With `close_connection` (the channel is gone, the connection not) the
        broker is told first; an answer it is owed (a CloseOk) goes out too."""
        self._lose(error)
        if close_connection and self._socket is not None and not self._closed:
            self._send(0, Connection.Close(reply_code=200, reply_text="channel gone", class_id=0, method_id=0))
        self._drop_socket()

    def _lose(self, error: Exception) -> None:
        if self._reported:
            return
        self._reported = self.lost = True
        self._error = error
        # Before the consumer is attached the caller sees the error itself.
        self.listener.on_lost(error, expected=self.closing or not self._consuming)

    def _drop_socket(self) -> None:
        sock, self._socket = self._socket, None
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if sock is None:
            return
        self.reactor.remove_reader(sock)
        if self._writer_waiting:
            self.reactor.remove_writer(sock)
            self._writer_waiting = False
        if self._out:
            try:  # what the broker is owed (a CloseOk, our Close); best effort
                sock.send(b"".join(self._out))
            except OSError:
                pass
            self._out.clear()
        sock.close()
