"""A small HTTP/1.1 server for the two serving edges: the gateway's front door and a replica's own listener.

Why not aiohttp's: the front door is the one process every request crosses, and aiohttp's
request machinery (request and response objects, the router, the payload stream, a task and
a writer per request) cost ~60 µs of the gateway's ~170 µs of CPU per prediction in a profile
under wrk. This server is one ``asyncio.Protocol`` per connection that parses a request head
with a few ``bytes`` operations, hands ``Request(method, path, headers, body)`` to one handler,
and writes its ``Reply`` with one ``write``: what the door needs and no more.

What it speaks (RFC 9112, strictly; anything else is refused with a status, never guessed at):

- request line ``METHOD SP origin-form SP HTTP/1.1`` (or ``HTTP/1.0``); the query is dropped;
- header fields ``name: value``, names as tokens, CRLF line ends only (a bare CR or LF is 400),
  no line folding; at most ``max_head_bytes`` of head (431);
- a body by ``Content-Length`` or ``Transfer-Encoding: chunked`` (both at once is 400: the
  ambiguity request smuggling lives on; any other coding is 501); ``Expect: 100-continue`` is
  answered before the body is read;
- keep-alive by default on HTTP/1.1, ``Connection: close`` honoured; pipelined requests are
  answered in order, one at a time.

**Limits**, each answered by name (see ``HttpLimits``): a body over ``max_body_bytes`` gets 413
as soon as that is known (its ``Content-Length``, or the chunks so far), a body still arriving
``read_timeout`` seconds after its head gets 408, a connection without a whole request head
for ``idle_timeout`` seconds (idle keep-alive, or a head trickling in) is closed, and past
``max_connections`` open connections a new one is answered 503 and closed. One sweep every
quarter of the shorter timeout checks the clocks: no timer per request.

An error the server answers itself closes the connection afterwards (what the client sent
next cannot be trusted to start a request), after reading for a moment longer what the client
is still sending, so that the answer is read rather than lost to a reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from email.utils import formatdate
from typing import Any, Callable, Coroutine
from urllib.parse import unquote

import orjson

log = logging.getLogger(__name__)

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TCHAR = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
# A head (decoded as latin-1, one CRLF appended): request line, then fields; values hold no
# CR, LF or NUL, the target no space or control character.
_HEAD_RE = re.compile(rf"({_TCHAR}+) (/[^\x00-\x20\x7f]*) HTTP/1\.([01])\r\n((?:{_TCHAR}+:[^\x00\r\n]*\r\n)*)")
# A value is runs of non-blanks separated by blanks, so that the blanks around it are matched
# in linear time (a lazy ``(.*?)[ \t]*\r\n`` is quadratic in a run of blanks: 4 s of CPU for a
# 60 KB one).
_FIELD_RE = re.compile(rf"({_TCHAR}+):[ \t]*((?:[^\x00\r\n \t]+(?:[ \t]+[^\x00\r\n \t]+)*)?)[ \t]*\r\n")
_REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported"}
TICKS = 4  # sweeps per (shorter) timeout
LINGER = 2.0  # seconds an answered error keeps reading (and dropping) what the client still sends
PAUSE_AT = 256 << 10  # bytes buffered behind a request in progress before reading pauses
# Parsed heads kept per server, by their exact bytes: a client sends the same head again and
# again (its library's fields, the same Content-Length for same-sized bodies), and a cached one
# skips the two regular expressions (~5 of ~7 µs). Bounded: HEAD_CACHE heads of at most
# HEAD_CACHE_BYTES each (256 KiB in all); heads that were refused, or chunked, are never kept.
HEAD_CACHE = 256
HEAD_CACHE_BYTES = 1024


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 4 << 20  # over it: 413
    read_timeout: float = 10.0  # seconds for a body to arrive once its head has; else 408
    idle_timeout: float = 15.0  # seconds a connection may go without a whole request head; then closed
    max_connections: int = 1024  # open at once; one more is answered 503 and closed
    max_head_bytes: int = 64 << 10  # request line and headers; over it: 431
    max_headers: int = 100  # header fields; over it: 431

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "read_timeout", "idle_timeout", "max_connections", "max_head_bytes",
                     "max_headers"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HttpLimits.{name} must be positive, got {getattr(self, name)!r}")


class Request:
    """One request: ``method`` and ``path`` as ``str`` (the path percent-decoded, no query),
    ``headers`` with lower-case ``str`` names (a repeated field: its values joined by ", "),
    and the whole ``body`` as ``bytes``; ``remote``: the client's address (None when unknown).

    A handler that returned ``LATER`` answers with ``respond(reply)``, exactly once."""

    __slots__ = ("method", "path", "headers", "body", "remote", "_conn")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes,
                 remote: str | None = None, conn: _Connection | None = None) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.remote = remote
        self._conn = conn

    def respond(self, reply: Reply) -> None:
        """Answer this request (its handler returned ``LATER``). A second call, or one after
        the connection closed, does nothing: the client is gone or already answered."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn._early is _DISPATCHING:  # answered before the handler returned: _dispatch writes it
                conn._early = reply
            else:
                conn._answer(reply)


