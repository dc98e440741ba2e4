"""The ring allreduce's data over a plain TCP connection per neighbour, received in place.

Over ZeroMQ every chunk costs two passes over memory that gloo does not make: libzmq receives
a frame into a buffer of its own, and the ring copies it out into the result (docs/collective.md).
Here rank r keeps one TCP connection to its successor and accepts one from its predecessor, and
the chunks go as raw bytes in the order the ring schedule consumes them, so a chunk is received
straight where it belongs: reduce-scatter chunks into a scratch buffer that is folded into the
result (``ufunc(received, ours, out=result)``) and sent on from there; all-gather chunks straight
into the result, and forwarded from it. Sending and receiving run in two threads (kept between
passes) on blocking
sockets (``recv_into`` with ``MSG_WAITALL`` fills a chunk in one call, ``sendall`` returns once
the kernel holds the bytes), so they overlap each other and the folds; the event loop only
waits for them.

Setting up, and who may connect. The connections are made inside a pass, through the group's
ZeroMQ messages: every stream pass each rank sends its predecessor an *offer* (the port of its
listener, and a random 32-byte token); a rank without a connection to its successor waits for
that offer, connects to the successor's ZeroMQ host at that port and sends the token first. The
listener accepts a connection only with the current token (compared in constant time), then
draws a new one: a token opens one connection. With a cluster key the offers travel encrypted
and authenticated by CURVE, so only a member can learn a token; the data itself is then plain
TCP, not encrypted, which is why ``ProcessGroup`` takes this path with keys only when asked
(``stream=True``), and stays on ZeroMQ otherwise (docs/security.md).

Every pass's bytes start with a header (magic, pass number, a CRC of the pass's signature,
byte count): ranks that disagree, or a stream out of step, fail the pass instead of folding
garbage. Any failure closes both connections of this rank (a half-read stream cannot be
resumed); the next stream pass makes new ones. A failure elsewhere (the group's timeout, a
peer's abort, a lost peer) reaches a pass through its mailbox as on the other paths
(``PassLink.failure``), and closing the sockets wakes the threads.
"""

from __future__ import annotations

import asyncio
import hmac
import queue
import secrets
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from dmlsys.collective import schedule
from dmlsys.collective.errors import CollectiveError

if TYPE_CHECKING:
    from dmlsys.collective.link import PassLink

STEP_OFFER = -1  # the offer's (step, chunk) address in the pass's mailbox: (-1, 0)
TOKEN_BYTES = 32
HEADER = struct.Struct("<4sqIQ")  # magic, pass number, crc32 of the signature, payload bytes
MAGIC = b"DMLR"
# Chunks of at most this many bytes (or the group's chunk_bytes, if smaller): small enough that
# receiving, folding and sending overlap well, large enough that a chunk costs few syscalls.
# (16 MiB, N=2 and N=4, loaded machine: 512 KiB gave the lowest wall-clock time of 512 KiB and
# 2 MiB at the same CPU time.) Socket buffers are left to Linux's autotuning (up to tcp_rmem's
# maximum, 32 MiB here): setting SO_RCVBUF turns it off.
CHUNK_BYTES = 512 << 10
HANDSHAKE_TIMEOUT = 5.0  # seconds a connecting peer has to present its token


