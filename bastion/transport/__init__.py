"""Everything that patches or reaches into asyncssh, behind one facade.

The rest of bastion talks to asyncssh through its public API plus the calls here: `install()` once per
process before the server starts, `status()` for the startup line and `doctor`, `server_options()` and
`host_key_pairs()` for the listener, and three per-connection hooks the gateway uses on the byte path
(`receive_in_place`, `after_read`, `quick_ack`). What each patch does and why is in its own module:
the fast path (the AES-GCM/ChaCha20 packet path: pins, send, receive, in_place, keepalive, aead, keys; pinned to
the asyncssh version it was written for), quickack, kex_guess, zlib_limit, algorithms, certificates and
partial_auth (`second_factor_supported()` says whether a login can ask for a second method) and security_keys
(`security_key_flags_supported()`: whether the gateway sees each security-key signature's flags). Nothing outside
transport/ imports those modules (tests/unit/test_import_contract.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from . import algorithms, certificates, kex_guess, partial_auth, pins, quickack, security_keys, zlib_limit
from .algorithms import host_key_pairs, server_options
from .in_place import receive_in_place
from .receive import after_read
from .proxy_protocol import ProxyEvents, ProxyProtocolListener  # the PROXY header before SSH (#22)

__all__ = ["TransportStatus", "after_read", "host_key_pairs", "install", "quick_ack", "receive_in_place",
           "second_factor_supported", "security_key_flags_supported", "server_options", "status",
           "watch_send_buffer"]
__all__ += ["ProxyEvents", "ProxyProtocolListener"]


@dataclass(frozen=True, slots=True)
class TransportStatus:
    fast_path: bool
    reason: str  # why the fast path is off ("" when on)
    asyncssh_version: str

    def describe(self) -> str:
        """One phrase for the startup line and `doctor` (no colon: the startup line ends with host:port)."""
        if self.fast_path:
            return f"fast path on, asyncssh {self.asyncssh_version}"
        return f"fast path off because {self.reason}, asyncssh {self.asyncssh_version} as shipped"


_status: TransportStatus | None = None


def install(fast_path: bool = True) -> TransportStatus:
    """Apply every patch once for this process: the safety ones always, the fast path when asked for and when
    the installed asyncssh is the version it was written for. Returns (and remembers) the resulting status."""
    global _status
    quickack.apply()
    kex_guess.apply()  # RFC 4253's rule for a guessed kex packet (dropbear's dbclient guesses)
    zlib_limit.apply()  # when compression is on, no packet inflates beyond the packet limit
    algorithms.apply()  # user-auth signatures held to the server's signature_algs (no ssh-rsa/SHA-1)
    certificates.apply()  # the gateway sees each user certificate offered, to check and audit it (#21)
    partial_auth.apply()  # a login may need a second method after the key: partial success (#21, TOTP)
    security_keys.apply()  # the gateway judges each security-key signature's flags: touch, PIN (#21)
    _status = _fast_path_status(fast_path)
    return _status


def status(fast_path: bool = True) -> TransportStatus:
    """Whether the fast path is on and, if not, why. Before `install()` has run in this process (`doctor`), what
    installing with the switch at `fast_path` would give."""
    return _status if _status is not None else _fast_path_status(fast_path, install=False)


def _fast_path_status(wanted: bool, install: bool = True) -> TransportStatus:
    import asyncssh

    version = asyncssh.__version__
    if not wanted:
        return TransportStatus(False, "fast_path = false", version)
    changed = pins.changed_functions()
    if changed:
        return TransportStatus(False, f"asyncssh differs from the version it was written for in {len(changed)} "
                                      f"functions ({' '.join(changed[:3])}{' …' if len(changed) > 3 else ''})",
                               version)
    if install:
        pins.apply()
    return TransportStatus(True, "", version)


def second_factor_supported() -> bool:
    """Whether a server connection can answer a proved key with "partial success" and ask for another method
    (partial_auth.py: the owner's `more_auth_required`). False before `install()`, or on an asyncssh without the
    method it wraps: then nobody who needs a second factor can log in."""
    return partial_auth.installed()


def restart_login_timer(conn: Any, seconds: float) -> bool:
    """Give a client whose key is proved `seconds` from now to finish logging in (partial_auth.py)."""
    return partial_auth.restart_login_timer(conn, seconds)


def security_key_flags_supported() -> bool:
    """Whether the gateway sees the flags (user presence, user verification) of each security-key signature
    (security_keys.py: the owner's `security_key_signed`). False before `install()`, or on an asyncssh without the
    method it wraps: then nobody whose policy needs user verification can log in."""
    return security_keys.installed()


def quick_ack(sock: Any) -> None:
    """ACK what arrives next on `sock` at once (the target leg's first, small reads; see quickack.py)."""
    quickack.arm(sock)


def watch_send_buffer(conn: Any, high: int, low: int, on_drained: Callable[[], None]) -> asyncio.WriteTransport | None:
    """The SSH connection's socket transport with its write-buffer marks set to (`high`, `low`), and `on_drained`
    called when it has drained to `low`; None once the connection has no transport.

    asyncssh ignores its transport's flow control (SSHConnection.pause_writing and resume_writing do nothing) and
    keeps the transport private; the relay needs both to bound what it holds for a client that stops reading.
    The transport calls its protocol's resume_writing: the connection, or after login with the fast path its
    in-place reader, which calls the connection's; both reach `on_drained`."""
    socket_transport = conn._transport
    if socket_transport is None:
        return None
    socket_transport.set_write_buffer_limits(high, low)
    conn.resume_writing = on_drained
    return socket_transport
