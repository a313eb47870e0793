"""An encoder process: hashes and encodes chunks for a repository target (see
:mod:`~blockbackup.repository.encoders`). Run as ``python -m``, with one end of a
``SOCK_SEQPACKET`` pair as the descriptor ``BB_ENCODER_FD`` names; it exits when the
other end closes.

Messages (one datagram each, little-endian):

- first, from the parent: the master key (empty: not encrypted), with the shared memory's
  file descriptor attached;
- ``H`` + (offset, length) u32 pairs: the chunks at those places of the input half; the
  reply is their addresses, 32 bytes each (all zero: a zero chunk);
- ``E`` + u32 indexes into the last ``H``: encode those chunks into the output half, one
  after another; the reply is (offset, length) u32 pairs, one per index.
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import sys

from blockbackup.repository import blob
from blockbackup.repository.keys import ZERO_ADDRESS, Keys

_PAIR = struct.Struct("<II")
MAX_MESSAGE = 1 << 16


def serve(sock: socket.socket) -> None:
    master, fds, _flags, _addr = socket.recv_fds(sock, 64, 1)
    if len(fds) != 1:
        return
    shm = mmap.mmap(fds[0], 0)
    os.close(fds[0])
    half = len(shm) // 2
    view = memoryview(shm)
    keys = Keys(master or None)
    zeroes = bytes(1 << 20)
    places: list[tuple[int, int]] = []
    addresses: list[bytes] = []
    while True:
        message = sock.recv(MAX_MESSAGE)
        if not message:
            return  # the parent closed its end (or died)
        kind, body = message[:1], memoryview(message)[1:]
        if kind == b"H":
            places = list(_PAIR.iter_unpack(body))
            addresses = []
            for start, length in places:
                piece = view[start : start + length]
                if piece[0] == 0 and zeroes.startswith(piece):
                    addresses.append(ZERO_ADDRESS)
                else:
                    addresses.append(keys.address(piece))
            sock.send(b"".join(addresses))
        elif kind == b"E":
            out = []
            pos = half
            for (n,) in struct.iter_unpack("<I", body):
                start, length = places[n]
                piece = view[start : start + length]
                stored = blob.encode(keys, piece, addresses[n])
                end = pos + len(stored)
                if end > len(shm):
                    raise RuntimeError("encoded chunks overflow the output half")
                view[pos:end] = stored
                out.append(_PAIR.pack(pos, len(stored)))
                pos = end
            sock.send(b"".join(out))
        else:
            raise RuntimeError(f"unknown message {kind!r}")


def main() -> None:
    # The parent handles Ctrl-C (this process is in a group of its own, so a terminal's
    # SIGINT does not reach it) and closes its end; a lost parent closes it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(os.environ["BB_ENCODER_FD"])
    with socket.socket(fileno=fd) as sock:
        try:
            serve(sock)
        except (ConnectionError, BrokenPipeError):
            pass


if __name__ == "__main__":
    main()
    sys.exit(0)
