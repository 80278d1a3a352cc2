"""What an eavesdropper on the link would see: every TCP payload to or from one port on
loopback, read from an AF_PACKET socket (needs root or CAP_NET_RAW)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from types import TracebackType
from typing import Self

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # loopback shows each packet twice: keep the incoming copy
ETH_HEADER = 14


def can_sniff() -> bool:
    if not hasattr(socket, "AF_PACKET") or os.geteuid() != 0:
        return False
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL)).close()
    except OSError:
        return False
    return True


class LoopbackSniffer:
    """``with LoopbackSniffer(port) as s: ...; s.captured()`` -> the bytes seen (both ways)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._chunks: list[bytes] = []
        self.packets = 0
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(ETH_P_ALL))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="sniffer", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == PACKET_OUTGOING or len(frame) < ETH_HEADER + 20:
                continue
            if frame[12:14] != b"\x08\x00" or frame[ETH_HEADER + 9] != socket.IPPROTO_TCP:
                continue  # IPv4 TCP only: the broker listens on 127.0.0.1
            ihl = (frame[ETH_HEADER] & 0x0F) * 4
            total = struct.unpack_from("!H", frame, ETH_HEADER + 2)[0]
            tcp = ETH_HEADER + ihl
            sport, dport = struct.unpack_from("!HH", frame, tcp)
            if self.port not in (sport, dport):
                continue
            data = frame[tcp + (frame[tcp + 12] >> 4) * 4 : ETH_HEADER + total]
            if data:
                self.packets += 1
                self._chunks.append(data)

    def captured(self) -> bytes:
        return b"".join(self._chunks)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._sock.close()
