# This file adapts a function from asyncssh 2.24.1 (connection.py),
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""Reading straight into the receive buffer: after login, a server connection's socket reads into a buffer
the connection owns (receive_in_place) instead of handing over a new bytes object per read for asyncssh to
append; data_received, for whoever still calls it, appends to that buffer.
"""

from __future__ import annotations

import asyncio
import mmap

from . import receive

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
    if connection.SSHConnection._recv_data is not receive._recv_data or transport is None:
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


def _data_received(self, data, datatype=None) -> None:
    room = None if type(self._inpbuf) is bytes else _room(self, len(data))  # (see receive_in_place)
    if room is None:
        self._inpbuf += data  # _recv_data takes its new length
    else:
        room[:len(data)] = data
        self._inpend += len(data)
    self._recv_data()
