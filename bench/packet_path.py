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

SIZE = 32768  # the OpenSSH client's channel packet size, and asyncssh's (--size)
PER_READ = 4  # packets per read from the client at bulk rate (strace: 92-138 KB per read) (--per-read)
READS = 40
KEY, IV = bytes(range(16)), bytes(range(100, 112))
CIPHER = b"aes128-gcm@openssh.com"


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


def _encryption():
    from asyncssh.encryption import get_encryption
    return get_encryption(CIPHER, KEY, IV)


class _CountingSession:
    takes_views = True

    def __init__(self) -> None:
        self.received = 0

    def data_received(self, data, datatype) -> None:
        self.received += len(data)


def _channel(**state):
    from asyncssh.channel import SSHTCPChannel
    chan = object.__new__(SSHTCPChannel)
    chan.__dict__.update(_send_state="open", _encoding=None, **state)
    return chan


def _receiving_connection():
    from asyncssh.connection import SSHServerConnection
    conn = object.__new__(SSHServerConnection)
    conn.__dict__.update(
        _inpbuf=b"", _inpos=0, _inpend=0, _recv_blocksize=16, _recv_macsize=16, _recv_seq=0,
        _recv_encryption=_encryption(), _max_recv_pktlen=SIZE + 1024, _packet=b"", _pktlen=0,
        _auth_complete=True, _decompressor=None, _transport=object(), _auth_final=False, _keepalive_timer=None,
        _set_keepalive_timer=lambda: None)
    conn._recv_handler = conn._recv_pkthdr
    chan = _channel(_recv_state="open", _recv_window=1 << 60, _init_recv_window=1 << 60, _recv_paused=False,
                    _session=_CountingSession())
    conn._channels = {0: chan}
    return conn, chan._session


def _sealed_packets(count: int) -> list[bytes]:
    """What a client sends: channel-data packets to channel 0, sealed (by asyncssh) from sequence number 0 on."""
    sender = _encryption()
    data = os.urandom(SIZE)
    payload = bytes((94,)) + (0).to_bytes(4, "big") + SIZE.to_bytes(4, "big") + data  # MSG_CHANNEL_DATA
    padlen = -(1 + len(payload)) % 16
    padlen += 16 if padlen < 4 else 0
    body = bytes((padlen,)) + payload + bytes(padlen)
    header = len(body).to_bytes(4, "big")
    return [b"".join(sender.encrypt_packet(seq, header, body)) for seq in range(count)]


def _receive(repeat: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    packets = _sealed_packets(PER_READ * READS)
    reads = [b"".join(packets[i:i + PER_READ]) for i in range(0, len(packets), PER_READ)]

    def once() -> float:
        conn, session = _receiving_connection()
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


class _NullTransport:
    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass


def _sending_channel():
    from asyncssh.connection import SSHServerConnection
    conn = object.__new__(SSHServerConnection)
    conn.__dict__.update(
        _send_encryption=_encryption(), _kex_complete=True, _auth_complete=True, _auth_in_progress=False,
        _compressor=None, _compress_after_auth=False, _enc_alg_sc=CIPHER, _enc_alg_cs=CIPHER,
        _rekey_bytes=1 << 60, _rekey_bytes_sent=0, _rekey_seconds=0, _rekey_time=0, _send_seq=0,
        _send_blocksize=16, _send_enchdrlen=1, _transport=_NullTransport(), _bastion_gathers=True,
        _deferred_packets=[], _strict_kex=False)
    return _channel(_conn=conn, _send_buf=[], _send_buf_len=0, _send_window=1 << 60, _send_pktsize=SIZE,
                    _send_chan=0, _send_paused=False, _send_high_water=1 << 60, _write_datatypes=set())


def _send(repeat: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    chunk = os.urandom(PER_READ * SIZE)

    def once() -> float:
        chan = _sending_channel()
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
