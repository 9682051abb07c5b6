"""The relay between an SSH channel and a TCP connection to the target.

We own it instead of asyncssh's built-in forwarder so that close semantics are ours:
- connect to the target before the channel is confirmed (see `connect_target`);
- backpressure both ways: when one side's write buffer is full, stop reading from the other. Toward the
  client that is two buffers: the channel's (bounded by the window, which the client chooses, up to 4 GiB)
  and the SSH connection's transport, which every channel of the connection writes to. A target is read
  only while both are below their high-water marks (`SendGate`), so what the bastion holds for a client
  that stops reading is bounded whatever window it announced;
- half-close: EOF from either side is passed on as EOF, and the tunnel closes once both sides
  have sent EOF, or as soon as either side goes away for good;
- nothing the target sends before the channel is confirmed is lost: it is held (and reading paused
  again) even on a loop, such as uvloop, that starts reading despite a pause in `connection_made`;
- byte counters are plain integer additions; no per-chunk logging or I/O;
- what the client sends reaches the target in one write per read of the SSH connection: a read brings
  several 32 KiB channel-data packets, and a write per packet costs a system call and a wake-up of the
  target each (OpenSSH's sshd writes what a read brought at once, too); likewise what the channel held
  while the target was not taking data.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import weakref
from typing import Any, Callable

import asyncssh

from .. import transport
from ..policy.netguard import IPAddress

# The first reads from a target carry its handshake (an sshd behind `ssh -J` sends it without TCP_NODELAY):
# ACK the small ones at once (see transport/quickack.py) so the target is not kept waiting 40 ms for each. Later reads
# are left alone: arming costs a system call, and an interactive sshd sets TCP_NODELAY itself.
HANDSHAKE_READS = 32
SMALL_READ = 16 * 1024

# What the SSH connection's transport may hold before its tunnels stop reading their targets, and where they
# start again. Far below any window a client may announce; above what one read from a target adds (256 KiB
# at most, on either loop), so that a connection whose client reads at full speed always has the next
# read's worth queued behind what the kernel holds (bench/run.py's bulk figures, A/B: within noise). A
# connection holds at most SEND_HIGH_WATER plus one read per tunnel that was reading when it went over.
SEND_HIGH_WATER = 512 * 1024
SEND_LOW_WATER = 128 * 1024


_GATES: "weakref.WeakKeyDictionary[Any, SendGate]" = weakref.WeakKeyDictionary()  # one per SSH connection


class SendGate:
    """The target legs of one SSH connection that wait for its transport's write buffer to drain.

    asyncssh ignores its transport's flow control (SSHConnection.pause_writing and resume_writing do
    nothing), so a channel whose client announced a large window writes into that buffer without limit.
    A tunnel checks the buffer's size after each write of a target's read, and waits here above the
    high-water mark; the transport's resume_writing, at the low-water mark, sends the waiting ones back to
    reading. Level, not edge: the transport has been told our marks, so a buffer above the high-water mark
    means the transport is paused and will call resume_writing, whatever happened before the gate existed."""

    __slots__ = ("transport", "waiting", "held")

    transport: asyncio.WriteTransport
    waiting: list[Tunnel]
    held: bool  # a tunnel has waited here: the buffer was above the mark (see HeapTrim)

    @classmethod
    def of(cls, conn: asyncssh.SSHClientConnection | asyncssh.SSHServerConnection) -> "SendGate | None":
        """The connection's gate, made by its first tunnel; None if the connection has no transport any more."""
        gate = _GATES.get(conn)
        if gate is None:
            gate = cls.__new__(cls)
            gate.waiting, gate.held = [], False
            gate.transport = transport.watch_send_buffer(conn, SEND_HIGH_WATER, SEND_LOW_WATER, gate.resume_writing)
            if gate.transport is None:
                return None
            _GATES[conn] = gate
        return gate

    def full(self) -> bool:
        return self.transport.get_write_buffer_size() > SEND_HIGH_WATER

    def resume_writing(self) -> None:
        """The transport drained to the low-water mark: the waiting tunnels read their targets again."""
        waiting, self.waiting = self.waiting, []
        for tunnel in waiting:
            tunnel._waiting = False
            tunnel._resume_target()


