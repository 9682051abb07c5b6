"""No packet inflates beyond the largest packet the connection accepts (a zlib bomb ends the connection).

asyncssh 2.24.1 inflates a zlib@openssh.com packet whole: zlib packs about 1,000:1, so one 190 KiB packet
became 190 MiB and 0.9 s of CPU, with every other connection's traffic waiting behind it on the event
loop. Compression is off unless the operator turns it on (config `compression`, see algorithms.py); when on,
each packet's payload is inflated with zlib's `max_length` set just above the limit, so the work and memory
per packet are bounded, and a packet that would go further is a compression error: asyncssh sends
SSH_DISCONNECT_COMPRESSION_ERROR and closes. Patching the decompressor class covers asyncssh's receive
path and the fast path's copy of it (receive.py), which both call `decompress`.
"""

from __future__ import annotations

import zlib

import asyncssh.connection
from asyncssh import compression
from asyncssh.misc import CompressionError

# asyncssh's limit on a received packet's length (256 KiB; raised only for channels that ask for larger
# packets, which the bastion never does). A channel's data packet is at most 32 KiB.
MAX_PAYLOAD = getattr(asyncssh.connection, "_DEFAULT_RECV_PKTLEN", 256 * 1024)


def decompress(self: compression._ZLibDecompress, data: bytes) -> bytes | None:
    """Inflate one packet's payload, at most MAX_PAYLOAD bytes; None (asyncssh: "Decompression failed")
    for a corrupt stream. Asking for one byte more than the limit tells a full packet from a bomb: zlib
    stops short of `max_length` only when the input is used up."""
    try:
        payload = self._decomp.decompress(data, MAX_PAYLOAD + 1)
    except zlib.error:
        return None
    if len(payload) > MAX_PAYLOAD:
        raise CompressionError(f"Decompressed packet exceeds {MAX_PAYLOAD} bytes")
    return payload


def apply() -> None:
    """Put the bounded `decompress` on asyncssh's zlib decompressor (idempotent)."""
    compression._ZLibDecompress.decompress = decompress  # type: ignore[method-assign]