class Reply:
    """An answer: ``status``, ``body`` bytes, its content type, and extra ``headers``: a dict, or
    header lines already encoded (``b"Name: value\\r\\n"`` each), which the hot path caches."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json",
                 headers: dict[str, str] | bytes | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


def json_reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps(doc), headers=headers)


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, orjson.dumps({"error": message}), headers=headers)


class _Later:
    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


# What a handler returns when it will answer with ``request.respond(reply)``: the door's hot path
# (a predict whose replica had a free slot) answers from a callback, with no future or task.
LATER = _Later()

Handler = Callable[[Request], "Reply | _Later | asyncio.Future | Coroutine[Any, Any, Reply]"]


_time = time.time  # one global lookup on the answer path, not a module attribute


class _Date:
    """The ``Date`` header (RFC 9110 asks an origin server with a clock for one), formatted once a second."""

    __slots__ = ("until", "line")

    def __init__(self) -> None:
        self.until = 0.0  # time.time() at which ``line`` goes stale (the next whole second)
        self.line = b""

    def get(self) -> bytes:
        now = _time()
        if now >= self.until:
            second = int(now)
            self.until = second + 1.0
            self.line = b"Date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
            _HEADS.clear()  # they hold the old line
        return self.line


_DATE = _Date()

# An answer's head up to its Content-Length value, by (status, content type, extra header lines
# when they are bytes): built once a second (it holds the Date line), not once per answer.
_HEADS: dict[tuple, bytes] = {}
# The end of a head by the body's length: ``b"1234\r\n\r\n"``. Bodies of an endpoint come in a
# few lengths, and the bytes %-formatting is a fifth of the encoding.
_LENGTHS: dict[int, bytes] = {}
_LENGTHS_MAX = 4096


def encode_reply(reply: Reply, close: bool) -> bytes:
    date = _DATE.get()  # first: a new second clears _HEADS
    extra = reply.headers
    if extra is None or type(extra) is bytes:  # bytes: header lines encoded already (CRLF after each)
        key = (reply.status, reply.content_type, extra)
        head = _HEADS.get(key)
        if head is None:
            if len(_HEADS) >= 1024:  # statuses and versions come in a few kinds; bounded all the same
                _HEADS.clear()
            head = _HEADS[key] = _head(reply, date, extra or b"")
    else:  # a dict: encoded each time (error answers, the replica's own door)
        head = _head(reply, date, "".join([f"{k}: {v}\r\n" for k, v in extra.items()]).encode("latin-1"))
    body = reply.body
    n = len(body)
    if close:
        return b"%s%d\r\nConnection: close\r\n\r\n%s" % (head, n, body)
    end = _LENGTHS.get(n)
    if end is None:
        if len(_LENGTHS) >= _LENGTHS_MAX:
            _LENGTHS.clear()
        end = _LENGTHS[n] = b"%d\r\n\r\n" % n
    return head + end + body  # two concatenations: a third cheaper than one join or one %


def _head(reply: Reply, date: bytes, lines: bytes) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%sContent-Length: " % (
        reply.status, _REASONS.get(reply.status, "Unknown").encode(), reply.content_type.encode(), date, lines)


class _Refused(Exception):
    """The request cannot be served as sent: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Connection states.
