"""Whether a key or certificate is revoked (#21): by the config's `revoked_keys` files (OpenSSH KRLs, read by
krl.py, or text files of public keys as sshd's RevokedKeys also takes) and by the policy's `[revoked]` list.

`revocation_refusal(policy, files, credential)` is asked at login (a plain key in `validate_public_key`, a
certificate when it is examined, both again when the session begins) and for every live session after a policy
apply or a change to a file. A file that cannot be read or parsed refuses every key and certificate login, as
sshd does when RevokedKeys cannot be read (fail closed); live sessions are not ended for that (`live=True`), only
for an actual revocation.

Pure: no I/O, no asyncssh, no clock.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .certificates import trusted_authority
from .krl import Credential, KrlError, RevocationList, fingerprint, parse_krl
from .model import Policy

_MAX_SHOWN = 60


@dataclass(frozen=True, slots=True)
class RevokedKeyFiles:
    """The `revoked_keys` files as last read: (path, list) each, or `failure` (why one could not be read)."""

    lists: tuple[tuple[str, RevocationList], ...] = ()
    failure: str | None = None


NO_FILES = RevokedKeyFiles()


def parse_revoked_keys(data: bytes) -> RevocationList:
    """A revoked_keys file: an OpenSSH KRL, or (as sshd also takes) a text file of public keys, one per line, with
    blank and '#' lines. Raises KrlError for anything else: a line that is not a public key is not skipped."""
    if data.startswith(b"SSHKRL"):
        return parse_krl(data)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KrlError("neither a KRL nor a text file of public keys (not ASCII)") from None
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        blob = _key_blob(parts)
        if blob is None:
            raise KrlError(f"line {number} is not an OpenSSH public key (TYPE BASE64 [comment]); a revoked_keys file "
                           "is a KRL (ssh-keygen -k) or a list of public keys")
        keys.add(blob)
    return RevocationList(keys=frozenset(keys))


def _key_blob(parts: list[str]) -> bytes | None:
    for index in range(min(len(parts) - 1, 2)):  # "TYPE BASE64", possibly after one options field
        try:
            blob = base64.b64decode(parts[index + 1], validate=True)
        except (binascii.Error, ValueError):
            continue
        length = int.from_bytes(blob[:4], "big")
        if len(blob) > 4 and blob[4:4 + length] == parts[index].encode():
            return blob
    return None


def policy_revocation(policy: Policy, credential: Credential) -> str | None:
    """Why the policy's [revoked] list refuses `credential`, or None."""
    if not policy.revoked:
        return None
    if credential.ca_key is None:
        return revoked_by_policy(policy, fingerprint(credential.key))
    return revoked_by_policy(policy, fingerprint(credential.key), fingerprint(credential.ca_key), credential.serial,
                             credential.key_id)


def revoked_by_policy(policy: Policy, key_fingerprint: str, ca_fingerprint: str | None = None,
                      serial: int | None = None, key_id: str | None = None) -> str | None:
    """policy_revocation by fingerprints (what an audit row keeps): a key, or a certificate of `ca_fingerprint`."""
    revoked = policy.revoked
    if key_fingerprint in revoked.fingerprints:
        return f"key {key_fingerprint} revoked by the policy"
    if ca_fingerprint is None:
        return None
    if key_id is not None and key_id in revoked.key_ids:
        return f"certificate key id {_shown(key_id)} revoked by the policy"
    if revoked.serials and serial:
        authority = trusted_authority(policy, ca_fingerprint)
        if authority is not None and any(ca == authority.name and low <= serial <= high
                                         for ca, low, high in revoked.serials):
            return f"certificate serial {serial} of CA {authority.name} revoked by the policy"
    if ca_fingerprint in revoked.fingerprints:
        return f"CA key {ca_fingerprint} revoked by the policy"
    return None


def revocation_refusal(policy: Policy, files: RevokedKeyFiles, credential: Credential, *,
                       live: bool = False) -> str | None:
    """Why `credential` may not log in (or, `live`, stay logged in), or None: revoked by a file or the policy, or
    (not `live`) a revoked_keys file that could not be read."""
    if files.failure is not None and not live:
        return f"revoked keys cannot be checked ({files.failure}); refusing key and certificate logins"
    for path, revocations in files.lists:
        reason = revocations.revokes(credential)
        if reason is not None:
            return f"{reason} by {path}"  # the admin's own path: shown whole
    return policy_revocation(policy, credential)


def _shown(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."
