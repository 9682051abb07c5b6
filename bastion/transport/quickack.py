"""Immediate ACKs (TCP_QUICKACK) where a peer's small packets would otherwise wait on our delayed ACKs.

OpenSSH sends its handshake packets without TCP_NODELAY: when it has sent one small packet and the next is
ready, Nagle's algorithm holds the second until the first is ACKed, and Linux delays that ACK by up to 40 ms
when we have nothing to send back yet. That happened two or three times per login on the client's
connection, and again on the target leg of `ssh -J` while the target's sshd runs its own handshake through the
tunnel (README, Benchmarks). Setting TCP_QUICKACK after a read sends the pending ACK at once; the mode is not
sticky (the kernel drops back to delayed ACKs by itself), so it is set again on each read that needs it:
every read on a client connection until the user is authenticated, and the small ones among the first
reads from a target (gateway/relay.py).
"""

from __future__ import annotations

import socket

from asyncssh.connection import SSHServerConnection

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def arm(sock) -> None:
    """ACK what arrives next at once (the socket of an asyncio or uvloop transport, or None)."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:  # not TCP, or already closed
            pass


def apply() -> bool:
    """Wrap the server connection's data_received (the asyncio Protocol entry point) once; False where
    unsupported."""
    if _QUICKACK is None:
        return False
    original = SSHServerConnection.data_received
    if getattr(original, "_bastion_quickack", False):
        return True

    def data_received(self, data: bytes, datatype=None) -> None:
        if not getattr(self, "_auth_complete", True):
            arm(self.get_extra_info("socket"))
        # looked up at each call, so that a later patch of SSHConnection's (the fast path's) is the one called
        super(SSHServerConnection, self).data_received(data, datatype)

    data_received._bastion_quickack = True  # type: ignore[attr-defined]
    data_received.__doc__ = original.__doc__
    SSHServerConnection.data_received = data_received  # type: ignore[method-assign]
    return True
