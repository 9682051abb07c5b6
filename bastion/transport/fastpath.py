# This file adapts functions from asyncssh 2.24.1 (connection.py, channel.py),
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""Fewer copies and less Python work per SSH packet on asyncssh's byte path (issue #6).

A tunnel moves 32 KiB channel-data packets; the bulk-tunnel profile put most of the server's time into
per-packet Python work, not AES. What this module changes, each justified by that profile:

- No empty SSH_MSG_IGNORE before every packet. It defends CBC ciphers only (it makes the next CBC IV
  unpredictable, RFC 4251 9.3.1); it is still sent when a CBC cipher is in use.
- Sending builds the plaintext packet with one join instead of five concatenations, seals AES-GCM with one
  reused AESGCM object instead of a new one per packet and ChaCha20-Poly1305 with two ChaCha20 contexts per
  key, moved to each packet's nonce, instead of three new ones per packet (each costs about 8 µs to set
  up), and takes random padding from a pool instead of a getrandom call per packet.
- On uvloop, a channel flush that sends several packets hands them to the socket in one writev.
- Receiving parses packets at an offset into the read buffer instead of re-slicing the whole buffer after
  every packet (quadratic in the read size), and decrypts AES-GCM and ChaCha20-Poly1305 straight from it.
  After login, a server connection's socket reads into that buffer itself (receive_in_place) instead of
  handing over a new bytes object per read for asyncssh to append.
- Channel data is kept as written (bytes are immutable; anything else is copied once), joined straight from
  the channel's send buffer into the packet (one copy). On receipt it goes to the channel after the checks
  `_process_data` makes, without building a packet object, and straight to the session while no window
  adjust is due (as a view, for sessions that take views). after_read lets a session act once per read.
- AES-GCM channel data, the bulk of what a tunnel moves, is sealed (per channel flush) and opened (per read)
  in one loop each, with the sequence number, IV and counters in locals, instead of the calls and checks
  of the general path per packet; anything else, such as a rekey that is due, stops the loop there.
- Per-packet debug logging is built only when asyncssh's packet debug level (3) is on.
- The keepalive timer is not cancelled and re-created on every read: a read notes the time, and the timer,
  when it fires, re-arms itself for the rest of the interval if anything arrived meanwhile.

The wire format is unchanged; everything else (kex, rekeying, deferral, strict kex, compression, other
ciphers) follows asyncssh's code. The replaced functions are pinned by a digest of their source: if the
installed asyncssh differs, nothing is patched and asyncssh runs as shipped (with a warning).
Off with `fast_path = false` in config.toml (BASTION_FAST_PATH=false), e.g. for comparison runs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import mmap
import os
import struct
import time
from typing import Callable

from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_FIRST,
                                MSG_CHANNEL_LAST, MSG_DEBUG, MSG_IGNORE, MSG_KEX_FIRST, MSG_KEX_LAST, MSG_NEWKEYS,
                                MSG_SERVICE_ACCEPT, MSG_SERVICE_REQUEST, MSG_UNIMPLEMENTED, MSG_USERAUTH_BANNER,
                                MSG_USERAUTH_FIRST, MSG_USERAUTH_LAST)
from asyncssh.channel import SSHChannel, _data_type_names
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import CompressionError, DisconnectError, MACError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket, String, UInt32
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

log = logging.getLogger("bastion.tuning")

