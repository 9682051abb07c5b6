"""The bytes every bulk transfer carries, and the exact end-to-end check of them.

The stream is a fixed random block of PERIOD bytes repeated; PERIOD is prime, so no SSH packet, TCP segment
or read size lines up with it, and a lost, repeated or reordered piece shows up as a mismatch, not only as a
wrong count. Checking is a memcmp against the expected slice (far faster than a hash), so the checker
costs the client and the target almost nothing.
"""

from __future__ import annotations

import random

PERIOD = 1_048_573  # a prime just under 1 MiB
CHUNK = 256 * 1024

_block = random.Random(6).randbytes(PERIOD)
_doubled = memoryview(_block + _block[:CHUNK] + _block[:CHUNK])


def pattern_view(offset: int, size: int) -> memoryview:
    """`size` (<= CHUNK) bytes of the stream starting at `offset`, without copying."""
    start = offset % PERIOD
    return _doubled[start:start + size]


class PatternReader:
    """Feed received pieces in order; `ok` stays True while every byte matched the stream."""

    def __init__(self) -> None:
        self.count = 0
        self.ok = True

    def feed(self, data: bytes | bytearray) -> None:
        """`data` must be bytes or bytearray: comparing a memoryview goes through a slow per-item path,
        bytearray == bytes is one memcmp."""
        size = len(data)
        if size > CHUNK:  # reads are at most CHUNK in practice; split just in case
            for start in range(0, size, CHUNK):
                self.feed(data[start:start + CHUNK])
            return
        if self.ok and bytes(pattern_view(self.count, size)) != data:
            self.ok = False
        self.count += size
