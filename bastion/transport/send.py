# This file adapts functions from asyncssh 2.24.1 (connection.py, channel.py),
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""The fast path's send side: a packet built with one join and sealed with a kept AEAD object, channel data
kept as written, and a channel flush of AES-GCM data sealed in one loop (and, on uvloop, sent in one writev).

What it changes in asyncssh, each justified by the bulk-tunnel profile (bench/README.md):
- No empty SSH_MSG_IGNORE before every packet. It defends CBC ciphers only (it makes the next CBC IV
  unpredictable, RFC 4251 9.3.1); it is still sent when a CBC cipher is in use.
- The plaintext packet is built with one join instead of five concatenations and sealed by aead.py with
  the AESGCM object or ChaCha20 contexts kept per key (keys.py) instead of new ones per packet; random
  padding comes from a pool instead of a getrandom call per packet.
- Channel data is kept as written (bytes are immutable; anything else is copied once) and joined straight
  from the channel's send buffer into the packet (one copy).
- AES-GCM channel data, the bulk of what a tunnel moves, is sealed per channel flush in one loop with the
  sequence number, counter and byte count in locals, instead of the calls and checks of the general path
  per packet; anything else, such as a rekey that is due, stops the loop there.
- On uvloop, a channel flush that sends several packets hands them to the socket in one writev.
- Per-packet debug logging is built only when asyncssh's packet debug level (3) is on.
"""

from __future__ import annotations

import os
import time

from asyncssh.channel import _data_type_names
from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA, MSG_DEBUG, MSG_IGNORE,
                                MSG_KEX_LAST, MSG_NEWKEYS, MSG_SERVICE_ACCEPT, MSG_SERVICE_REQUEST,
                                MSG_USERAUTH_BANNER, MSG_USERAUTH_LAST)
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import CompressionError, ProtocolError
from asyncssh.packet import String, UInt32

from . import keys
from .aead import gcm_nonce, gcm_seal, next_counter


_pad_pool = b""
_pad_pos = 0


def _padding(size: int) -> bytes:
    """Random padding from a pool refilled from os.urandom, instead of a getrandom call per packet."""
    global _pad_pool, _pad_pos
    if _pad_pos + size > len(_pad_pool):
        _pad_pool, _pad_pos = os.urandom(65536), 0
    _pad_pos += size
    return _pad_pool[_pad_pos - size:_pad_pos]


def _fresh_padding_after_fork() -> None:
    global _pad_pool, _pad_pos
    _pad_pool, _pad_pos = b"", 0


os.register_at_fork(after_in_child=_fresh_padding_after_fork)


# ---- sending ---------------------------------------------------------------------------------------------

def _is_cbc(alg: bytes) -> bool:
    # not `b"cbc" in alg`: bytes.__contains__ first tries its operand as an int, and so builds and drops a
    # TypeError with a formatted message on every call (perf: 0.4 % of the server's time per round trip)
    return alg.find(b"cbc") >= 0


def _send_packet(self, pkttype: int, *args: bytes, handler=None) -> None:
    if (self._auth_complete and self._kex_complete and
            (self._rekey_bytes_sent >= self._rekey_bytes or
             (self._rekey_seconds and time.monotonic() >= self._rekey_time))):
        self._send_kexinit()
        self._kexinit_sent = True

    if (((pkttype in {MSG_DEBUG, MSG_SERVICE_REQUEST, MSG_SERVICE_ACCEPT} or
          pkttype > MSG_KEX_LAST) and not self._kex_complete) or
            (pkttype == MSG_USERAUTH_BANNER and
             not (self._auth_in_progress or self._auth_complete)) or
            (pkttype > MSG_USERAUTH_LAST and not self._auth_complete)):
        self._deferred_packets.append((pkttype, args))
        return

    encryption = self._send_encryption
    # asyncssh sends an empty IGNORE before every packet; only CBC needs it (see module docstring)
    if (encryption and pkttype > MSG_KEX_LAST
            and (_is_cbc(self._enc_alg_sc) or _is_cbc(self._enc_alg_cs))):
        self.send_packet(MSG_IGNORE, String(b""))

    if self._compressor and (self._auth_complete or not self._compress_after_auth):
        payload = self._compressor.compress(bytes((pkttype,)) + b"".join(args))
        if payload is None:  # pragma: no cover
            raise CompressionError("Compression failed")
        parts: tuple = (payload,)
        payload_len = len(payload)
    else:
        parts = (bytes((pkttype,)), *args)
        payload_len = 1 + sum(map(len, args))

    blocksize = self._send_blocksize
    padlen = -(self._send_enchdrlen + payload_len) % blocksize
    if padlen < 4:
        padlen += blocksize
    body = b"".join((bytes((padlen,)), *parts, _padding(padlen)))
    pktlen = len(body)
    header = pktlen.to_bytes(4, "big")
    seq = self._send_seq

    if not encryption:
        sealed = header + body
    elif type(encryption) is GCMEncryption:
        cipher = encryption._cipher
        key, fixed, counter = keys.gcm(cipher)
        sealed = header + gcm_seal(key, gcm_nonce(fixed, counter), header, body)
        keys.gcm_done(cipher, fixed, next_counter(counter))
    elif type(encryption) is ChachaEncryption:
        sealed = keys.chacha(encryption._cipher).seal(seq, header, body)
    else:
        packet, mac = encryption.encrypt_packet(seq, header, body)
        sealed = packet + mac
    cork = self._bastion_cork
    if cork is not None:
        cork.append(sealed)
    elif self._transport:  # as asyncssh's _send
        try:
            self._transport.write(sealed)
        except ConnectionError:  # pragma: no cover
            pass

    if self._send_seq == 0xffffffff and not encryption:
        self._send_seq = 0
        raise ProtocolError("Sequence rollover before kex complete")

    if pkttype == MSG_NEWKEYS and self._strict_kex:
        self._send_seq = 0
    else:
        self._send_seq = (seq + 1) & 0xffffffff

    if self._kex_complete:
        self._rekey_bytes_sent += pktlen

    if SSHLogger._debug_level >= 3:
        (handler or self).log_sent_packet(pkttype, seq, bytes((pkttype,)) + b"".join(args))


def _channel_send_packet(self, pkttype: int, *args: bytes) -> None:
    if self._send_chan is None:  # pragma: no cover
        return
    assert self._conn is not None
    self._conn.send_packet(pkttype, UInt32(self._send_chan), *args, handler=self)


def _channel_write(self, data, datatype=None) -> None:
    if self._send_state != "open":
        raise BrokenPipeError("Channel not open for sending")

    if datatype is not None and datatype not in self._write_datatypes:
        raise OSError("Invalid extended data type")

    if not data:
        return

    if self._encoding:
        assert self._encoder is not None
        encoded_data = self._encoder.encode(data)
    else:
        encoded_data = data

    if SSHLogger._debug_level >= 2:
        self.logger.debug2("Sending %d data byte%s%s", len(encoded_data), "s" if len(encoded_data) > 1 else "",
                           f" to {_data_type_names[datatype]}" if datatype else "")

    # asyncssh copies every write into a bytearray; immutable bytes need no copy, a view of them will do
    if type(encoded_data) is not bytes:
        encoded_data = bytes(encoded_data)
    self._send_buf.append((memoryview(encoded_data), datatype))
    self._send_buf_len += len(encoded_data)
    conn = self._conn
    if (datatype is None and len(self._send_buf) == 1 and self._send_buf_len <= self._send_window
            and self._send_buf_len <= self._send_pktsize and not self._send_paused
            and self._send_chan is not None and conn is not None and conn._bastion_cork is None
            and _seals_gcm_data(conn)):
        # one packet on a channel with nothing queued (a reply, a keystroke): sealed here, without the general
        # flush's three calls, which cost ~5 µs of the server's CPU per 64-byte round trip on this VM, where
        # each wake-up starts with cold caches (A/B, figure 7's echo: 49 → 44 µs of user time)
        _flush_gcm_data(self, self._send_chan.to_bytes(4, "big"))
        if not self._send_buf:  # else the rekey byte limit stopped it: the general path sends KEXINIT first
            return
    self._flush_send_buf()


def _flush_send_buf(self) -> None:
    """Send what the window allows; several packets' worth goes to the socket in one writev (see _gathers)."""
    conn = self._conn
    if (conn is None or conn._bastion_cork is not None or self._send_buf_len <= self._send_pktsize
            or self._send_window <= self._send_pktsize or not _gathers(conn)):
        _flush_packets(self)
        return
    conn._bastion_cork = cork = []
    try:
        _flush_packets(self)
    finally:
        conn._bastion_cork = None
        if cork and conn._transport:
            try:
                conn._transport.writelines(cork)
            except ConnectionError:  # pragma: no cover (as asyncssh's _send)
                pass


