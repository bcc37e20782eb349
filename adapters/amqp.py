"""AMQP adapter: forwards each delivery to an exchange of another broker (or vhost), with publisher confirms.

URL
===

.. code-block::

    amqp://[USER:PASSWORD@]HOST[:PORT]/[VHOST]?exchange=NAME[&routing_key=KEY][&mandatory=1]
    amqps://...                              (TLS)

    amqp://courier:${LIS_MQ_PASSWORD}@lis-mq:5672/lab?exchange=hl7.inbound&routing_key=adt
    amqp://guest:guest@127.0.0.1:5672//?exchange=&routing_key=erp.charges

The vhost is the path as in any AMQP URL (``/`` is written ``//`` at the end, or
``%2F``). RabbitMQ's default port 5672 (5671 for amqps) is used when none is given.

Options
=======

* ``exchange`` (required, may be empty): the exchange to publish to. It
  belongs to the receiving side and is not declared: a missing exchange is a
  TemporaryError naming it. ``exchange=`` (empty) is the default exchange,
  where the routing key is a queue name.
* ``routing_key``: default empty; required with the default exchange.
* ``mandatory``: ``1`` to have the broker return a message that no queue
  receives (unroutable), which is then a TemporaryError instead of a silent
  drop. Default ``0``.

``timeout`` bounds the connect and the wait for the broker's confirm;
``secret`` is ignored.

Message
=======

The body unchanged, persistent (delivery mode 2), with ``content_type``,
``message_id`` = delivery id (the same on every attempt: consumers deduplicate
on it), ``correlation_id``, ``type`` = Courier's message type, and the headers
``x-courier-delivery-id`` and ``x-courier-message-id``.

Outcome
=======

* The broker confirms (basic.ack): sent.
* The broker nacks, returns the message (``mandatory=1``), the exchange is
  missing, access is refused, the connection fails or the confirm does not
  arrive within ``timeout``: TemporaryError. The connection is dropped after
  any failure and reopened by the next send.

Threads: an instance holds one connection and channel; use one per thread.
"""
from __future__ import annotations

import socket
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from courier.adapters.base import Adapter, Outgoing, PermanentError, Sent, TemporaryError

_OPTIONS = {"exchange", "routing_key", "mandatory"}
_DETAIL_CHARS = 200


def _parse(url: str) -> tuple[str, str, str, bool]:
    """amqp URL -> (broker URL for kombu, exchange, routing key, mandatory)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("amqp URL needs a host, e.g. amqp://user:password@broker:5672/vhost?exchange=NAME")
    try:
        parts.port
    except ValueError:
        raise ValueError("amqp URL has an invalid port (expected 1-65535)") from None
    options: dict[str, str] = {}
    passed = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            options[name] = value
        else:
            passed.append((name, value))
    if passed:
        raise ValueError(f"unknown amqp URL option(s) {', '.join(sorted({n for n, _ in passed}))}; "
                         f"known: {', '.join(sorted(_OPTIONS))}")
    if "exchange" not in options:
        raise ValueError("amqp URL needs ?exchange=NAME (exchange= for the default exchange, with routing_key=QUEUE)")
    exchange, routing_key = options["exchange"], options.get("routing_key", "")
    if not exchange and not routing_key:
        raise ValueError("amqp URL with the default exchange (exchange=) needs routing_key=QUEUE")
    for name, value in (("exchange", exchange), ("routing_key", routing_key)):
        if len(value.encode()) > 255:
            raise ValueError(f"amqp URL {name} is longer than 255 bytes")
    mandatory = options.get("mandatory", "0")
    if mandatory not in ("0", "1"):
        raise ValueError("amqp URL mandatory must be 0 or 1")
    if parts.fragment:
        raise ValueError("amqp URL must not have a #fragment")
    broker = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([]), ""))
    return broker, exchange, routing_key, mandatory == "1"


class AmqpAdapter(Adapter):
    """Publishes each delivery to one exchange and waits for the broker's confirm."""

    scheme = ("amqp", "amqps")

    def __init__(self, url: str, *, timeout: float = 10.0, secret: str | None = None):
        super().__init__(url, timeout=timeout, secret=secret)
        self.broker_url, self.exchange, self.routing_key, self.mandatory = _parse(url)
        self._connection = None
        self._producer = None
        self._returned: list[str] = []

    @classmethod
    def check_url(cls, url: str) -> None:
        super().check_url(url)
        _parse(url)

    def _ready(self):
        if self._producer is not None:
            return self._producer
        from kombu import Connection, Exchange, Producer

        self._connection = Connection(self.broker_url, connect_timeout=self.timeout,
                                      transport_options={"confirm_publish": True}, heartbeat=0)
        self._connection.connect()  # raises at once; no kombu retry loop (the caller owns retries)
        channel = self._connection.channel()
        # The exchange is the receiver's: used by name, never declared (a missing one fails the publish).
        exchange = Exchange(self.exchange, no_declare=True)
        self._producer = Producer(channel, exchange=exchange, auto_declare=False, on_return=self._on_return)
        return self._producer

    def _on_return(self, exception, exchange, routing_key, message):
        self._returned.append(str(getattr(exception, "reply_text", "") or exception))

    def send(self, out: Outgoing) -> Sent:
        for name, value in (("delivery id", out.delivery_id), ("correlation id", out.correlation_id)):
            if len(value.encode("utf-8", "replace")) > 255:
                raise PermanentError(f"{name} is longer than 255 bytes (AMQP short string)")
        self._returned.clear()
        try:
            producer = self._ready()
            producer.publish(
                out.body,
                routing_key=self.routing_key,
                content_type=out.content_type,
                content_encoding="binary",
                delivery_mode=2,
                mandatory=self.mandatory,
                message_id=out.delivery_id,
                correlation_id=out.correlation_id,
                type=out.message_type,
                headers={"x-courier-delivery-id": out.delivery_id, "x-courier-message-id": out.message_id},
                retry=False,
                timeout=self.timeout,
                confirm_timeout=self.timeout,
            )
        except Exception as exc:  # kombu, py-amqp and socket errors share no base class; all mean "not confirmed"
            self.close()
            raise TemporaryError(_describe(exc, self.exchange)) from None
        if self._returned:
            # basic.return arrives before the confirm, so it has been handled by now.
            self.close()
            raise TemporaryError(f"broker returned the message as unroutable: {self._returned[0]} "
                                 f"(exchange {self.exchange!r}, routing key {self.routing_key!r})")
        where = f"exchange {self.exchange!r}" if self.exchange else "the default exchange"
        return Sent(detail=f"confirmed by the broker ({where}, routing key {self.routing_key!r})")

    def close(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception:  # nosec B110  # a dead connection cannot be closed politely; it is gone either way
                pass


def _describe(exc: BaseException, exchange: str) -> str:
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if name == "MessageNacked":
        text = "broker refused the message (basic.nack)"
    elif name == "NotFound" and exchange:
        text = f"exchange {exchange!r} does not exist ({text})"
    elif isinstance(exc, (socket.timeout, TimeoutError)):
        text = f"no answer from the broker in time ({text or 'timeout'})"
    detail = f"{name}: {text}" if text else name
    return detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS - 3] + "..."
