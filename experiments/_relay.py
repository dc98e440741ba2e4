"""A transparent TCP relay that delays what it forwards: the chaos suite's 100 ms delay where
the kernel has no ``sch_netem`` (this one has tbf, htb, pfifo and bfifo, none of which holds a
packet for a fixed time; nor ``fq``, which a BPF program stamping departure times would need).

Run inside a network namespace (``ip netns exec NS python experiments/_relay.py PORT DELAY_MS``)
with a NAT rule that sends that namespace's outgoing connections to the other host here::

    iptables -t nat -A OUTPUT -p tcp -d OTHER_HOST -m mark ! --mark 0x64 -j REDIRECT --to-ports PORT

Each accepted connection is relayed to its original destination (``SO_ORIGINAL_DST``) over a
socket marked 0x64 (so the rule lets it through). Every chunk read in either direction is
written ``DELAY_MS`` later, in order, without waiting for the one before it (pipelined, like
netem's delay: the link's rate is kept, the latency added). The delay starts at 0; ``SIGUSR1``
sets it to ``DELAY_MS``, ``SIGUSR2`` back to 0. A chunk is stamped when it is read, so turning
the delay on or off reorders nothing. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import socket
import struct
import sys

SO_ORIGINAL_DST = 80
SO_MARK = 36
MARK = 0x64


class Relay:
    def __init__(self, port: int, delay_ms: float) -> None:
        self.port = port
        self.on_delay = delay_ms / 1000.0
        self.delay = 0.0

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(self, "delay", self.on_delay))
        loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(self, "delay", 0.0))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await asyncio.start_server(self._accept, "0.0.0.0", self.port)
        print(f"relay on :{self.port}, delay {self.on_delay * 1000:g} ms when on", flush=True)
        async with server:
            await stop.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, ip = struct.unpack_from("!H", raw, 2)[0], socket.inet_ntoa(raw[4:8])
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        up.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(up, (ip, port))
        except OSError:
            up.close()
            writer.transport.abort()  # as a refused connection would be: the client sees a reset
            return
        up_reader, up_writer = await asyncio.open_connection(sock=up)
        await asyncio.gather(self._pipe(reader, up_writer, writer), self._pipe(up_reader, writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    back: asyncio.StreamWriter) -> None:
        """``reader`` to ``writer``, each chunk ``delay`` late; ``back``: the writer of
        ``reader``'s connection, reset with the other when either side fails."""
        loop = asyncio.get_running_loop()
        queue: collections.deque = collections.deque()
        ready = asyncio.Event()

        async def send() -> None:
            while True:
                while not queue:
                    ready.clear()
                    await ready.wait()
                due, data = queue.popleft()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    break
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    back.transport.abort()
                    return
            if writer.can_write_eof():
                writer.write_eof()

        sender = loop.create_task(send())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.append((loop.time() + self.delay, data or None))
                ready.set()
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
            writer.transport.abort()  # a reset on one side is a reset on the other


if __name__ == "__main__":
    asyncio.run(Relay(int(sys.argv[1]), float(sys.argv[2])).main())