class HeapTrim:
    """Hands freed heap memory back to the system a moment after a tunnel whose connection held a full
    buffer has closed.

    What a transport buffered is a heap of 32 KiB packets; glibc keeps the pages once they are freed, so
    the process stays as large as its busiest moment (40 stalled connections: +31 MiB while held, +13 MiB
    still resident after they all left; with malloc_trim, +0.5 MiB). A trim walks the heap (a few ms at
    that size), so it runs at most once per TRIM_DELAY, and only after tunnels that were held. One per
    process: the heap is."""

    TRIM_DELAY = 1.0

    def __init__(self) -> None:
        self._pending = False
        try:
            self._trim = ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere nothing is trimmed
        except (OSError, AttributeError):
            self._trim = None

    def soon(self) -> None:
        if self._pending or self._trim is None:
            return
        self._pending = True
        asyncio.get_running_loop().call_later(self.TRIM_DELAY, self._run)

    def _run(self) -> None:
        self._pending = False
        self._trim(0)


heap_trim = HeapTrim()


class Tunnel(asyncssh.SSHTCPSession[bytes]):
    """The SSH side of one tunnel; owns the TCP transport to the target once connected.

    `on_close(tunnel)` is called exactly once, when both legs are closed."""

    # data_received may be handed read-only memoryviews instead of bytes (by the fast path): the relay only
    # counts and writes them
    takes_views = True

    def __init__(self, on_close: Callable[["Tunnel"], None]):
        self.channel_id: int | None = None  # the audit row, once committed
        self.request = None  # the AccessRequest it was granted for (re-checked on revocation)
        self.close_reason: str | None = None
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self._on_close = on_close
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._target: asyncio.Transport | None = None
        self._early: list[bytes] = []  # target data that arrived before the channel was confirmed
        self._gate: SendGate | None = None  # the SSH connection's, once the channel is confirmed
        self._chan_full = False  # the channel's send buffer is above its high-water mark (window exhausted)
        self._waiting = False  # in the gate's list: the connection's transport is above its high-water mark
        self._up: list[bytes | memoryview] = []  # client data of the current read, written when it is done
        self._resuming = False  # while the channel hands over client data it held while the target was full
        self._client_eof = False
        self._target_eof = False
        self._chan_closed = False
        self._target_closed = False
        self._finished = False

    # ---- SSH channel side (asyncssh.SSHTCPSession callbacks) ---------------------------------

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        """The channel is confirmed; data may flow. Reading from the target starts only now."""
        self._chan = chan
        self._gate = SendGate.of(chan.get_connection())
        assert self._target is not None
        for data in self._early:
            chan.write(data)
        self._early.clear()
        if self._target_closed:
            chan.close()  # the target came and went before the channel opened: deliver, then close
        elif self._target_eof:
            chan.write_eof()
        else:
            self._resume_target()

    def data_received(self, data: bytes | memoryview, datatype: asyncssh.DataType) -> None:
        self.bytes_up += len(data)
        if self._up or self._resuming:
            self._up.append(data)
            return
        done = transport.after_read(self._chan.get_connection()) if self._chan is not None else None
        if done is None:
            assert self._target is not None
            self._target.write(data)
        else:
            self._up.append(data)
            done.append(self._write_up)

    def _write_up(self) -> None:
        """Hand the target what the client sent, in order, before anything else happens to the target leg."""
        if not self._up:
            return
        up, self._up = self._up, []
        assert self._target is not None
        if len(up) == 1:
            self._target.write(up[0])
        else:
            self._target.writelines(up)

    def _resume_client(self) -> None:
        """The target drained: take what the channel held meanwhile and write it to the target in one go."""
        if self._chan is None:
            return
        self._resuming = True
        try:
            self._chan.resume_reading()  # delivers the held data (and a held EOF) before it returns
        finally:
            self._resuming = False
            self._write_up()

    def eof_received(self) -> bool:
        """The client will send no more. Pass EOF on; returning True keeps the channel half-open."""
        self._client_eof = True
        self._write_up()
        assert self._target is not None
        if self._target_eof:
            self.close()
            return False
        if self._target.can_write_eof():
            self._target.write_eof()
        return True

    def pause_writing(self) -> None:
        """The channel's send buffer is full (the client's window is used up): stop reading from the target."""
        self._chan_full = True
        if self._target is not None:
            self._target.pause_reading()

    def resume_writing(self) -> None:
        """The channel's send buffer drained: read from the target again, if the connection's has room too."""
        self._chan_full = False
        self._resume_target()

    def _resume_target(self) -> None:
        """Read from the target, unless the channel's or the connection's send buffer is above its mark."""
        target = self._target
        if target is None or target.is_closing() or self._chan_full or self._waiting:
            return
        gate = self._gate
        if gate is not None and gate.full():
            self._wait(gate)
        else:
            target.resume_reading()

    def _wait(self, gate: SendGate) -> None:
        """Stop reading the target until the SSH connection's transport drains (SendGate.resume_writing)."""
        self._waiting = True
        gate.held = True
        gate.waiting.append(self)
        assert self._target is not None
        self._target.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """The channel is closed (client closed, connection lost, or we closed it)."""
        self._write_up()
        self._chan = None
        self._chan_closed = True
        if self._target is not None and not self._target.is_closing():
            # Flush what the client sent, then close; abort only if the SSH side broke.
            if exc is None:
                self._target.close()
            else:
                self._target.abort()
        self._maybe_finish()

    # ---- target side (called by _TargetProtocol) ---------------------------------------------

    def _target_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        if self._chan is not None:
            self._chan.write(data)
            # one C call per read from the target: the connection's buffer is what grows when the client
            # announced a large window and stopped reading
            gate = self._gate
            if gate is not None and gate.full() and not self._waiting:
                self._wait(gate)
        elif not self._chan_closed:  # not confirmed yet: hold it, and hold off the target
            self._early.append(data)
            assert self._target is not None
            self._target.pause_reading()

    def _target_eof_received(self) -> bool:
        self._target_eof = True
        if self._chan is not None:
            self._chan.write_eof()
        if self._client_eof:
            self.close()
            return False
        return True

    def _target_lost(self, exc: Exception | None) -> None:
        self._target_closed = True
        if self._chan is not None:
            self._chan.close()  # flushes buffered data before the channel close goes out
        self._maybe_finish()

    # ---- shared -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close both legs gracefully (buffered data is flushed first)."""
        self._write_up()
        if self._target is not None and not self._target.is_closing():
            self._target.close()
        if self._chan is not None:
            self._chan.close()

    def abort(self) -> None:
        """Drop a tunnel whose channel is not open (refused, revoked while pending, or the SSH connection went
        away): the target leg is cut, and on_close runs once it is gone (at once if it never connected)."""
        self._chan_closed = True
        if self._target is not None:
            self._target.abort()
        else:
            self._target_closed = True
            self._maybe_finish()

    def revoke(self, reason: str) -> None:
        """Close for `reason` (a revocation): an open tunnel gracefully, a pending one (not yet confirmed to
        the client) at once, so that it never opens."""
        self.close_reason = reason
        if self._chan is None:
            self.abort()
        else:
            self.close()

    @property
    def target_transport(self) -> asyncio.Transport | None:
        """The TCP leg, once connected (for an inbound -R connection: the one that came in)."""
        return self._target

    @property
    def ended(self) -> bool:
        """The channel side is closed, or was cut before it opened: a pending open must not go on."""
        return self._chan_closed

    def _maybe_finish(self) -> None:
        if not self._finished and self._chan_closed and self._target_closed:
            self._finished = True
            self._on_close(self)
            if self._gate is not None and self._gate.held:
                heap_trim.soon()