# sha256 (first 16 hex digits) of the source of each asyncssh function replaced here or relied on, as in
# asyncssh 2.24.1 (the version this was written and measured against).
VERIFIED_VERSIONS = ("2.24.1",)
_EXPECTED_SOURCE = {
    "connection.SSHConnection.send_packet": "fb9da7bec6dd395a",
    "connection.SSHConnection.data_received": "b2d14a83b2604db6",
    "connection.SSHConnection._recv_version": "05573b0ac8886bf3",
    "connection.SSHConnection._recv_data": "fc4e0735191bb0fd",
    "connection.SSHConnection._recv_pkthdr": "7adc4d88fe20593c",
    "connection.SSHConnection._recv_packet": "b3daa22e9763eee9",
    "connection.SSHConnection._finish_recv_packet": "e12d96db58b3524e",
    "connection.SSHConnection._reset_keepalive_timer": "7a9157707c514524",
    "connection.SSHConnection._set_keepalive_timer": "23a054202a1cb32b",
    "connection.SSHConnection._cancel_keepalive_timer": "d812058ddd18253c",
    "connection.SSHConnection._keepalive_timer_callback": "6d8aa6656cfc6003",
    "channel.SSHChannel.send_packet": "00e81b763c8f3dd2",
    "channel.SSHChannel._flush_send_buf": "3f11e9dc27c58b18",
    "channel.SSHChannel.write": "1045e20008469933",
    "channel.SSHChannel._process_data": "342490795c4b893c",
    "channel.SSHChannel._accept_data": "33121e9e185c9850",
    "channel.SSHChannel._deliver_data": "bd94ccbaa59ab510",
    "packet.SSHPacketHandler.process_packet": "490a59d971d0ce03",
    "crypto.cipher.GCMCipher.encrypt_and_sign": "adb87dbdb4f9039a",
    "crypto.cipher.GCMCipher.verify_and_decrypt": "c09eb5b36d0f6a92",
    "crypto.cipher.GCMCipher._update_iv": "bce250a8d9dc82b6",
    "encryption.GCMEncryption.decrypt_packet": "6feb840baa1102a4",
    "encryption.GCMEncryption.decrypt_header": "50d9112c6d6c1ced",
    "connection.SSHConnection._send": "c6698a37eb80f574",
    "channel.SSHChannel._pause_resume_writing": "b05e507ca9fdeec9",
    "crypto.chacha.ChachaCipher.encrypt_and_sign": "f9b87e5614981c32",
    "crypto.chacha.ChachaCipher.verify_and_decrypt": "0ab7b7420976f2f6",
    "crypto.chacha.ChachaCipher.decrypt_header": "44feda66527a87d0",
    "encryption.ChachaEncryption.encrypt_packet": "e9faafa35d664508",
    "encryption.ChachaEncryption.decrypt_packet": "6b65743ce728dfd4",
}

_POLY_TAG = 16
_RESETTABLE = hasattr(Cipher(ChaCha20(bytes(32), bytes(16)), mode=None).encryptor(), "reset_nonce")
_ZERO_BLOCK = bytes(64)  # one ChaCha20 block: its first 32 bytes of keystream are the Poly1305 key
_COUNTER_0 = bytes(8)


def source_digests() -> dict[str, str]:
    """Digest of each function this module replaces, as installed (used to pin the versions checked)."""
    digests = {}
    for dotted in _EXPECTED_SOURCE:
        module_name, class_name, func_name = dotted.rsplit(".", 2)
        module = __import__(f"asyncssh.{module_name}", fromlist=[class_name])
        func = getattr(getattr(module, class_name), func_name)
        func = getattr(func, "_bastion_original", func)
        try:
            source = inspect.getsource(func)
        except (OSError, TypeError):
            source = ""
        digests[dotted] = hashlib.sha256(source.encode()).hexdigest()[:16]
    return digests


def changed_functions() -> list[str]:
    """The replaced or relied-on asyncssh functions whose installed source differs from the pinned one."""
    return [name for name, digest in source_digests().items() if digest != _EXPECTED_SOURCE[name]]