def _gathers(conn) -> bool:
    """Whether the connection's transport writes a list of buffers with one writev, without joining them.

    uvloop's does. (asyncio's joins them on Python 3.11: a copy of every packet, which costs more than the
    system calls it saves.)"""
    gathers = conn.__dict__.get("_bastion_gathers")
    if gathers is None:
        gathers = conn._bastion_gathers = type(conn._transport).__module__ == "uvloop.loop"
    return gathers


def _drop(*args, **kwargs) -> None:  # pragma: no cover
    pass


def _flush_packets(self) -> None:
    """As asyncssh's _flush_send_buf, with send-buffer entries that are read-only views, consumed by slicing."""
    send_buf = self._send_buf
    if send_buf and self._send_window:
        if self._send_chan is None:  # pragma: no cover (as SSHChannel.send_packet: nothing goes out)
            send_packet, recipient = _drop, b""
        else:  # what SSHChannel.send_packet calls, with the channel number
            send_packet, recipient = self._conn.send_packet, UInt32(self._send_chan)
    while send_buf and self._send_window:
        if send_buf[0][1] is None and recipient and _seals_gcm_data(self._conn):
            _flush_gcm_data(self, recipient)  # as the loop below, for as many packets as need nothing else
            if not (send_buf and self._send_window):
                break
        pktsize = min(self._send_window, self._send_pktsize)
        buf, datatype = send_buf[0]
        datalen = min(len(buf), pktsize)

        # the data goes as a view of the send buffer: send_packet's one join is the only copy
        if datatype is None:
            send_packet(MSG_CHANNEL_DATA, recipient, datalen.to_bytes(4, "big"), buf[:datalen], handler=self)
        else:
            send_packet(MSG_CHANNEL_EXTENDED_DATA, recipient, UInt32(datatype), UInt32(datalen), buf[:datalen],
                        handler=self)

        if datalen == len(buf):
            del send_buf[0]
        else:
            send_buf[0] = (buf[datalen:], datatype)
        self._send_buf_len -= datalen
        self._send_window -= datalen

    if self._send_paused or self._send_buf_len > self._send_high_water:
        self._pause_resume_writing()

    if not self._send_buf:
        if self._send_state == "eof_pending":
            self.send_packet(MSG_CHANNEL_EOF)
            self._send_state = "eof"
        elif self._send_state == "close_pending":
            self._close_send()


