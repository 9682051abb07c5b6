"""Which user and host keys are strong enough, and how messages name a key. Pure: works on a key's SSH wire
encoding (the base64 part of an authorized_keys line, decoded), so policy files, the store and the server
judge a key by the same rule."""

from __future__ import annotations

import base64
import hashlib
import struct

MIN_RSA_BITS = 2048


def weak_key_reason(key) -> str | None:
    """Why a user's public key is too weak to log in with, or None if it is strong enough.

    `key` is its SSH wire encoding, or any key object with `public_data` (an asyncssh key). Refused, as OpenSSH 9.x refuses them: DSA (OpenSSH 7.0 disabled it; 1024 bits and SHA-1
    only) and RSA under 2048 bits (OpenSSH 8.8's RequiredRSASize is 1024; 2048 is NIST's floor and what
    ssh-keygen has made since 2007)."""
    blob = key if isinstance(key, (bytes, bytearray, memoryview)) else key.public_data
    fields = _wire_strings(bytes(blob), 3)
    if not fields:
        return None  # not ours to judge; whoever decodes the key reports it as malformed
    algorithm = fields[0]
    if algorithm == b"ssh-dss":
        return "DSA keys are refused (1024-bit, SHA-1 signatures; OpenSSH disabled them in 7.0)"
    if algorithm == b"ssh-rsa" and len(fields) == 3:
        bits = int.from_bytes(fields[2], "big").bit_length()  # fields: type, e, n
        if bits < MIN_RSA_BITS:
            return f"RSA keys need at least {MIN_RSA_BITS} bits; this one has {bits}"
    return None


def describe_key(blob: bytes, comment: str = "") -> str:
    """'ssh-rsa SHA256:… comment': how error messages name a key (the fingerprint as ssh-keygen -l prints it)."""
    fields = _wire_strings(blob, 1)
    algorithm = fields[0].decode("ascii", "replace") if fields else "key"
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{algorithm} SHA256:{digest}" + (f" ({comment})" if comment else "")


def _wire_strings(blob: bytes, count: int) -> list[bytes]:
    """The first `count` length-prefixed strings of an SSH wire encoding (fewer if it ends early)."""
    fields, offset = [], 0
    while len(fields) < count and offset + 4 <= len(blob):
        (length,) = struct.unpack_from(">I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            break
        fields.append(blob[offset:offset + length])
        offset += length
    return fields
