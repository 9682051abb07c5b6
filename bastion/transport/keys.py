"""The AEAD state the fast path keeps on asyncssh's cipher objects: one AESGCM object or ChachaPoly per key
(asyncssh builds new ones for every packet), and the GCM invocation counter, which lives in the cipher's IV
so that asyncssh's own code (the general path, a rekey) and ours go on from the same place."""

from __future__ import annotations

from .aead import AESGCM, ChachaPoly, gcm_nonce


def gcm(cipher) -> tuple[AESGCM, bytes, int]:
    """The AESGCM object kept for asyncssh GCMCipher `cipher`'s key, the IV's fixed field and the invocation
    counter of the next packet. Whoever seals or opens packets with them stores the counter back (gcm_done)."""
    key = cipher.__dict__.get("_bastion_aead")
    if key is None:
        key = cipher._bastion_aead = AESGCM(cipher._key)
    iv = cipher._iv
    return key, iv[:4], int.from_bytes(iv[4:], "big")


def gcm_done(cipher, fixed: bytes, counter: int) -> None:
    """The next packet's invocation counter is `counter` (as GCMCipher._update_iv leaves it)."""
    cipher._iv = gcm_nonce(fixed, counter)


def chacha(cipher) -> ChachaPoly:
    """The ChachaPoly kept for asyncssh ChachaCipher `cipher`'s keys."""
    keys = cipher.__dict__.get("_bastion_chacha")
    if keys is None:
        keys = cipher._bastion_chacha = ChachaPoly(cipher._key, cipher._adkey)
    return keys