def apply() -> bool:
    """Install the fast path once; returns whether it is active (see `bastion.transport.install`)."""
    import asyncssh
    from asyncssh import channel, connection

    if getattr(connection.SSHConnection.send_packet, "_bastion_original", None):
        return True
    changed = changed_functions()
    if changed:
        log.warning("asyncssh %s differs from the version the fast path was written for (%s); "
                    "running asyncssh as shipped", asyncssh.__version__, ", ".join(changed))
        return False
    _patch(connection.SSHConnection, "send_packet", _send_packet)
    _patch(connection.SSHConnection, "data_received", _data_received)
    _patch(connection.SSHConnection, "_recv_version", _recv_version)
    _patch(connection.SSHConnection, "_recv_data", _recv_data)
    _patch(connection.SSHConnection, "_recv_pkthdr", _recv_pkthdr)
    _patch(connection.SSHConnection, "_recv_packet", _recv_packet)
    connection.SSHConnection._inpos = 0  # read offset into _inpbuf; an instance attribute once set
    connection.SSHConnection._inpend = 0  # end of what has arrived in _inpbuf (see receive_in_place)
    connection.SSHConnection._inpview = None  # a view of _inpbuf while it is an in-place receive buffer
    connection.SSHConnection._bastion_bytes_only = False  # no in-place buffer could be had (see get_buffer)
    _patch(connection.SSHConnection, "_reset_keepalive_timer", _reset_keepalive_timer)
    _patch(connection.SSHConnection, "_keepalive_timer_callback", _keepalive_timer_callback)
    connection.SSHConnection._keepalive_seen = 0.0  # loop time of the last read while the timer runs
    connection.SSHConnection._bastion_cork = None  # a list while a channel flush gathers its packets
    connection.SSHConnection._bastion_read_done = None  # a list while a read is processed (see after_read)
    _patch(channel.SSHChannel, "send_packet", _channel_send_packet)
    _patch(channel.SSHChannel, "_flush_send_buf", _flush_send_buf)
    _patch(channel.SSHChannel, "write", _channel_write)
    return True


def _patch(cls: type, name: str, replacement: Callable) -> None:
    original = getattr(cls, name)
    functools.update_wrapper(replacement, original, assigned=("__doc__",), updated=())
    replacement._bastion_original = original  # type: ignore[attr-defined]
    setattr(cls, name, replacement)


# ---- AES-GCM straight from and into the connection's buffers ---------------------------------------------

_U64 = 0xFFFFFFFFFFFFFFFF


def _gcm_next(cipher):
    """The AESGCM object kept for the cipher's key (asyncssh builds a new one for every packet) and this
    packet's IV; the cipher's IV moves on to the next packet's, as GCMCipher._update_iv does."""
    aead = cipher.__dict__.get("_bastion_aead")
    if aead is None:
        aead = cipher._bastion_aead = AESGCM(cipher._key)
    iv = cipher._iv
    cipher._iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _U64).to_bytes(8, "big")
    return aead, iv


def _gcm_seal(cipher, header: bytes, body: bytes) -> bytes:
    """header + AES-GCM(body) + tag."""
    aead, iv = _gcm_next(cipher)
    return header + aead.encrypt(iv, body, header)


def _gcm_open(cipher, header: memoryview, sealed: memoryview) -> bytes | None:
    aead, iv = _gcm_next(cipher)
    try:
        return aead.decrypt(iv, sealed, header)
    except InvalidTag:
        return None


# ---- chacha20-poly1305@openssh.com with one keystream per packet and no copies --------------------------
#
# asyncssh builds three ChaCha20 ciphers per packet (header, Poly1305 key, data). The Poly1305 key is block 0
# of the data key's keystream and the data starts at block 1, so one cipher serves both.

def _stream(cipher, slot: str, key: bytes, seq: int):
    """A ChaCha20 keystream for `key` at block 0 of nonce `seq`.

    Setting up a ChaCha20 context costs about 8 µs, more than encrypting 16 KiB; one context per key is kept
    in `slot` on the cipher and moved to each packet's nonce with reset_nonce (about 1.5 µs; cryptography
    >= 43, else a new context each time)."""
    nonce = _COUNTER_0 + seq.to_bytes(8, "big")
    stream = cipher.__dict__.get(slot)
    if stream is None:
        stream = Cipher(ChaCha20(key, nonce), mode=None).encryptor()
        if _RESETTABLE:
            setattr(cipher, slot, stream)
    else:
        stream.reset_nonce(nonce)
    return stream


def _chacha_header(cipher, seq: int, header) -> bytes:
    """The packet length, encrypted or decrypted (the same XOR) with the header key."""
    return _stream(cipher, "_bastion_header_stream", cipher._adkey, seq).update(header)