def _seals_gcm_data(conn) -> bool:
    """Whether a channel-data packet would, in _send_packet, only be sealed with AES-GCM and sent: keys in
    place, logged in, no compression, no CBC anywhere (no IGNORE), no packet logging, no rekey due by time."""
    return (type(conn._send_encryption) is GCMEncryption and conn._kex_complete and conn._auth_complete
            and not conn._compressor and SSHLogger._debug_level < 3
            and not _is_cbc(conn._enc_alg_sc) and not _is_cbc(conn._enc_alg_cs)
            and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time))


def _flush_gcm_data(self, recipient: bytes) -> None:
    """Send channel data from the front of the send buffer as _flush_packets and _send_packet would, in one
    loop with the sequence number, GCM counter and byte count in locals (a flush moves up to a window of 32 KiB
    packets; the calls and checks per packet cost about what sealing one does). Stops before extended data,
    when the window or buffer runs out, or when the rekey byte limit is reached (the general path sends
    KEXINIT then)."""
    conn = self._conn
    cipher = conn._send_encryption._cipher
    key, fixed, counter = keys.gcm(cipher)  # the kept AESGCM object, the next packet's counter (set when done)
    blocksize, enchdrlen = conn._send_blocksize, conn._send_enchdrlen
    cork, transport = conn._bastion_cork, conn._transport
    sent, limit, seq = conn._rekey_bytes_sent, conn._rekey_bytes, conn._send_seq
    send_buf = self._send_buf
    lead = bytes((MSG_CHANNEL_DATA,)) + recipient
    try:
        while send_buf and self._send_window and sent < limit:
            buf, datatype = send_buf[0]
            if datatype is not None:
                break
            datalen = min(len(buf), self._send_window, self._send_pktsize)
            padlen = -(enchdrlen + 9 + datalen) % blocksize
            if padlen < 4:
                padlen += blocksize
            body = b"".join((bytes((padlen,)), lead, datalen.to_bytes(4, "big"), buf[:datalen],
                             _padding(padlen)))
            header = len(body).to_bytes(4, "big")
            sealed = gcm_seal(key, gcm_nonce(fixed, counter), header, body)
            counter = next_counter(counter)
            seq = (seq + 1) & 0xffffffff
            sent += len(body)
            if cork is not None:
                # length and ciphertext as two pieces of the one writev: joining them copied every packet
                # again (perf, target→client: 5 % of the server's time in that copy)
                cork += (header, sealed)
            elif transport:
                try:
                    transport.write(header + sealed)
                except ConnectionError:  # pragma: no cover (as asyncssh's _send)
                    pass
            if datalen == len(buf):
                del send_buf[0]
            else:
                send_buf[0] = (buf[datalen:], None)
            self._send_buf_len -= datalen
            self._send_window -= datalen
    finally:
        keys.gcm_done(cipher, fixed, counter)
        conn._send_seq, conn._rekey_bytes_sent = seq, sent