_HEAD, _BODY, _BUSY, _LINGER, _CLOSED = range(5)
_DISPATCHING = object()  # _Connection._early while its handler runs


class HttpServer:
    """Serves ``handler`` on ``host:port`` within ``limits``. ``start()`` binds (``port`` 0 picks
    one: see ``port``), ``stop()`` closes the listener and every connection.

    ``handler(request)`` returns a ``Reply``, a future of one, or a coroutine that returns one
    (run as a task); an exception any of them raises is answered 500 naming it. ``name`` goes into log lines and errors.
    """

    def __init__(self, handler: Handler, limits: HttpLimits = HttpLimits(), *, name: str = "http") -> None:
        self.handler = handler
        self.limits = limits
        self.name = name
        self.connections: set[_Connection] = set()
        self.refused = 0  # connections answered 503 for max_connections
        self.refusals: dict[int, int] = {}  # status -> requests the server answered itself (408, 413, 400 ...)
        self.requests = 0
        self.heads: dict[bytes, tuple] = {}  # head bytes -> (method, path, headers, keep_alive, length)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tick = 0  # sweeps so far: the clock connections stamp their states with
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None
        self._refusal = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
        body = orjson.dumps({"error": f"{name} is at its limit of open connections "
                                      f"(max_connections={limits.max_connections}); retry after 1s"})
        self._refusal %= (len(body), body)

    async def start(self, host: str, port: int, *, ssl=None, backlog: int = 1024, reuse_port: bool = False) -> None:
        """``reuse_port``: SO_REUSEPORT, for several processes sharing one door (a gateway group)."""
        self.loop = loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, backlog=backlog, reuse_address=True,
                                                reuse_port=reuse_port or None, ssl=ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep())

    def _protocol(self) -> asyncio.Protocol:
        if len(self.connections) >= self.limits.max_connections:
            self.refused += 1
            return _Refuse(self._refusal)
        return _Connection(self)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _sweep(self) -> None:
        # Connections stamp the tick their state began (``since``), not the time: reading the
        # loop's clock for every request costs more than this whole sweep. A state that began
        # in tick t is older than its timeout by tick t + TICKS + 1: it is closed between its
        # timeout and 1.25 x its timeout.
        limits = self.limits
        period = min(limits.read_timeout, limits.idle_timeout) / TICKS
        idle = int(limits.idle_timeout / period + 1e-9) + 1
        read = int(limits.read_timeout / period + 1e-9) + 1
        while True:
            await asyncio.sleep(period)
            self.tick = tick = self.tick + 1
            for conn in list(self.connections):
                if conn.state == _HEAD and tick - conn.since >= idle:
                    conn.close()  # idle keep-alive, or a head trickling in: no answer is owed
                elif conn.state == _BODY and tick - conn.since >= read:
                    conn.refuse(408, f"body not received within {limits.read_timeout:g}s (read_timeout)")