def _chacha_seal(cipher, seq: int, header: bytes, body: bytes) -> bytearray:
    size = 4 + len(body)
    out = bytearray(size + _POLY_TAG)
    view = memoryview(out)
    view[:4] = _chacha_header(cipher, seq, header)
    stream = _stream(cipher, "_bastion_stream", cipher._key, seq)
    poly_key = stream.update(_ZERO_BLOCK)[:32]
    stream.update_into(body, view[4:size])
    view[size:] = Poly1305.generate_tag(poly_key, view[:size])
    return out


def _chacha_open(cipher, seq: int, sealed: memoryview, tag: memoryview) -> bytes | None:
    """`sealed` is the encrypted length and packet; verify the tag over it, then decrypt the packet."""
    stream = _stream(cipher, "_bastion_stream", cipher._key, seq)
    poly_key = stream.update(_ZERO_BLOCK)[:32]
    try:
        Poly1305.verify_tag(poly_key, sealed, bytes(tag))
    except InvalidSignature:
        return None
    return stream.update(sealed[4:])


# ---- padding ---------------------------------------------------------------------------------------------

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
        sealed = _gcm_seal(encryption._cipher, header, body)
    elif type(encryption) is ChachaEncryption:
        sealed = _chacha_seal(encryption._cipher, seq, header, body)
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
    loop with the packet counter, IV and byte count in locals (a flush moves up to a window of 32 KiB
    packets; the calls and checks per packet cost about what sealing one does). Stops before extended data,
    when the window or buffer runs out, or when the rekey byte limit is reached (the general path sends
    KEXINIT then)."""
    conn = self._conn
    cipher = conn._send_encryption._cipher
    aead, iv = _gcm_next(cipher)  # the kept AESGCM object and the next packet's IV (set again when done)
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
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
            sealed = aead.encrypt(fixed + counter.to_bytes(8, "big"), body, header)
            counter = (counter + 1) & _U64
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
        cipher._iv = fixed + counter.to_bytes(8, "big")
        conn._send_seq, conn._rekey_bytes_sent = seq, sent


# ---- keepalive ------------------------------------------------------------------------------------------

def _reset_keepalive_timer(self) -> None:
    if self._auth_complete:
        if self._keepalive_timer:
            self._keepalive_seen = self._loop.time()
        else:
            self._set_keepalive_timer()


def _keepalive_timer_callback(self) -> None:
    seen, self._keepalive_seen = self._keepalive_seen, 0.0
    if seen:
        remaining = seen + self._keepalive_interval - self._loop.time()
        if remaining > 0:  # the peer spoke since the timer was set: silence has lasted less than the interval
            self._keepalive_timer = self._loop.call_later(remaining, self._keepalive_timer_callback)
            return
    _keepalive_timer_callback._bastion_original(self)


# ---- receiving -------------------------------------------------------------------------------------------
#
# _inpbuf holds what has arrived; _inpos is where parsing stands. The buffer is cut once per read, not once
# per packet. While a packet's header has been read but not its body, the header block stays in the buffer
# just before _inpos, so an AES-GCM packet can be decrypted from one contiguous view of the buffer.

def _data_received(self, data, datatype=None) -> None:
    room = None if type(self._inpbuf) is bytes else _room(self, len(data))  # (see receive_in_place)
    if room is None:
        self._inpbuf += data  # _recv_data takes its new length
    else:
        room[:len(data)] = data
        self._inpend += len(data)
    self._recv_data()


def _recv_version(self) -> bool:
    try:
        return _recv_version._bastion_original(self)  # slices _inpbuf itself, from 0
    finally:
        self._inpend = len(self._inpbuf)


def _recv_data(self) -> None:
    if type(self._inpbuf) is bytes:  # whoever appended to it (a wrapper of asyncssh's data_received, say)
        self._inpend = len(self._inpbuf)
    self._reset_keepalive_timer()
    outer = self._bastion_read_done
    done = self._bastion_read_done = outer if outer is not None else []

    try:
        while self._inpend > self._inpos and self._recv_handler():
            pass
    except DisconnectError as exc:
        self._send_disconnect(exc.code, exc.reason, exc.lang)
        self._force_close(exc)
    except Exception:
        self.internal_error()
    finally:
        start = self._inpos
        if self._recv_handler == self._recv_packet:
            start -= self._recv_blocksize  # keep the header block (see above)
        if start > 0 and type(self._inpbuf) is bytes:  # an in-place buffer is compacted by _room instead
            self._inpbuf = self._inpbuf[start:]
            self._inpos -= start
            self._inpend -= start
        if outer is None:
            self._bastion_read_done = None
            for callback in done:
                callback()


def after_read(conn) -> list[Callable[[], None]] | None:
    """While `conn` processes what one read brought and more of it is left to parse, the list of callables to
    run once it is done (for example, a relay's write of what several channel-data packets carried, as one
    write); None outside a read, or when the packet being handled is the last one the read brought."""
    done = getattr(conn, "_bastion_read_done", None)
    return done if done is not None and conn._inpend > conn._inpos else None


_CLOSING = frozenset({"close_pending", "closed"})


def _delivers_directly(chan) -> bool:
    """Whether `chan` takes asyncssh's own _accept_data and _deliver_data, with no encoding and not closing:
    then, while no window adjust is due and reading is not paused, those two only hand the data on."""
    if chan._send_state in _CLOSING or chan._encoding:
        return False
    plain = chan.__dict__.get("_bastion_plain")
    if plain is None:
        cls = type(chan)
        plain = chan._bastion_plain = (cls._accept_data is SSHChannel._accept_data
                                       and cls._deliver_data is SSHChannel._deliver_data)
    return plain


# ---- reading straight into the receive buffer -------------------------------------------------------------
#
# A transport hands a plain protocol each read as a new bytes object, which asyncssh then appends to its
# buffer: two copies of every byte before decryption. A server connection's socket instead reads into an
# anonymous mapping owned by the connection (asyncio.BufferedProtocol; pages are touched only as they are
# used, so an idle session keeps one or two). What has been parsed is dropped by moving the rest to the front
# when room runs out, and reads start at the front again whenever everything has been parsed.

_RECV_ROOM = 256 * 1024  # the most one read brings (uvloop's own read buffer is this size as well)
# Until the user is authenticated, reads still go to the connection's data_received as bytes: asyncssh parses
# the version line from a bytes buffer, quickack.py arms its quick ACKs there, and a connection that never
# logs in costs no receive buffer. They pass through this (one read at a time, whichever connection).
_login_scratch = memoryview(bytearray(64 * 1024))


def receive_in_place(conn) -> bool:
    """Have `conn`'s socket read into the connection's buffer from now on; False if the fast path is off."""
    from asyncssh import connection
    transport = conn._transport
    if connection.SSHConnection._recv_data is not _recv_data or transport is None:
        return False
    transport.set_protocol(_InPlaceReader(conn))
    return True


class _InPlaceReader(asyncio.BufferedProtocol):
    """The socket's protocol for one SSH connection; everything but reading is passed on to the connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn) -> None:
        self._conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self._conn
        # the handshake goes through data_received (see _login_scratch), and so does everything on a
        # connection that could not have a buffer of its own; the first read after login maps one (_room)
        if type(conn._inpbuf) is bytes and (not conn._auth_complete or conn._bastion_bytes_only):
            return _login_scratch
        room = _room(conn, _RECV_ROOM)
        return _login_scratch if room is None else room

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        if type(conn._inpbuf) is bytes:
            conn.data_received(bytes(_login_scratch[:nbytes]))
        else:
            conn._inpend += nbytes
            conn._recv_data()

    def eof_received(self):
        return self._conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        conn.connection_lost(exc)
        conn._inpview = None

    def pause_writing(self) -> None:
        self._conn.pause_writing()

    def resume_writing(self) -> None:
        self._conn.resume_writing()


