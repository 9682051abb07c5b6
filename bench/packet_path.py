"""Python's cost per 32 KiB AES-GCM channel-data packet on the bastion's receive and send paths, without
sockets, the kernel or a client: the fast path's own functions on connection and channel objects that hold
just the state they read. Deterministic where the bulk figures of run.py swing ±15 % (2 cores shared with
the client and the targets), so it can show a change of a microsecond per packet.

    .venv/bin/python bench/packet_path.py [--src DIR] [--repeat N] [--size BYTES --per-read N]

--src runs another copy of the code (a directory holding bastion/), as run.py's --bastion-src does.
Receive: reads of 4 sealed packets each go through _recv_data to a session that counts the bytes. Send:
128 KiB channel writes go through SSHChannel.write to sealed packets gathered for one writev. Each is timed
as the best of N repeats and printed next to AES-GCM alone on the same packets; the difference is the
Python (and the copies) per packet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's testbed/ (not tests/)
from testbed import stand_ins  # noqa: E402
from testbed.stand_ins import IV, KEY  # noqa: E402

SIZE = 32768  # the OpenSSH client's channel packet size, and asyncssh's (--size)
PER_READ = 4  # packets per read from the client at bulk rate (strace: 92-138 KB per read) (--per-read)
READS = 40


def main() -> None:
    global SIZE, PER_READ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--size", type=int, default=SIZE, help="channel data per packet (64: figure 7's messages)")
    parser.add_argument("--per-read", type=int, default=PER_READ, help="packets per read, and per channel write")
    args = parser.parse_args()
    SIZE, PER_READ = args.size, args.per_read
    sys.path.insert(0, str(args.src))
    if not _install_fast_path():
        sys.exit("the fast path is not installed (BASTION_FAST_PATH=false, or another asyncssh)")
    count = PER_READ * READS
    receive, aes_open = _receive(args.repeat)
    send, aes_seal = _send(args.repeat)
    for name, total, aes in (("receive", receive, aes_open), ("send", send, aes_seal)):
        print(f"{name:8s} per packet: {total / count * 1e6:5.2f} µs, AES-GCM alone {aes / count * 1e6:5.2f} µs, "
              f"the rest {(total - aes) / count * 1e6:5.2f} µs")


def _install_fast_path() -> bool:
    try:
        from bastion import transport
    except ImportError:  # a --src from before the transport package (issue #19)
        from bastion import asyncssh_fastpath
        return asyncssh_fastpath.apply()
    return transport.install(fast_path=True).fast_path


class _CountingSession:
    takes_views = True

    def __init__(self) -> None:
        self.received = 0

    def data_received(self, data, datatype) -> None:
        self.received += len(data)


def _receive(repeat: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    packets = stand_ins.sealed_packets(PER_READ * READS, os.urandom(SIZE))
    reads = [b"".join(packets[i:i + PER_READ]) for i in range(0, len(packets), PER_READ)]

    def once() -> float:
        session = _CountingSession()
        conn = stand_ins.receiving_connection(SIZE, session)
        start = time.perf_counter()
        for read in reads:  # every read ends on a packet boundary: nothing to carry over
            conn._inpbuf, conn._inpos, conn._inpend = read, 0, len(read)
            conn._recv_data()
        elapsed = time.perf_counter() - start
        assert session.received == SIZE * len(packets), "the packets did not all arrive"
        return elapsed

    counter = int.from_bytes(IV[4:], "big")  # RFC 5647: fixed field, then a counter that moves on per packet
    ivs = [IV[:4] + (counter + i).to_bytes(8, "big") for i in range(len(packets))]
    aead = AESGCM(KEY)

    def aes_alone() -> float:
        start = time.perf_counter()
        for packet, iv in zip(packets, ivs):
            view = memoryview(packet)
            aead.decrypt(iv, view[4:], view[:4])
        return time.perf_counter() - start

    return min(once() for _ in range(repeat)), min(aes_alone() for _ in range(repeat))


def _send(repeat: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    chunk = os.urandom(PER_READ * SIZE)

    def once() -> float:
        chan = stand_ins.sending_channel(SIZE)
        start = time.perf_counter()
        for _ in range(READS):
            chan.write(chunk)
        elapsed = time.perf_counter() - start
        assert chan._conn._send_seq == PER_READ * READS, "the packets were not all sealed"
        return elapsed

    aead, body = AESGCM(KEY), bytes(SIZE + 16)

    def aes_alone() -> float:
        start = time.perf_counter()
        for _ in range(PER_READ * READS):
            aead.encrypt(IV, body, b"head")
        return time.perf_counter() - start

    return min(once() for _ in range(repeat)), min(aes_alone() for _ in range(repeat))


if __name__ == "__main__":
    main()
