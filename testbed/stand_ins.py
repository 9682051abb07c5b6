"""Stand-ins for an asyncssh server connection and channel holding just the state the fast path reads, so its
functions run without a socket: bench/packet_path.py times them, tests/unit/test_asyncssh_fastpath.py checks
them. AES-GCM with a fixed key; channel 0 is open with a window that never runs out."""

from __future__ import annotations

from typing import Any

CIPHER = b"aes128-gcm@openssh.com"
KEY, IV = bytes(range(16)), bytes(range(100, 112))
MSG_CHANNEL_DATA = 94


def encryption():
    from asyncssh.encryption import get_encryption
    return get_encryption(CIPHER, KEY, IV)


def bare_channel(**state: Any):
    from asyncssh.channel import SSHTCPChannel
    chan = object.__new__(SSHTCPChannel)
    chan.__dict__.update(_send_state="open", _encoding=None, **state)
    return chan


def receiving_connection(size: int, session: Any = None):
    """A logged-in server connection with channel 0 open (its session `session`), about to read packets of up to
    `size` bytes of channel data from sequence number 0."""
    from asyncssh.connection import SSHServerConnection
    conn = object.__new__(SSHServerConnection)
    conn.__dict__.update(
        _inpbuf=b"", _inpos=0, _inpend=0, _recv_blocksize=16, _recv_macsize=16, _recv_seq=0,
        _recv_encryption=encryption(), _max_recv_pktlen=size + 1024, _packet=b"", _pktlen=0,
        _auth_complete=True, _decompressor=None, _transport=object(), _auth_final=False, _keepalive_timer=None,
        _set_keepalive_timer=lambda: None)
    conn._recv_handler = conn._recv_pkthdr
    conn._channels = {0: bare_channel(_recv_state="open", _recv_window=1 << 60, _init_recv_window=1 << 60,
                                      _recv_paused=False, _session=session)}
    return conn


def sealed_packets(count: int, data: bytes) -> list[bytes]:
    """What a client sends: `count` channel-data packets of `data` to channel 0, sealed (by asyncssh itself)
    from sequence number 0 on."""
    sender = encryption()
    payload = bytes((MSG_CHANNEL_DATA,)) + (0).to_bytes(4, "big") + len(data).to_bytes(4, "big") + data
    padlen = -(1 + len(payload)) % 16
    padlen += 16 if padlen < 4 else 0
    body = bytes((padlen,)) + payload + bytes(padlen)
    header = len(body).to_bytes(4, "big")
    return [b"".join(sender.encrypt_packet(seq, header, body)) for seq in range(count)]


class NullTransport:
    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass


def sending_channel(size: int):
    """A channel and connection holding just what the send path reads: logged in, AES-GCM, packets of `size`."""
    from asyncssh.connection import SSHServerConnection
    conn = object.__new__(SSHServerConnection)
    conn.__dict__.update(
        _send_encryption=encryption(), _kex_complete=True, _auth_complete=True, _auth_in_progress=False,
        _compressor=None, _compress_after_auth=False, _enc_alg_sc=CIPHER, _enc_alg_cs=CIPHER,
        _rekey_bytes=1 << 60, _rekey_bytes_sent=0, _rekey_seconds=0, _rekey_time=0, _send_seq=0,
        _send_blocksize=16, _send_enchdrlen=1, _transport=NullTransport(), _bastion_gathers=True,
        _deferred_packets=[], _strict_kex=False)
    return bare_channel(_conn=conn, _send_buf=[], _send_buf_len=0, _send_window=1 << 60, _send_pktsize=size,
                        _send_chan=0, _send_paused=False, _send_high_water=1 << 60, _write_datatypes=set())