def _room(conn, size: int) -> memoryview | None:
    """A writable view of `size` bytes after what has arrived, moving what is not parsed yet to the front
    first when everything has been parsed or the room left is smaller, mapping a larger buffer if it must
    (or the first one, when `_inpbuf` is still asyncssh's bytes). None if no buffer could be mapped: the
    connection is back on a bytes buffer for good."""
    buf = conn._inpbuf
    end = conn._inpend
    keep = conn._inpos
    if conn._recv_handler == conn._recv_packet:
        keep -= conn._recv_blocksize  # the header block stays just before _inpos (see above)
    if keep == end or len(buf) - end < size:
        pending = end - keep
        if pending + size > len(buf):
            try:
                grown = mmap.mmap(-1, max(2 * _RECV_ROOM, 1 << (pending + size - 1).bit_length()))
            except OSError:  # out of memory or of mappings (vm.max_map_count)
                conn._inpbuf, conn._inpview, conn._bastion_bytes_only = buf[keep:end], None, True
                conn._inpos -= keep
                conn._inpend = pending
                return None
            grown[:pending] = buf[keep:end]
            conn._inpbuf = buf = grown
            conn._inpview = memoryview(grown)
        elif pending:
            buf.move(0, keep, pending)
        conn._inpos -= keep
        conn._inpend = end = pending
    return conn._inpview[end:end + size]


