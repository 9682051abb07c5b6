"""RFC 4253's rule for a guessed first key-exchange packet, in place of asyncssh's.

A peer that sets `first_kex_packet_follows` in its KEXINIT sends its first key-exchange packet (for
curve25519, its public value) without waiting for ours. RFC 4253 §7: "The guess is considered wrong if the
kex algorithm and/or the host key algorithm is guessed wrong (server and client have different preferred
algorithm)"; a wrong guess "MUST be silently ignored", and the peer, knowing it guessed wrong, sends the
packet again. asyncssh 2.24.1 (`_process_kexinit`) calls the guess wrong only when the negotiated kex is not
the peer's first, and never looks at the host-key algorithms. dropbear's dbclient guesses curve25519-sha256;
we prefer mlkem768x25519-sha256 but support curve25519, so asyncssh used the guess, dbclient sent its packet
again by the RFC's rule, and the second one ended every connection ("Disconnect received"). OpenSSH
(kex.c, proposals_match) and dropbear (buf_match_algo) both compare the two sides' first entries.

`guess_was_wrong` is the rule; `apply` wraps asyncssh's KEXINIT handler so that, once asyncssh has set
`_ignore_first_kex` its way, the rule sets it again. The receive path then drops the guessed packet; the fast
path's copy of that path (receive.py) reads the same attribute, so both are covered.
"""

from __future__ import annotations

from typing import Sequence

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_KEXINIT
from asyncssh.packet import SSHPacket


def guess_was_wrong(client_kex_algs: Sequence[bytes], client_host_key_algs: Sequence[bytes],
                    server_kex_algs: Sequence[bytes], server_host_key_algs: Sequence[bytes]) -> bool:
    """Whether a guessed first kex packet must be ignored (RFC 4253 §7): the two sides' preferred (first)
    key-exchange algorithms differ, or their preferred host-key algorithms do."""
    def first(algs: Sequence[bytes]) -> bytes | None:
        return algs[0] if algs else None

    return (first(client_kex_algs) != first(server_kex_algs)
            or first(client_host_key_algs) != first(server_host_key_algs))


def _read_kexinit(payload: bytes) -> tuple[list[bytes], list[bytes], bool]:
    """A KEXINIT message (type byte included): its kex and host-key lists and first_kex_packet_follows."""
    packet = SSHPacket(payload)
    packet.get_byte()  # MSG_KEXINIT
    packet.get_bytes(16)  # cookie
    kex_algs = packet.get_namelist()
    host_key_algs = packet.get_namelist()
    for _ in range(8):  # ciphers, MACs, compression (each direction), languages (each direction)
        packet.get_namelist()
    return kex_algs, host_key_algs, packet.get_boolean()


def apply() -> None:
    """Wrap asyncssh's KEXINIT handler once (both sides of a connection store both KEXINITs)."""
    handlers = SSHConnection._packet_handlers
    original = handlers[MSG_KEXINIT]
    if getattr(original, "_bastion_kex_guess", False):
        return

    async def process_kexinit(self: SSHConnection, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        # The receive path holds further packets until this handler returns, so the guess, which follows the
        # KEXINIT, is judged by what is set here.
        await original(self, pkttype, pktid, packet)
        client_kex, client_host_keys, client_guessed = _read_kexinit(self._client_kexinit)
        server_kex, server_host_keys, server_guessed = _read_kexinit(self._server_kexinit)
        guessed = client_guessed if self.is_server() else server_guessed  # the peer's flag
        self._ignore_first_kex = guessed and guess_was_wrong(client_kex, client_host_keys, server_kex,
                                                             server_host_keys)

    process_kexinit._bastion_kex_guess = True  # type: ignore[attr-defined]
    process_kexinit.__doc__ = original.__doc__
    handlers[MSG_KEXINIT] = process_kexinit  # type: ignore[index]