class StreamState:
    """A group's listener and its two connections, kept between passes."""

    __slots__ = ("_listener", "bind_host", "executor", "inbound", "outbound", "token")

    def __init__(self, bind_host: str) -> None:
        self.bind_host = bind_host
        self._listener: socket.socket | None = None
        self.token = b""
        self.inbound: socket.socket | None = None  # from our predecessor
        self.outbound: socket.socket | None = None  # to our successor
        # Two threads kept between passes, one receiving and folding, one sending: starting a
        # thread per pass cost about 0.1 ms, which shows at 1 MiB.
        self.executor: ThreadPoolExecutor | None = None

    def listen(self) -> int:
        """The port of our listener, made on first use."""
        if self._listener is None:
            family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((self.bind_host, 0))
                sock.listen(8)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._listener = sock
            self.token = secrets.token_bytes(TOKEN_BYTES)
        return self._listener.getsockname()[1]

    def drop(self) -> None:
        """Close both connections (waking a thread blocked on either)."""
        for sock in (self.inbound, self.outbound):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self.inbound = self.outbound = None

    def close(self) -> None:
        self.drop()
        if self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def accept(self) -> socket.socket:
        """The first connection that presents the current token; every other is closed unheard.
        Connections are vetted side by side, so one that connects and says nothing delays no
        one (it is dropped after ``HANDSHAKE_TIMEOUT``)."""
        loop = asyncio.get_running_loop()
        listener = self._listener
        assert listener is not None
        token = self.token
        won: asyncio.Future = loop.create_future()
        vetting: set[asyncio.Task] = set()

        async def vet(sock: socket.socket) -> None:
            got = bytearray(TOKEN_BYTES)
            view, n = memoryview(got), 0
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    while n < TOKEN_BYTES:
                        k = await loop.sock_recv_into(sock, view[n:])
                        if k == 0:
                            break
                        n += k
            except (OSError, TimeoutError, asyncio.CancelledError):
                n = 0
            if n == TOKEN_BYTES and hmac.compare_digest(bytes(got), token) and not won.done():
                won.set_result(sock)
            else:
                sock.close()  # not our predecessor: nothing it sent is read

        async def accepting() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                task = loop.create_task(vet(sock))
                vetting.add(task)
                task.add_done_callback(vetting.discard)

        acceptor = loop.create_task(accepting())
        try:
            sock = await won
        finally:
            acceptor.cancel()
            for task in list(vetting):
                task.cancel()
        self.token = secrets.token_bytes(TOKEN_BYTES)  # one connection per token
        _tune(sock)
        sock.setblocking(True)
        return sock


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed (or broke) a connection that should carry nothing to us."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True  # EOF, or bytes nobody should send this way: either way, start over
    except BlockingIOError:
        return False
    except OSError:
        return True


def host_of(address: str) -> str:
    """``tcp://HOST:PORT`` -> HOST (brackets of an IPv6 literal removed)."""
    hostport = address[len("tcp://"):]
    host = hostport.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


async def connect(host: str, port: int, token: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _tune(sock)
        sock.setblocking(False)
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, token)
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock


async def allreduce(link: PassLink, state: StreamState, successor_host: str, ufunc, flat: np.ndarray,
                    pred_name: str, succ_name: str, probe_timeout: float) -> np.ndarray:
    """The ring allreduce of ``flat`` over ``state``'s connections; see the module docstring.

    A connection that breaks blames the rank at its other end only if that rank does not
    answer a ping within ``probe_timeout``: when one rank dies, its neighbours' connections
    break, then the connections of every rank that gives up, and only the first are news."""
    n, r = link.size, link.rank
    pred, succ = (r - 1) % n, (r + 1) % n
    loop = asyncio.get_running_loop()
    port = state.listen()
    link.send(pred, STEP_OFFER, 0, None, port=port, token=state.token)
    watch = loop.create_task(link.failure())
    work = loop.create_task(_run(link, state, successor_host, ufunc, flat, pred, succ, pred_name, succ_name))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            try:
                return work.result()  # its error, if it failed
            except StreamBroke as e:
                state.drop()
                # Dead, or alive and closed its end because its pass failed: then its abort (or
                # another rank's, or our deadline) says why, and on a loaded host that may come
                # before the ping's answer, so whichever is first decides.
                ping = loop.create_task(link.alive(e.suspect, probe_timeout))
                try:
                    await asyncio.wait((ping, watch), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ping.cancel()
                if not watch.done() and ping.done() and not ping.result():
                    raise CollectiveError(f"{e} (and it does not answer)", missing=e.missing) from None
                await watch
        state.drop()  # wake the threads; what they were doing is moot now
        await asyncio.gather(work, return_exceptions=True)
        return watch.result()  # raises the pass's failure (it never returns)
    except BaseException:
        state.drop()
        raise
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()


async def _run(link: PassLink, state: StreamState, successor_host: str, ufunc, flat: np.ndarray,
               pred: int, succ: int, pred_name: str, succ_name: str) -> np.ndarray:
    loop = asyncio.get_running_loop()
    if state.outbound is not None and _closed_by_peer(state.outbound):
        state.drop()
    if state.outbound is None:
        offer = await link.recv_message(STEP_OFFER, 0, src=succ)
        port, token = offer.get("port"), offer.get("token")
        if type(port) is not int or not 0 < port < 65536 or type(token) is not bytes or len(token) != TOKEN_BYTES:
            raise CollectiveError(f"{link.who}: malformed stream offer from rank {succ} ({succ_name})")
        try:
            state.outbound = await connect(successor_host, port, token)
        except OSError as e:
            raise CollectiveError(f"{link.who}: cannot connect the data stream to rank {succ} ({succ_name}) at "
                                  f"{successor_host}:{port}: {e}", missing=[succ]) from None
    if state.inbound is None:
        link.waiting_on = pred
        state.inbound = await state.accept()
    out = link.pool.take(flat.size, flat.dtype)
    crc = zlib.crc32(link.sig.encode())
    if state.executor is None:
        state.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{link.who} stream")
    return await loop.run_in_executor(state.executor, _exchange, state.executor, link, state.inbound, state.outbound,
                                      ufunc, flat, out, crc, pred, succ, pred_name, succ_name)


class _Broken(Exception):
    pass


class StreamBroke(CollectiveError):
    """A connection of the pass broke; ``suspect`` is the rank at its other end, who may be dead
    or may have closed it because its own pass failed (then its abort says why)."""

    def __init__(self, message: str, suspect: int) -> None:
        super().__init__(message, missing=[suspect])
        self.suspect = suspect


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    n, total = 0, view.nbytes
    while n < total:
        k = sock.recv_into(view[n:], total - n, socket.MSG_WAITALL)
        if k == 0:
            raise _Broken("closed")
        n += k


def _exchange(executor: ThreadPoolExecutor, link: PassLink, inbound: socket.socket, outbound: socket.socket, ufunc, flat: np.ndarray,
              out: np.ndarray, crc: int, pred: int, succ: int, pred_name: str, succ_name: str) -> np.ndarray:
    """The pass's data, on a worker thread: this thread receives and folds, a second one sends."""
    n, r = link.size, link.rank
    segs = schedule.segments(flat.size, n)
    step = max(1, min(link.chunk_bytes, CHUNK_BYTES) // max(flat.itemsize, 1))
    sends: queue.SimpleQueue = queue.SimpleQueue()
    sent_error: list[BaseException] = []

    def sender() -> None:
        try:
            while (item := sends.get()) is not None:
                outbound.sendall(item)
        except OSError as e:
            sent_error.append(e)
            try:
                inbound.shutdown(socket.SHUT_RDWR)  # the receiving side must not wait on
            except OSError:
                pass

    thread = executor.submit(sender)  # the executor's other thread
    try:
        sends.put(HEADER.pack(MAGIC, link.seq, crc, flat.nbytes))
        sent, _ = schedule.reduce_scatter_step(r, n, 0)
        for a, b in schedule.chunks(*segs[sent], step):
            sends.put(_bytes(flat[a:b]))  # from the caller's buffer: we return only once it has left
        head = bytearray(HEADER.size)
        _recv_exact(inbound, memoryview(head))
        magic, seq, their_crc, nbytes = HEADER.unpack(head)
        if magic != MAGIC or seq != link.seq or their_crc != crc or nbytes != flat.nbytes:
            raise CollectiveError(
                f"{link.who}: the data stream from rank {pred} ({pred_name}) is out of step: pass {seq} "
                f"({nbytes} bytes) where this rank runs pass {link.seq} ({flat.nbytes} bytes); the ranks disagree "
                "on the collective calls, or a stream outlived a failed pass")
        scratch = np.empty(min(step, max(1, flat.size)), flat.dtype)
        for k in range(n - 1):
            _, got = schedule.reduce_scatter_step(r, n, k)
            for a, b in schedule.chunks(*segs[got], step):
                data = scratch[:b - a]
                _recv_exact(inbound, _bytes(data))
                ufunc(data, flat[a:b], out=out[a:b])  # (earlier ranks' partial) op (ours), as the ring
                sends.put(_bytes(out[a:b]))  # forwarded on; at the last step: all-gather step 0
        for j in range(n - 1):
            _, got = schedule.allgather_step(r, n, j)
            for a, b in schedule.chunks(*segs[got], step):
                _recv_exact(inbound, _bytes(out[a:b]))  # in place: the result is where it lands
                if j < n - 2:
                    sends.put(_bytes(out[a:b]))
    except (_Broken, OSError) as e:
        sends.put(None)
        thread.result()
        if sent_error:
            raise StreamBroke(f"{link.who}: the data stream to rank {succ} ({succ_name}) broke: {sent_error[0]}",
                              succ) from None
        raise StreamBroke(f"{link.who}: the data stream from rank {pred} ({pred_name}) broke mid-pass: {e or 'closed'}",
                          pred) from None
    except BaseException:
        sends.put(None)
        thread.result()
        raise
    sends.put(None)
    thread.result()  # every byte we send, the caller's included, is in the kernel now
    if sent_error:
        raise StreamBroke(f"{link.who}: the data stream to rank {succ} ({succ_name}) broke: {sent_error[0]}", succ)
    return out


def _bytes(a: np.ndarray) -> memoryview:
    """The bytes of a contiguous 1-d array, any dtype (complex and bool included)."""
    return memoryview(a.view(np.uint8)) if a.size else memoryview(b"")