def _data_channel(conn, packet_data: bytes, payload_end: int):
    """The channel a decrypted channel-data packet goes to, if SSHChannel._process_data would take it as it
    is (open channel, exact length, within the window); None for asyncssh's general path and its errors."""
    chan = conn._channels.get(int.from_bytes(packet_data[2:6], "big"))
    if (chan is not None and chan._recv_state == "open"
            and 10 + int.from_bytes(packet_data[6:10], "big") == payload_end
            and payload_end - 10 <= chan._recv_window):
        return chan
    return None


def _hand_on(chan, packet_data: bytes, payload_end: int) -> None:
    """Give `chan` the data of a channel-data packet that _data_channel accepted."""
    session = chan._session
    if getattr(session, "takes_views", False):  # a view of the decrypted packet: no copy
        data = memoryview(packet_data)[10:payload_end]
    else:
        data = packet_data[10:payload_end]
    window = chan._recv_window - (payload_end - 10)
    if (window >= chan._init_recv_window / 2 and payload_end > 10 and not chan._recv_paused
            and session is not None and _delivers_directly(chan)):
        # as _accept_data and _deliver_data do for such a channel when no window adjust is due
        chan._recv_window = window
        session.data_received(data, None)
    else:
        chan._accept_data(data)


_LENGTH = struct.Struct(">I").unpack_from
_DATA_HEAD = struct.Struct(">BBII").unpack_from  # padding length, message type, recipient channel, data length
_GCM_IV = struct.Struct(">4sQ").pack  # fixed field, invocation counter (RFC 5647)