class _TargetProtocol(asyncio.Protocol):
    """The TCP side; every event goes to its Tunnel."""

    def __init__(self, tunnel: Tunnel):
        self._tunnel = tunnel
        self._sock = None
        self._handshake_reads = HANDSHAKE_READS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Hold the target's bytes until the channel is confirmed.
        transport.pause_reading()  # type: ignore[attr-defined]
        self._tunnel._target = transport  # type: ignore[assignment]
        self._sock = transport.get_extra_info("socket")

    def data_received(self, data: bytes) -> None:
        if self._handshake_reads:
            self._handshake_reads -= 1
            if len(data) < SMALL_READ:
                transport.quick_ack(self._sock)
        self._tunnel._target_data(data)

    def eof_received(self) -> bool:
        return self._tunnel._target_eof_received()

    def pause_writing(self) -> None:
        if self._tunnel._chan is not None:
            self._tunnel._chan.pause_reading()

    def resume_writing(self) -> None:
        self._tunnel._resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel._target_lost(exc)


async def connect_target(tunnel: Tunnel, address: IPAddress, port: int, timeout: float) -> None:
    """Open the TCP leg to exactly `address` (the one the policy checked: no second lookup)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    await asyncio.wait_for(
        loop.create_connection(lambda: _TargetProtocol(tunnel), host=str(address), port=port, family=family,
                               flags=socket.AI_NUMERICHOST),
        timeout,
    )


def inbound_protocol(tunnel: Tunnel) -> asyncio.Protocol:
    """The TCP side for a connection that arrived on a remote-forward listener (ssh -R)."""
    return _TargetProtocol(tunnel)