class _Refuse(asyncio.Protocol):
    """Answers one connection over the cap with 503 and closes it. It waits for the client's
    first bytes (or 1 s), so that the answer is read rather than lost to a reset."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(1.0, self._answer_and_close)

    def data_received(self, data: bytes) -> None:
        self._answer_and_close()

    def _answer_and_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(self._answer)
            t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "state", "since", "buf", "paused", "_method", "_path", "_headers",
                 "_keep_alive", "_length", "_chunked", "_body", "_chunk_left", "_linger", "_seen", "remote", "_early")

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.state = _HEAD
        self.since = server.tick  # the sweep tick the current state began (a head awaited, a body awaited)
        self.buf = bytearray()
        self.paused = False
        self._linger: asyncio.TimerHandle | None = None
        self._seen = 0  # bytes at the buffer's start already searched for a head's end
        self._early = None  # _DISPATCHING while the handler runs; a reply it gave early, by respond()
        self._reset()

    def _reset(self) -> None:
        self._method = self._path = ""
        self._headers: dict[str, str] = {}
        self._keep_alive = True
        self._length = 0  # Content-Length, or the bytes of a chunked body so far
        self._chunked = False
        self._body: bytearray | None = None  # a chunked body as it is decoded
        self._chunk_left = -1  # bytes left of the current chunk's data and its CRLF; -1: a size line is next

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None  # who the event gate keys anonymous clients by
        server = self.server
        if server.loop is None:  # a connection made without start() (tests drive the protocol directly)
            server.loop = asyncio.get_running_loop()
        self.since = server.tick
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        self.transport = None
        self.server.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _LINGER or state == _CLOSED:
            return  # dropped: an error was answered and the connection is closing
        buf = self.buf
        if state == _HEAD and not buf:
            # The common case, first: one whole request in one read, its head seen before (a
            # client repeats its head), so none of _advance's bookkeeping is needed.
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                parsed = self.server.heads.get(data[:end])
                if parsed is not None and len(data) - end - 4 == parsed[4]:
                    self._method, self._path, headers, self._keep_alive, self._length = parsed
                    self._headers = headers.copy()  # the handler's own: the cached one stays as parsed
                    self._dispatch(data[end + 4:])
                    return
        if state == _BUSY:
            buf += data  # the next request, pipelined: parsed once this one is answered
            if len(buf) > PAUSE_AT and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return
        if buf:
            buf += data
            data = buf
        try:
            self._advance(data)
        except _Refused as e:
            self.refuse(e.status, str(e))

    # -- parsing --------------------------------------------------------------------------

    def _advance(self, data: bytes | bytearray) -> None:
        """Parse what ``data`` holds (the buffer, or a fresh read when nothing was buffered);
        keep the rest in ``self.buf``. Raises _Refused."""
        pos = 0
        limits = self.server.limits
        while True:
            if self.state == _HEAD:
                # A head trickling in a byte at a time is searched once, not once per byte.
                end = data.find(b"\r\n\r\n", pos if pos else max(0, self._seen - 3))
                if end < 0:
                    if len(data) - pos > limits.max_head_bytes:
                        raise _Refused(431, f"request head over {limits.max_head_bytes} bytes")
                    self._seen = len(data) - pos
                    break
                self._seen = 0
                if end - pos > limits.max_head_bytes:
                    raise _Refused(431, f"request head over {limits.max_head_bytes} bytes")
                head = bytes(data[pos:end])
                parsed = self.server.heads.get(head)
                if parsed is None:
                    self._head(head)
                else:  # this very head was parsed before: its outcome cannot differ
                    self._method, self._path, headers, self._keep_alive, self._length = parsed
                    self._headers = headers.copy()  # the handler's own: the cached one stays as parsed
                pos = end + 4
                self.state = _BODY
                self.since = self.server.tick
                if self._headers.get("expect", "").lower() == "100-continue" and pos == len(data) and (
                        self._chunked or self._length):
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if self.state == _BODY:
                if self._chunked:
                    pos = self._chunks(data, pos)
                    if pos < 0:
                        return  # _chunks kept what it still needs
                    body = bytes(self._body)
                else:
                    if len(data) - pos < self._length:
                        break
                    body = bytes(data[pos:pos + self._length])
                    pos += self._length
                self._dispatch(body)
                if self.state != _HEAD:  # answered later (or closing): the rest waits in the buffer
                    break
                continue
            break
        if pos == 0 and data is self.buf:
            return
        if pos >= len(data):  # all of it consumed: the common case, one whole request per read
            if self.buf:
                self.buf = bytearray()
            return
        rest = data[pos:]
        self.buf = rest if type(rest) is bytearray else bytearray(rest)

    def _head(self, head: bytes) -> None:
        # One regular expression checks the whole head (the C engine, not a Python loop per
        # byte or field: this is the door's hottest code); only a head it refuses is looked at
        # again, by _malformed, to say what is wrong with it.
        self._reset()
        m = _HEAD_RE.fullmatch(head.decode("latin-1") + "\r\n")
        if m is None:
            self._malformed(head)
        method, target, minor, block = m.groups()
        fields = _FIELD_RE.findall(block)
        if len(fields) > self.server.limits.max_headers:
            raise _Refused(431, f"more than {self.server.limits.max_headers} header fields")
        if minor == "0":
            self._keep_alive = False
        path = target.split("?", 1)[0]
        self._method = method
        self._path = unquote(path) if "%" in path else path
        self._headers = headers = {k.lower(): v for k, v in fields}
        if len(headers) != len(fields):  # a field repeated: values joined, Content-Lengths must agree
            headers.clear()
            for k, v in fields:
                k = k.lower()
                if k not in headers:
                    headers[k] = v
                elif k != "content-length":
                    headers[k] = headers[k] + ", " + v
                elif headers[k] != v:
                    raise _Refused(400, "two different Content-Length fields")
        connection = headers.get("connection")
        if connection is not None:
            tokens = {t.strip().lower() for t in connection.split(",")}
            if "close" in tokens:
                self._keep_alive = False
            elif "keep-alive" in tokens and minor == "0":
                self._keep_alive = True
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        limit = self.server.limits.max_body_bytes
        if coding is not None:
            if length is not None:
                raise _Refused(400, "both Transfer-Encoding and Content-Length: send one")
            if coding.lower() != "chunked" or minor == "0":
                raise _Refused(501, f"Transfer-Encoding {coding[:40]!r} is not supported (chunked is)")
            self._chunked = True
            self._body = bytearray()
        elif length is not None:
            if not length.isdigit() or len(length) > 18:
                raise _Refused(400, f"malformed Content-Length {length[:40]!r}")
            self._length = int(length)
            if self._length > limit:
                raise _Refused(413, f"body of {self._length} bytes is over the limit of {limit} bytes "
                                    "(max_body_bytes): send fewer instances per request")
        if not self._chunked and len(head) <= HEAD_CACHE_BYTES:
            heads = self.server.heads
            if len(heads) >= HEAD_CACHE:
                del heads[next(iter(heads))]  # the oldest: clients come and go, their heads with them
            heads[head] = (self._method, self._path, headers.copy(), self._keep_alive, self._length)

    def _malformed(self, head: bytes) -> None:
        """Raise the _Refused that says what is wrong with a head ``_HEAD_RE`` refused."""
        crlf = head.count(b"\r\n")
        if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\0" in head:
            raise _Refused(400, "bare CR or LF, or a NUL, in the request head: lines end with CRLF")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Refused(400, f"malformed request line {lines[0][:100]!r}")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505 if version.startswith(b"HTTP/") else 400, f"unsupported version {version[:20]!r}")
        if not method or not _TOKEN.issuperset(method):
            raise _Refused(400, f"malformed method {method[:20]!r}")
        if not target.startswith(b"/"):
            raise _Refused(400, "the request target must be a path (origin-form)")
        for line in lines[1:]:
            name, colon, _ = line.partition(b":")
            if not colon or not name or not _TOKEN.issuperset(name):
                raise _Refused(400, f"malformed header field {line[:100]!r}")
        raise _Refused(400, f"malformed request head {head[:100]!r}")

    def _chunks(self, data: bytes | bytearray, pos: int) -> int:
        """Decode chunks from ``data[pos:]`` into ``self._body``: the position after the last
        chunk and its trailers, or -1 when more is needed (what was decoded is consumed)."""
        body, limit = self._body, self.server.limits.max_body_bytes
        while True:
            if self._chunk_left < 0:
                start = pos
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if len(data) - pos > 1024:
                        raise _Refused(400, "chunk size line over 1024 bytes")
                    self._keep(data, pos)
                    return -1
                size = bytes(data[pos:eol]).split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                    raise _Refused(400, f"malformed chunk size {size[:20]!r}")
                n = int(size, 16)
                pos = eol + 2
                if n == 0:  # the last chunk: trailers (ignored) end with an empty line
                    if data[pos:pos + 2] == b"\r\n":
                        return pos + 2
                    end = data.find(b"\r\n\r\n", pos)
                    if end < 0:
                        if len(data) - pos > self.server.limits.max_head_bytes:
                            raise _Refused(431, "chunked trailers too long")
                        self._keep(data, start)  # parsed again, from the last chunk, when more comes
                        return -1
                    return end + 4
                if len(body) + n > limit:
                    raise _Refused(413, f"chunked body over the limit of {limit} bytes (max_body_bytes): "
                                        "send fewer instances per request")
                self._chunk_left = n + 2
            take = min(self._chunk_left - 2, len(data) - pos)
            if take > 0:
                body += data[pos:pos + take]
                pos += take
                self._chunk_left -= take
            if self._chunk_left > 2 or len(data) - pos < 2:
                self._keep(data, pos)
                return -1
            if data[pos:pos + 2] != b"\r\n":
                raise _Refused(400, "chunk data not followed by CRLF")
            pos += 2
            self._chunk_left = -1

    def _keep(self, data: bytes | bytearray, pos: int) -> None:
        """Only ``data[pos:]`` is still needed: drop the rest from the buffer."""
        rest = data[pos:]
        self.buf = rest if type(rest) is bytearray else bytearray(rest)

    # -- answering ------------------------------------------------------------------------

    def _dispatch(self, body: bytes) -> None:
        server = self.server
        server.requests += 1
        request = Request(self._method, self._path, self._headers, body, self.remote, self)
        self.state = _BUSY
        self._early = _DISPATCHING
        try:
            result = server.handler(request)
        except Exception as e:
            log.exception("%s: handler failed on %s %s", server.name, request.method, request.path)
            result = error_reply(500, f"{type(e).__name__}: {e}")
        early, self._early = self._early, None
        if result is LATER:
            if early is _DISPATCHING:
                return  # request.respond answers it, from a callback
            result = early  # it responded before returning: answered here, so _advance goes on parsing
        request._conn = None  # answered here: a stray respond() must not answer the next request
        if type(result) is Reply:
            self._answer(result, parse_on=False)  # the caller (_advance) goes on parsing
        elif isinstance(result, asyncio.Future):
            result.add_done_callback(self._answered)
        else:
            server.loop.create_task(result).add_done_callback(self._answered)

    def _answered(self, task: asyncio.Future) -> None:
        if task.cancelled():
            self.close()
            return
        e = task.exception()
        if e is not None:
            log.error("%s: handler failed: %s: %s", self.server.name, type(e).__name__, e)
            self._answer(error_reply(500, f"{type(e).__name__}: {e}"))
        else:
            self._answer(task.result())

    def _answer(self, reply: Reply, parse_on: bool = True) -> None:
        transport = self.transport
        if transport is None or self.state == _CLOSED:
            return
        keep = self._keep_alive
        transport.write(encode_reply(reply, not keep))
        if not keep:
            self.state = _LINGER
            transport.close()
            return
        if self._chunked:  # a cached head sets every other field of the next request; _head all of them
            self._chunked, self._body = False, None
        self.state = _HEAD
        self.since = self.server.tick
        if self.paused:
            self.paused = False
            transport.resume_reading()
        if parse_on and self.buf:  # a pipelined request is waiting
            try:
                self._advance(self.buf)
            except _Refused as e:
                self.refuse(e.status, str(e))

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` naming ``message``, then close, reading and dropping for a moment
        what the client still sends."""
        transport = self.transport
        if transport is None or self.state in (_LINGER, _CLOSED):
            return
        transport.write(encode_reply(error_reply(status, message), True))
        refusals = self.server.refusals
        refusals[status] = refusals.get(status, 0) + 1
        self.state = _LINGER
        self.buf = bytearray()
        if self.paused:
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()  # the client sees our answer end; we still read what it sends
        self._linger = asyncio.get_running_loop().call_later(LINGER, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.state = _CLOSED