def _recv_gcm_data(self) -> None:
    """Parse, open and hand on AES-GCM channel-data packets in one loop, with the read position, sequence
    number and IV in locals, as _recv_pkthdr and _recv_packet would one call each (a read brings several
    32 KiB packets; the calls and checks per packet cost about what opening one does). Stops at the first
    packet that is incomplete or anything but channel data _data_channel takes, and leaves it, with the IV
    for it, to them (they raise the errors). A packet for a session that takes views, with no window adjust
    due, goes to it from here, as _hand_on would send it (one call fewer per packet)."""
    cipher = self._recv_encryption._cipher
    aead, iv = _gcm_next(cipher)  # the kept AESGCM object and the next packet's IV (set again when done)
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
    buf = self._inpbuf
    view = memoryview(buf)
    pos, seq, limit = self._inpos, self._recv_seq, self._max_recv_pktlen
    channels = self._channels
    relay = session = None  # the last channel found to take views of packets, and its session
    try:
        while self._inpend - pos >= 4 and self._inpbuf is buf:
            pktlen, = _LENGTH(buf, pos)
            end = pos + 4 + pktlen + _POLY_TAG
            if pktlen > limit or end > self._inpend or pktlen < 10:
                break
            try:
                packet_data = aead.decrypt(_GCM_IV(fixed, counter), view[pos + 4:end], view[pos:pos + 4])
            except InvalidTag:
                break
            padlen, pkttype, recipient, datalen = _DATA_HEAD(packet_data)
            payload_end = pktlen - padlen
            # as _data_channel: open channel, exact length, within the window
            if pkttype != MSG_CHANNEL_DATA or 10 + datalen != payload_end:
                break
            chan = channels.get(recipient)
            if chan is None or chan._recv_state != "open" or datalen > chan._recv_window:
                break
            counter = (counter + 1) & _U64
            pos = self._inpos = end
            if self._transport:  # as _finish_recv_packet
                seq = self._recv_seq = (seq + 1) & 0xffffffff
            self._auth_final = True  # as _finish_recv_packet, for any packet after authentication
            window = chan._recv_window - datalen
            if chan is not relay:  # what does not change while a channel is open: checked once per read
                session = chan._session
                relay = chan if getattr(session, "takes_views", False) and _delivers_directly(chan) else None
            if (chan is relay and datalen and window >= chan._init_recv_window / 2 and not chan._recv_paused
                    and chan._send_state not in _CLOSING):
                chan._recv_window = window
                session.data_received(memoryview(packet_data)[10:payload_end], None)
            else:
                _hand_on(chan, packet_data, payload_end)
    finally:
        cipher._iv = fixed + counter.to_bytes(8, "big")


def _recv_pkthdr(self) -> bool:
    if (type(self._recv_encryption) is GCMEncryption and self._auth_complete and not self._decompressor
            and SSHLogger._debug_level < 2):
        _recv_gcm_data(self)
    pos = self._inpos
    blocksize = self._recv_blocksize
    if self._inpend - pos < blocksize:
        return False

    first = self._inpbuf[pos:pos + blocksize]
    self._inpos = pos + blocksize

    if type(self._recv_encryption) is GCMEncryption:
        pktlen = first[:4]  # as GCMEncryption.decrypt_header: the length is not encrypted, only authenticated
    elif type(self._recv_encryption) is ChachaEncryption:
        pktlen = _chacha_header(self._recv_encryption._cipher, self._recv_seq, first[:4])
    elif self._recv_encryption:
        first, pktlen = self._recv_encryption.decrypt_header(self._recv_seq, first, 4)
    else:
        pktlen = first[:4]

    self._packet = first
    self._pktlen = int.from_bytes(pktlen, "big")

    if self._pktlen > self._max_recv_pktlen:
        raise ProtocolError("Max packet size exceeded")

    self._recv_handler = self._recv_packet
    return True


