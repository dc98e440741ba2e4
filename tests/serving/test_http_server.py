"""The small HTTP/1.1 server of the serving edges: requests come out whole and in order however
the bytes are split, and whatever it refuses is answered by status and closed.

Most tests drive one connection's protocol with a fake transport (no sockets, no waiting);
the limits over real sockets are in test_limits.py, the KServe contract in test_http.py.
"""

import asyncio

import hypothesis.strategies as st
from hypothesis import given, settings

from dmlsys.serving.http import (
    LATER,
    HttpLimits,
    HttpServer,
    Reply,
    Request,
    _Connection,
)


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = self.eof = self.paused = False

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


def echo(request: Request) -> Reply:
    return Reply(200, request.body, "text/plain", {"X-Path": request.path, "X-Method": request.method})


async def echo_later(request: Request) -> Reply:
    await asyncio.sleep(0)
    return echo(request)


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Split what the server wrote into (status, headers, body)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {k.lower(): v for k, _, v in (line.decode().partition(": ") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


def feed(pieces: list[bytes], handler=echo, limits: HttpLimits = HttpLimits()) -> tuple[FakeTransport, HttpServer]:
    async def run():
        server = HttpServer(handler, limits)
        conn = _Connection(server)
        t = FakeTransport()
        conn.connection_made(t)
        for piece in pieces:
            conn.data_received(piece)
            for _ in range(3):
                await asyncio.sleep(0)
        for _ in range(100):  # pipelined answers of a handler that awaits: a few loop turns each
            await asyncio.sleep(0)
        conn.connection_lost(None)
        return t, server

    return asyncio.run(run())


def request(body: bytes, *, chunks: list[int] | None = None, path: str = "/v1/models/m:predict",
            extra: bytes = b"") -> bytes:
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra
    if chunks is None:
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    out, at = [head + b"Transfer-Encoding: chunked\r\n\r\n"], 0
    for n in chunks + [len(body)]:
        piece = body[at:at + n]
        if piece:
            out.append(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        at += len(piece)
    out.append(b"0\r\n\r\n")
    return b"".join(out)


bodies = st.binary(max_size=300)


@st.composite
def streams(draw):
    """Several requests on one connection (Content-Length or chunked), and cut points."""
    reqs = []
    for body in draw(st.lists(bodies, min_size=1, max_size=5)):
        chunked = draw(st.booleans())
        chunks = draw(st.lists(st.integers(1, 64), max_size=6)) if chunked else None
        reqs.append((body, request(body, chunks=chunks, path=f"/p{len(reqs)}")))
    raw = b"".join(r for _, r in reqs)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    pieces = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    return [b for b, _ in reqs], [p for p in pieces if p]


@settings(max_examples=150, deadline=None)
@given(streams(), st.booleans())
def test_requests_come_out_whole_and_in_order_however_the_bytes_are_split(stream, later):
    sent, pieces = stream
    t, server = feed(pieces, echo_later if later else echo)
    got = responses(bytes(t.out))
    assert [b for _, _, b in got] == sent
    assert [h["x-path"] for _, h, _ in got] == [f"/p{i}" for i in range(len(sent))]
    assert all(s == 200 for s, _, _ in got) and not t.closed and server.requests == len(sent)


def test_blanks_around_a_value_are_dropped_in_linear_time():
    import time

    started = time.process_time()
    t, _ = feed([b"GET / HTTP/1.1\r\nX-Path-Of-Blanks: a" + b" \t" * 30_000 + b"b  \r\nY:\r\n\r\n"],
                lambda r: Reply(200, (r.headers["x-path-of-blanks"][:1] + r.headers["x-path-of-blanks"][-1:]
                                      + "|" + r.headers["y"]).encode()))
    assert time.process_time() - started < 0.5  # a quadratic match of the blanks takes seconds
    [(status, _, body)] = responses(bytes(t.out))
    assert status == 200 and body == b"ab|"


def test_a_head_trickling_in_byte_by_byte_is_searched_once():
    """Each arrival searches only its own bytes and the 3 before them for the head's end (the
    buffer's searched part is remembered), and the head split anywhere still parses."""
    raw = request(b"{}", extra=b"X: " + b"y" * 2_000 + b"\r\n")
    head_end = raw.index(b"\r\n\r\n") + 4

    async def run():
        conn = _Connection(HttpServer(echo))
        t = FakeTransport()
        conn.connection_made(t)
        for i in range(len(raw)):
            conn.data_received(raw[i:i + 1])
            if i + 1 < head_end:
                assert conn._seen == len(conn.buf) == i + 1
        return t

    [(status, _, body)] = responses(bytes(asyncio.run(run()).out))
    assert status == 200 and body == b"{}"


def test_query_strings_are_dropped_and_the_path_is_percent_decoded():
    t, _ = feed([b"GET /v1/models/a%2Db?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"])
    [(status, headers, _)] = responses(bytes(t.out))
    assert status == 200 and headers["x-path"] == "/v1/models/a-b" and headers["x-method"] == "GET"


def refused(raw: bytes, limits: HttpLimits = HttpLimits()) -> tuple[int, bytes, FakeTransport]:
    t, server = feed([raw], limits=limits)
    [(status, headers, body)] = responses(bytes(t.out))
    # Closed for writing at once; read (and dropped) for LINGER seconds more, then closed.
    assert headers["connection"] == "close" and t.eof and server.refusals == {status: 1}
    return status, body, t


def test_what_the_server_cannot_trust_is_refused_by_status_and_closed():
    cases = [
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, b"both"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, b"Content-Length"),
        (b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400, b"Content-Length"),
        (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400, b"CRLF"),
        (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 400, b"header field"),
        (b"GET / HTTP/1.1\r\n folded\r\n\r\n", 400, b"header field"),
        (b"GET /a b HTTP/1.1\r\n\r\n", 400, b"request line"),
        (b"GET http://h/ HTTP/1.1\r\n\r\n", 400, b"origin-form"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, b"version"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, b"chunked is"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, b"chunk size"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", 400, b"CRLF"),
    ]
    for raw, status, word in cases:
        got, body, _ = refused(raw)
        assert got == status and word in body, (raw, got, body)


def test_bodies_over_the_limit_get_413_before_they_arrive_and_heads_over_theirs_431():
    limits = HttpLimits(max_body_bytes=100, max_head_bytes=200)
    status, body, t = refused(b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", limits)
    assert status == 413 and b"max_body_bytes" in body and b"100 bytes" in body and t.eof
    status, body, _ = refused(request(b"x" * 101, chunks=[60, 60]), limits)
    assert status == 413 and b"max_body_bytes" in body
    status, _, _ = refused(b"GET / HTTP/1.1\r\nX: " + b"y" * 300, limits)
    assert status == 431
    status, _, _ = refused(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n")
    assert status == 431


def test_connection_close_and_http_1_0_close_after_the_answer():
    for raw in (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n"):
        t, _ = feed([raw, b"GET /never HTTP/1.1\r\n\r\n"])
        [(status, headers, _)] = responses(bytes(t.out))
        assert status == 200 and headers["connection"] == "close" and t.closed
    t, _ = feed([b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"])
    assert not t.closed


def test_expect_100_continue_is_answered_before_the_body():
    t, _ = feed([b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", b"ok"])
    assert bytes(t.out).startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


def test_a_failing_handler_is_a_500_naming_the_error_and_the_connection_lives_on():
    def broken(request):
        raise KeyError("boom")

    async def broken_later(request):
        raise ValueError("later")

    for handler, word in ((broken, b"KeyError"), (broken_later, b"ValueError")):
        t, _ = feed([request(b"{}"), request(b"{}")], handler)
        got = responses(bytes(t.out))
        assert [s for s, _, _ in got] == [500, 500] and word in got[0][2] and not t.closed


def test_reading_pauses_behind_a_slow_request_and_resumes_when_it_is_answered():
    async def run():
        gate = asyncio.Event()

        async def slow(request):
            await gate.wait()
            return echo(request)

        conn = _Connection(HttpServer(slow))
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(request(b"first"))
        conn.data_received(request(b"x" * (300 << 10)))  # pipelined behind it: over PAUSE_AT
        assert t.paused and not t.out
        gate.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not t.paused
        return responses(bytes(t.out))

    got = asyncio.run(run())
    assert [len(b) for _, _, b in got] == [5, 300 << 10]


def test_connections_over_the_cap_and_the_sweep_over_idle_and_slow_ones():
    async def run():
        server = HttpServer(echo, HttpLimits(max_connections=1, idle_timeout=0.2, read_timeout=0.2))
        await server.start("127.0.0.1", 0)
        try:
            idle = await asyncio.open_connection("127.0.0.1", server.port)
            await asyncio.sleep(0.05)
            over = await asyncio.open_connection("127.0.0.1", server.port)
            over[1].write(b"GET / HTTP/1.1\r\n\r\n")
            answer = await asyncio.wait_for(over[0].read(), 2)
            assert answer.startswith(b"HTTP/1.1 503") and b"max_connections=1" in answer
            assert await asyncio.wait_for(idle[0].read(), 2) == b""  # closed by the idle sweep
            slow = await asyncio.open_connection("127.0.0.1", server.port)
            slow[1].write(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            answer = await asyncio.wait_for(slow[0].read(), 2)
            assert answer.startswith(b"HTTP/1.1 408") and b"read_timeout" in answer
            for _, w in (idle, over, slow):
                w.close()
            assert server.refused == 1 and server.refusals == {408: 1}
        finally:
            await server.stop()
        assert not server.connections

    asyncio.run(run())


# -- parsed heads are kept (HttpServer.heads) -------------------------------------------------

field_names = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#", min_size=1, max_size=12)
field_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=20)


@st.composite
def heads(draw):
    """A request with arbitrary token-named fields (some repeated, some blank-padded), sent once
    to warm the cache and again (the same bytes) to hit it."""
    fields = draw(st.lists(st.tuples(field_names, field_values), max_size=6))
    fields = [(k, v) for k, v in fields if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                              "expect")]
    body = draw(st.binary(max_size=40))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    conn = draw(st.sampled_from([b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"]))
    head = (b"POST /p%s?q=1 " % draw(st.sampled_from([b"", b"%2Fx", b"/y"])) + version + b"\r\n"
            + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fields) + conn)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@settings(max_examples=150, deadline=None)
@given(heads())
def test_a_head_parsed_again_from_the_cache_gives_the_same_request(raw):
    seen = []

    def record(request):
        seen.append((request.method, request.path, dict(request.headers), request.body))
        request.headers["x-mutated"] = "by the handler"  # must not reach the next request with this head
        return Reply(200, b"")

    async def run():
        server = HttpServer(record)
        outs = []
        for _ in range(3):  # the first parses and keeps the head, the others find it
            conn = _Connection(server)
            t = FakeTransport()
            conn.connection_made(t)
            conn.data_received(raw)
            conn.connection_lost(None)
            outs.append(bytes(t.out).replace(bytes(t.out)[bytes(t.out).find(b"Date:"):].split(b"\r\n", 1)[0], b""))
        return server, outs

    server, outs = asyncio.run(run())
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]
    assert outs[0] == outs[1] == outs[2]  # same answer, keep-alive or close alike
    assert len(server.heads) == 1


def test_the_head_cache_is_bounded_and_refused_or_chunked_heads_are_not_kept():
    from dmlsys.serving import http

    async def run():
        server = HttpServer(echo)
        for i in range(http.HEAD_CACHE + 10):
            conn = _Connection(server)
            conn.connection_made(FakeTransport())
            conn.data_received(request(b"x", path=f"/p{i}"))
        assert len(server.heads) == http.HEAD_CACHE and next(iter(server.heads)).startswith(b"POST /p10 ")
        server.heads.clear()
        for raw in (request(b"abc", chunks=[1]), b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                    request(b"x", extra=b"X: " + b"y" * http.HEAD_CACHE_BYTES + b"\r\n")):
            conn = _Connection(server)
            conn.connection_made(FakeTransport())
            conn.data_received(raw)
        assert not server.heads

    asyncio.run(run())


# -- handlers that answer later (LATER and request.respond) ------------------------------------


@settings(max_examples=60, deadline=None)
@given(streams(), st.lists(st.sampled_from(["now", "later", "early"]), min_size=5, max_size=5))
def test_a_handler_may_answer_from_a_callback_and_pipelined_requests_stay_in_order(stream, how):
    """``LATER`` then ``request.respond`` from a later turn, or respond before returning LATER:
    answered once each, in order, whatever the split."""
    sent, pieces = stream
    calls = iter(how * 10)

    def handler(request):
        mode = next(calls)
        if mode == "now":
            return echo(request)
        if mode == "early":
            request.respond(echo(request))
            request.respond(Reply(500, b"second answer"))  # ignored: answered already
            return LATER
        asyncio.get_running_loop().call_soon(request.respond, echo(request))
        return LATER

    t, server = feed(pieces, handler)
    got = responses(bytes(t.out))
    assert [b for _, _, b in got] == sent and all(s == 200 for s, _, _ in got) and not t.closed
    assert server.requests == len(sent)


def test_respond_after_the_connection_closed_writes_nothing():
    held = []

    async def run():
        conn = _Connection(HttpServer(lambda r: held.append(r) or LATER))
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(request(b"x"))
        conn.connection_lost(None)
        held[0].respond(Reply(200, b"too late"))
        return t

    assert asyncio.run(run()).out == b""


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["post", "post-other", "chunked", "get"]), min_size=1, max_size=8), bodies)
def test_a_request_after_any_other_on_one_connection_is_read_as_sent(kinds, body):
    """Whole requests one read each (the door's fast path once a head is cached) mixed with
    chunked ones and bodiless GETs: no field of one request leaks into the next."""
    raws = {"post": request(body), "post-other": request(body[:3], path="/other"),
            "chunked": request(body, chunks=[1, 2]), "get": b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n"}
    want = {"post": (b"POST", b"/v1/models/m:predict", body), "post-other": (b"POST", b"/other", body[:3]),
            "chunked": (b"POST", b"/v1/models/m:predict", body), "get": (b"GET", b"/g", b"")}
    sent = [raws[k] for k in kinds * 2]  # twice: the second time every head is cached
    for pieces in (sent, [b"".join(sent)]):  # one read each, or pipelined in one read
        t, _ = feed(pieces)
        answers = responses(bytes(t.out))
        assert [status for status, _, _ in answers] == [200] * len(sent)
        assert [(h["x-method"].encode(), h["x-path"].encode(), b) for _, h, b in answers] == [want[k] for k in kinds * 2]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([200, 400, 404, 413, 502, 503, 599]), st.sampled_from(["application/json", "text/plain"]),
       st.one_of(st.none(), st.dictionaries(st.sampled_from(["X-A", "Retry-After"]), st.text("abc123", max_size=5)),
                 st.sampled_from([b"X-Model-Version: 1\r\n", b"X-Model-Version: 2\r\n"])),
       st.binary(max_size=200), st.booleans())
def test_an_encoded_answer_reads_back_as_its_status_headers_and_body_however_often_it_is_encoded(
        status, content_type, extra, body, close):
    from dmlsys.serving.http import encode_reply

    reply = Reply(status, body, content_type, extra)
    for _ in range(2):  # the second time its head comes from the cache
        [(got_status, headers, got_body)] = responses(encode_reply(reply, close))
        assert (got_status, got_body, headers["content-type"]) == (status, body, content_type)
        assert int(headers["content-length"]) == len(body) and "date" in headers
        assert ("connection" in headers) == close
        want = dict(extra) if isinstance(extra, dict) else (
            {"x-model-version": extra[17:-2].decode()} if extra else {})
        assert {k: v for k, v in headers.items() if k in {w.lower() for w in want}} == {
            k.lower(): v for k, v in want.items()}
