# This file adapts functions from asyncssh 2.24.1 (connection.py, channel.py),
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""The fast path's receive side: packets parsed at an offset into the read buffer and opened straight from
it, channel data handed to its channel without a packet object, and AES-GCM channel data opened per read in
one loop.

What it changes in asyncssh, each justified by the bulk-tunnel profile (bench/README.md):
- Packets are parsed at an offset into the read buffer instead of re-slicing the whole buffer after every
  packet (quadratic in the read size), and AES-GCM and ChaCha20-Poly1305 packets are opened (aead.py)
  straight from it.
- Channel data goes to the channel after the checks `_process_data` makes, without building a packet
  object, and straight to the session while no window adjust is due (as a view, for sessions that take
  views). `after_read` lets a session act once per read.
- AES-GCM channel data, the bulk of what a tunnel moves, is opened per read in one loop with the read
  position, sequence number and counter in locals, instead of the calls and checks of the general path per
  packet; anything else stops the loop there and takes the general path, which raises asyncssh's errors.
- Per-packet debug logging is built only when asyncssh's packet debug level (3) is on.
"""

from __future__ import annotations

import functools
import inspect
import struct
from typing import Callable

from asyncssh.channel import SSHChannel
from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_FIRST, MSG_CHANNEL_LAST, MSG_DEBUG, MSG_IGNORE,
                                MSG_KEX_FIRST, MSG_KEX_LAST, MSG_UNIMPLEMENTED, MSG_USERAUTH_FIRST,
                                MSG_USERAUTH_LAST)
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import CompressionError, DisconnectError, MACError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket, UInt32

from . import keys
from .aead import TAG, gcm_nonce, gcm_open, next_counter

# _inpbuf holds what has arrived; _inpos is where parsing stands. The buffer is cut once per read, not once
# per packet. While a packet's header has been read but not its body, the header block stays in the buffer
# just before _inpos, so an AES-GCM packet can be decrypted from one contiguous view of the buffer.


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


def _recv_gcm_data(self) -> None:
    """Parse, open and hand on AES-GCM channel-data packets in one loop, with the read position, sequence
    number and GCM counter in locals, as _recv_pkthdr and _recv_packet would one call each (a read brings several
    32 KiB packets; the calls and checks per packet cost about what opening one does). Stops at the first
    packet that is incomplete or anything but channel data _data_channel takes, and leaves it, with the counter
    for it, to them (they raise the errors). A packet for a session that takes views, with no window adjust
    due, goes to it from here, as _hand_on would send it (one call fewer per packet)."""
    cipher = self._recv_encryption._cipher
    key, fixed, counter = keys.gcm(cipher)  # the kept AESGCM object, the next packet's counter (set when done)
    buf = self._inpbuf
    view = memoryview(buf)
    pos, seq, limit = self._inpos, self._recv_seq, self._max_recv_pktlen
    channels = self._channels
    relay = session = None  # the last channel found to take views of packets, and its session
    try:
        while self._inpend - pos >= 4 and self._inpbuf is buf:
            pktlen, = _LENGTH(buf, pos)
            end = pos + 4 + pktlen + TAG
            if pktlen > limit or end > self._inpend or pktlen < 10:
                break
            packet_data = gcm_open(key, gcm_nonce(fixed, counter), view[pos:pos + 4], view[pos + 4:end])
            if packet_data is None:
                break
            padlen, pkttype, recipient, datalen = _DATA_HEAD(packet_data)
            payload_end = pktlen - padlen
            # as _data_channel: open channel, exact length, within the window
            if pkttype != MSG_CHANNEL_DATA or 10 + datalen != payload_end:
                break
            chan = channels.get(recipient)
            if chan is None or chan._recv_state != "open" or datalen > chan._recv_window:
                break
            counter = next_counter(counter)
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
        keys.gcm_done(cipher, fixed, counter)


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
        pktlen = keys.chacha(self._recv_encryption._cipher).length(self._recv_seq, first[:4])
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
        cipher = encryption._cipher
        key, fixed, counter = keys.gcm(cipher)
        packet_data = gcm_open(key, gcm_nonce(fixed, counter), view[start:start + 4], view[start + 4:end])
        keys.gcm_done(cipher, fixed, next_counter(counter))
        if not packet_data:
            raise MACError("MAC verification failed")
    elif type(encryption) is ChachaEncryption and pos >= self._recv_blocksize:
        start = pos - self._recv_blocksize
        view = memoryview(buf)
        packet_data = keys.chacha(encryption._cipher).open(seq, view[start:end - macsize], view[end - macsize:end])
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