def _recv_packet(self) -> bool:
    macsize = self._recv_macsize
    rem = 4 + self._pktlen + macsize - self._recv_blocksize
    pos = self._inpos
    buf = self._inpbuf
    if self._inpend - pos < rem:
        return False

    seq = self._recv_seq
    end = pos + rem
    encryption = self._recv_encryption

    if not encryption:
        packet_data = self._packet[4:] + buf[pos:end]
    elif type(encryption) is GCMEncryption and pos >= self._recv_blocksize:
        # the header block sits just before pos: [length | ciphertext ... | tag] is one view
        start = pos - self._recv_blocksize
        view = memoryview(buf)
        packet_data = _gcm_open(encryption._cipher, view[start:start + 4], view[start + 4:end])
        if not packet_data:
            raise MACError("MAC verification failed")
    elif type(encryption) is ChachaEncryption and pos >= self._recv_blocksize:
        start = pos - self._recv_blocksize
        view = memoryview(buf)
        packet_data = _chacha_open(encryption._cipher, seq, view[start:end - macsize], view[end - macsize:end])
        if not packet_data:
            raise MACError("MAC verification failed")
    else:
        packet_data = encryption.decrypt_packet(seq, self._packet, buf[pos:end - macsize], 4,
                                                buf[end - macsize:end])
        if not packet_data:
            raise MACError("MAC verification failed")

    self._inpos = end
    self._packet = b""

    padlen = packet_data[0]
    payload_end = len(packet_data) - padlen
    if (payload_end >= 10 and packet_data[1] == MSG_CHANNEL_DATA and encryption and self._auth_complete
            and not self._decompressor and SSHLogger._debug_level < 2):
        # Channel data, the bulk of all packets: straight to the channel, as SSHChannel._process_data would
        # (open channel, exact length, within the window); anything else takes the general path below,
        # which raises the errors asyncssh raises.
        chan = _data_channel(self, packet_data, payload_end)
        if chan is not None:
            _hand_on(chan, packet_data, payload_end)
            # as _finish_recv_packet does for an encrypted packet after authentication
            self._auth_final = True
            if self._transport:
                self._recv_seq = (seq + 1) & 0xffffffff
            self._recv_handler = self._recv_pkthdr
            return True

    if self._decompressor and (self._auth_complete or not self._decompress_after_auth):
        payload = self._decompressor.decompress(packet_data[1:-padlen])
        if payload is None:
            raise CompressionError("Decompression failed")
        packet = SSHPacket(payload)
    else:
        packet = SSHPacket(packet_data[1:-padlen])

    pkttype = packet.get_byte()
    handler = self
    skip_reason = ""
    exc_reason = ""

    if MSG_KEX_FIRST <= pkttype <= MSG_KEX_LAST:
        if self._kex:
            if self._ignore_first_kex:  # pragma: no cover
                skip_reason = "ignored first kex"
                self._ignore_first_kex = False
            else:
                handler = self._kex
        else:
            skip_reason = "kex not in progress"
            exc_reason = "Key exchange not in progress"
    elif self._strict_kex and not self._recv_encryption and MSG_IGNORE <= pkttype <= MSG_DEBUG:
        skip_reason = "strict kex violation"
        exc_reason = f"Strict key exchange violation: unexpected packet type {pkttype} received"
    elif MSG_USERAUTH_FIRST <= pkttype <= MSG_USERAUTH_LAST:
        if self._auth:
            handler = self._auth
        else:
            skip_reason = "auth not in progress"
            exc_reason = "Authentication not in progress"
    elif pkttype > MSG_KEX_LAST and not self._recv_encryption:
        skip_reason = "invalid request before kex complete"
        exc_reason = "Invalid request before key exchange was complete"
    elif pkttype > MSG_USERAUTH_LAST and not self._auth_complete:
        skip_reason = "invalid request before auth complete"
        exc_reason = "Invalid request before authentication was complete"
    elif MSG_CHANNEL_FIRST <= pkttype <= MSG_CHANNEL_LAST:
        try:
            recv_chan = packet.get_uint32()
        except PacketDecodeError:
            skip_reason = "incomplete channel request"
            exc_reason = "Incomplete channel request received"
        else:
            try:
                handler = self._channels[recv_chan]
            except KeyError:
                skip_reason = "invalid channel number"
                exc_reason = f"Invalid channel number {recv_chan} received"

    if SSHLogger._debug_level >= 3:
        handler.log_received_packet(pkttype, seq, packet, skip_reason)

    if not skip_reason:
        try:
            result = handler.process_packet(pkttype, seq, packet)
        except PacketDecodeError as exc:
            raise ProtocolError(str(exc)) from None

        if result is not True and inspect.isawaitable(result):
            # Buffer received data until current packet is processed
            self._recv_handler = lambda: False

            task = self.create_task(result)
            task.add_done_callback(functools.partial(
                self._finish_recv_packet, pkttype, seq, is_async=True))

            return False
        elif not result:
            if self._strict_kex and not self._recv_encryption:
                exc_reason = f"Strict key exchange violation: unexpected packet type {pkttype} received"
            else:
                self.logger.debug1("Unknown packet type %d received", pkttype)
                self.send_packet(MSG_UNIMPLEMENTED, UInt32(seq))

    if exc_reason:
        raise ProtocolError(exc_reason)

    self._finish_recv_packet(pkttype, seq)
    return True
