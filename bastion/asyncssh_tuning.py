"""One change to asyncssh's hot path, justified by the bulk-tunnel profile (issue #6).

asyncssh sends an empty SSH_MSG_IGNORE before *every* packet once encryption is on. That is a defence
for CBC ciphers only (it makes the next CBC IV unpredictable, RFC 4251 9.3.1); with the AEAD and CTR
ciphers OpenSSH negotiates (aes*-gcm, chacha20-poly1305, aes*-ctr) it buys nothing, and it doubles the
packets encrypted and written: for a target->client tunnel, one extra encrypt, MAC and transport write per
32 KiB of data. We skip exactly that packet (empty payload) unless a CBC cipher is in use either way.

Disable with BASTION_ASYNCSSH_TUNING=0 (for comparison runs). If asyncssh's internals change so the
patch no longer fits, it is not applied and asyncssh behaves as shipped.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("bastion.tuning")

_EMPTY_STRING = b"\0\0\0\0"  # asyncssh's String(b""): the payload of the padding IGNORE


def apply() -> bool:
    """Install the patch once; returns whether it is active."""
    if os.environ.get("BASTION_ASYNCSSH_TUNING", "1") == "0":
        return False
    from asyncssh import connection
    from asyncssh.constants import MSG_IGNORE

    cls = connection.SSHConnection
    original = cls.send_packet
    if getattr(original, "_bastion_tuned", False):
        return True
    probe = cls.__new__(cls)
    if not all(hasattr(probe, name) or name in cls.__init__.__code__.co_names
               for name in ("_enc_alg_cs", "_enc_alg_sc")):
        log.warning("asyncssh internals changed; running without the IGNORE-packet tuning")
        return False

    def send_packet(self, pkttype: int, *args: bytes, handler=None) -> None:
        if (pkttype == MSG_IGNORE and args == (_EMPTY_STRING,)
                and b"cbc" not in self._enc_alg_sc and b"cbc" not in self._enc_alg_cs):
            return
        original(self, pkttype, *args, handler=handler)

    send_packet._bastion_tuned = True  # type: ignore[attr-defined]
    send_packet.__doc__ = original.__doc__
    cls.send_packet = send_packet
    return True
