"""Authentication events in OpenSSH's own words, so the fail2ban `sshd` filter and SIEM rules written for sshd read
the bastion's log as they read an sshd's.

The wording is sshd's (auth.c `auth_log` and `auth_maxtries_exceeded`, auth2.c's "Invalid user", packet.c's
"Connection closed by …" with the `authenticating user`/`invalid user` preamble, sshd's "Timeout before
authentication"), checked against a real sshd 9.2 at LogLevel VERBOSE. Two differences, both on purpose: every line
is at INFO (sshd logs a valid user's "Failed publickey" only at VERBOSE, and its preauth child never logs a key
query that fails, so a scan with unknown keys would leave no failure line), and "Failed publickey" is written for an
unknown user too ("for invalid user", a form sshd uses when the client signs outright).

These lines go to the `bastion` logger, with no `[conn=…]` prefix: their words are all a rule may match (the service
log's text format shows them as `bastion: Invalid user …`, under journald as the unit's own `bastion[PID]: Invalid
user …`). The connection's fields (conn, user, client_ip, client_port, session) ride along as record attributes for
the JSON format.
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, Any

import asyncssh

from ..printable import printable

if TYPE_CHECKING:
    from ..policy.certificates import Certificate

log = logging.getLogger("bastion")

# sshkey_type() names, as sshd prints them before the fingerprint
_KEY_TYPES = {
    "ssh-ed25519": "ED25519",
    "ssh-rsa": "RSA",
    "rsa-sha2-256": "RSA",
    "rsa-sha2-512": "RSA",
    "ssh-dss": "DSA",
    "sk-ssh-ed25519@openssh.com": "ED25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}


def key_type_name(algorithm: str) -> str:
    """'ssh-ed25519' -> 'ED25519', 'ecdsa-sha2-nistp256' -> 'ECDSA', as sshd names a key in its log."""
    if algorithm in _KEY_TYPES:
        return _KEY_TYPES[algorithm]
    if algorithm.startswith("ecdsa-sha2-"):
        return "ECDSA"
    return algorithm.upper() or "UNKNOWN"


def key_description(key: asyncssh.SSHKey, certificate: "Certificate | None" = None) -> str:
    """'ED25519 SHA256:…': the key as sshd's "ssh2: …" suffix names it."""
    algorithm = key.get_algorithm()
    if isinstance(algorithm, bytes):
        algorithm = algorithm.decode("ascii", "replace")
    return described(algorithm, key.get_fingerprint("sha256"), certificate)


def described(algorithm: str, fingerprint: str, certificate: "Certificate | None" = None) -> str:
    """sshd's format_key() (auth2-pubkey.c): 'ED25519 SHA256:…', or for a certificate 'ED25519-CERT SHA256:… ID
    alice@corp (serial 7) CA ED25519 SHA256:…' (the fingerprint is the certified key's, as sshd's)."""
    if certificate is None:
        return f"{key_type_name(algorithm)} {fingerprint}"
    key_id = printable(certificate.key_id)[:100]  # the holder's text: one line, whatever the service formatter
    return (f"{key_type_name(algorithm)}-CERT {fingerprint} ID {key_id} (serial {certificate.serial}) "
            f"CA {key_type_name(_blob_type(certificate.ca_key))} {certificate.ca_fingerprint}")


def _blob_type(blob: bytes) -> str:
    """The key type named at the start of an SSH public key blob ('ssh-ed25519'), '' if unreadable."""
    if len(blob) < 4:
        return ""
    (length,) = struct.unpack(">I", blob[:4])
    return blob[4:4 + length].decode("ascii", "replace") if 0 < length <= min(64, len(blob) - 4) else ""


