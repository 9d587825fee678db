"""net:egress VMs: the guest end of the egress port (docs/egress.md).

A net:egress VM has no network interface. Its tasks reach the outside only
through the proxy address (127.0.0.1:3128, given to them as http_proxy and
https_proxy): this relay accepts each TCP connection there and carries it as a
stream over the egress virtio-serial port to the host's EgressProxy, which
reads the HTTP proxy request, checks it against the task's rules and connects,
or answers 403. The relay decides nothing and is no security boundary: root in
the guest may replace it, and still reaches only what the host proxy allows.

Started by the agent (PID 1) at boot when the port exists; it opens the port
and binds the address as root, then runs as nobody, so the task user can
neither signal it nor take its address. Standard library and protocol/channel
only. Threads: one reads the port, one accepts, one per connection reads it.
A connection whose task does not read its data stalls the port for the others
of this VM (documented; the VM's own tasks only).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import zlib

if __package__ in (None, ""):  # run as a script from the ISO: make `protocol` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol.channel import codec
from protocol.channel.egress import (HOST_SENDS, MAX_CHUNK, MAX_STREAMS, PROXY_HOST, PROXY_PORT, StreamClose,
                                     StreamData, StreamEof, StreamOpen)
from protocol.channel.frame import FrameDecoder, FrameEncoder

NOBODY = 65534  # uid and gid (Debian's nobody, nogroup)
# Bringing lo up (nothing else in the guest does): struct ifreq is the name in 16
# bytes, then the flags (short) in the union. Needs CAP_NET_ADMIN, held until the drop.
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
IFREQ_FLAGS = "16sh22x"
NO_HOST_RETRY_S = 0.02  # read() on the port gives EOF at once while no host is connected
FRAME_SLACK = 64  # a StreamData's bytes plus its fields


class Relay:
    def __init__(self, port_fd: int, listener: socket.socket):
        self.fd = port_fd
        self.listener = listener
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32, max_payload=MAX_CHUNK + FRAME_SLACK)
        self.write_lock = threading.Lock()
        self.lock = threading.Lock()
        self.conns: dict[int, socket.socket] = {}
        self.next_stream = 1

    def send(self, message) -> None:
        payload = codec.encode(message)
        with self.write_lock:
            view = memoryview(self.encoder.encode(payload))
            while view:
                view = view[os.write(self.fd, view):]  # blocks while the host does not read

    def serve(self) -> None:
        threading.Thread(target=self.read_port, name="port", daemon=True).start()
        while True:
            conn, _ = self.listener.accept()
            with self.lock:
                if len(self.conns) >= MAX_STREAMS:
                    conn.close()
                    continue
                stream = self.next_stream
                self.next_stream += 1
                self.conns[stream] = conn
            self.send(StreamOpen(stream=stream))
            threading.Thread(target=self.pump, args=(stream, conn), daemon=True).start()

    def forget(self, stream: int) -> socket.socket | None:
        with self.lock:
            return self.conns.pop(stream, None)

    def open(self, stream: int) -> bool:
        with self.lock:
            return stream in self.conns

    def pump(self, stream: int, conn: socket.socket) -> None:
        """The task's bytes to the host, until it stops sending."""
        try:
            while True:
                data = conn.recv(MAX_CHUNK)
                if not self.open(stream):
                    return
                if not data:
                    self.send(StreamEof(stream=stream))
                    return
                self.send(StreamData(stream=stream, data=data))
        except OSError:
            if self.forget(stream) is not None:
                conn.close()
                self.send(StreamClose(stream=stream))

    def read_port(self) -> None:
        try:
            while True:
                data = os.read(self.fd, 1 << 16)
                if not data:
                    time.sleep(NO_HOST_RETRY_S)
                    continue
                for payload in self.decoder.feed(data):
                    self.handle(codec.decode(payload, HOST_SENDS))
        except BaseException as e:  # the host is trusted: a frame it garbled ends the relay
            print(f"corral egress relay: {e!r}", file=sys.stderr)
            os._exit(1)

    def handle(self, message) -> None:
        with self.lock:
            conn = self.conns.get(message.stream)
        if conn is None:
            return  # closed meanwhile: ids are never reused
        try:
            if isinstance(message, StreamData):
                conn.sendall(message.data)  # blocks while the task does not read
            elif isinstance(message, StreamEof):
                conn.shutdown(socket.SHUT_WR)
            elif isinstance(message, StreamClose):
                self.forget(message.stream)
                conn.shutdown(socket.SHUT_RDWR)  # wakes the pump's recv
                conn.close()
        except OSError:
            if self.forget(message.stream) is not None:
                conn.close()
                self.send(StreamClose(stream=message.stream))


def loopback_up() -> None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(IFREQ_FLAGS, b"lo", 0)
        flags = struct.unpack(IFREQ_FLAGS, fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack(IFREQ_FLAGS, b"lo", flags | IFF_UP))


def main(port_path: str) -> None:
    loopback_up()  # the proxy address is on it
    fd = os.open(port_path, os.O_RDWR)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A relay the agent started anew after a restore binds where the old one's
    # connections may linger in TIME_WAIT.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((PROXY_HOST, PROXY_PORT))
    listener.listen(MAX_STREAMS)
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    Relay(fd, listener).serve()


if __name__ == "__main__":
    main(sys.argv[1])