class AuthEvents:
    """One connection's authentication lines. `owner` is the connection: it has `number`, `user`, `client_ip`,
    `client_port` and `session_id`; `valid` (a user the bastion knows) is set when the user name arrives."""

    def __init__(self, owner: Any):
        self.owner = owner
        self.valid = True
        self._disconnect_logged = False

    # ---- the words -------------------------------------------------------------------------------

    def _user(self) -> str:
        return str(self.owner.user)[:100]  # sshd's %.100s

    def _where(self) -> str:
        return f"{self.owner.client_ip} port {self.owner.client_port}"

    def _who(self) -> str:
        """packet.c's preamble before authentication: 'authenticating user alice' or 'invalid user bob'."""
        if not self.owner.user:
            return ""
        return f"{'authenticating' if self.valid else 'invalid'} user {self._user()} "

    def _for(self) -> str:
        return f"{'' if self.valid else 'invalid user '}{self._user()}"

    def _log(self, message: str) -> None:
        fields: dict[str, Any] = {"conn": f"c{self.owner.number}", "client_ip": self.owner.client_ip,
                                  "client_port": self.owner.client_port}
        if self.owner.user:
            fields["user"] = self.owner.user
        if self.owner.session_id:
            fields["session"] = self.owner.session_id
        log.info("%s", message, extra=fields)

    # ---- the events ------------------------------------------------------------------------------

    def user_named(self, valid: bool) -> None:
        """The client named its user (the first userauth request): an unknown one is an 'Invalid user'."""
        self.valid = valid
        if not valid:
            self._log(f"Invalid user {self._user()} from {self._where()}")

    def failed_publickey(self, key: asyncssh.SSHKey, certificate: "Certificate | None" = None) -> None:
        self._log(f"Failed publickey for {self._for()} from {self._where()} ssh2: "
                  f"{key_description(key, certificate)}")

    def accepted_publickey(self, algorithm: str, fingerprint: str, certificate: "Certificate | None" = None) -> None:
        self._log(f"Accepted publickey for {self._user()} from {self._where()} ssh2: "
                  f"{described(algorithm, fingerprint, certificate)}")

    def partial_publickey(self, algorithm: str, fingerprint: str, certificate: "Certificate | None" = None) -> None:
        """The key is proved and a one-time code comes next (#21; sshd's line under AuthenticationMethods)."""
        self._log(f"Partial publickey for {self._user()} from {self._where()} ssh2: "
                  f"{described(algorithm, fingerprint, certificate)}")

    def failed_keyboard_interactive(self) -> None:
        """A wrong or used one-time code (fail2ban's sshd filter counts "Failed <method> for")."""
        self._log(f"Failed keyboard-interactive for {self._for()} from {self._where()} ssh2")

    def accepted_keyboard_interactive(self) -> None:
        self._log(f"Accepted keyboard-interactive for {self._user()} from {self._where()} ssh2")

    def too_many_failures(self) -> None:
        """sshd's two lines when MaxAuthTries is reached; the connection is then closed by us."""
        self._log(f"maximum authentication attempts exceeded for {self._for()} from {self._where()} ssh2 [preauth]")
        self._log(f"Disconnecting {self._who()}{self._where()}: Too many authentication failures [preauth]")
        self._disconnect_logged = True

    def closed_before_login(self, exc: Exception | None, reason: str | None) -> None:
        """The connection ended before a login: the client left, timed out, or we closed it (`reason`)."""
        if self._disconnect_logged:
            return
        who = self._who()
        if isinstance(exc, asyncssh.ConnectionLost) and "Login timeout" in str(exc):
            self._log(f"Timeout before authentication for {self._where()}")
        elif _said_goodbye(exc):
            self._log(f"Received disconnect from {self._where()}:{exc.code}: {exc.reason} [preauth]")
            self._log(f"Disconnected from {who}{self._where()} [preauth]")
        elif exc is None:
            self._log(f"Disconnecting {who}{self._where()}: {reason or 'disconnected by server'} [preauth]")
        elif isinstance(exc, ConnectionResetError) or "reset" in str(exc).lower():
            self._log(f"Connection reset by {who}{self._where()} [preauth]")
        else:
            self._log(f"Connection closed by {who}{self._where()} [preauth]")

    def disconnected(self, exc: Exception | None) -> None:
        """A logged-in session's connection ended."""
        if _said_goodbye(exc):
            self._log(f"Received disconnect from {self._where()}:{exc.code}: {exc.reason}")
        self._log(f"Disconnected from user {self._user()} {self._where()}")


def _said_goodbye(exc: Exception | None) -> bool:
    """The client sent a disconnect message (asyncssh's ConnectionLost is a DisconnectError too: not that)."""
    return isinstance(exc, asyncssh.DisconnectError) and not isinstance(exc, asyncssh.ConnectionLost)
