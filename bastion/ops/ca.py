"""The home's user CA (#21): `bastion ca init` makes it, `bastion ca sign` signs a user's public key with it.

The CA key is `HOME/user_ca_key` (Ed25519, 0600; service/home.py makes and reads it) with `user_ca_key.pub` beside
it. The running gateway trusts it as the CA `home` without a policy file naming it (policy/signing.py). Serials are
kept in the home too, in `user_ca_key.serial`: the last serial issued, raised under an exclusive lock, so two
`ca sign` at once never issue the same serial, and a serial given with --serial must be above every one issued.
Signing uses asyncssh's public `SSHKey.generate_user_certificate`.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncssh

from ..config import Config
from ..errors import BastionError
from ..policy.keys import weak_key_reason
from ..policy.model import PolicyError, format_time
from ..policy.signing import HOME_CA, SigningRequest, signing_request
from ..service.home import create_user_ca, load_user_ca, user_ca_path


@dataclass(frozen=True, slots=True)
class Issued:
    request: SigningRequest
    certificate: str  # the OpenSSH certificate line, as the user's id_ed25519-cert.pub holds it
    user_key_fingerprint: str

    def describe(self) -> str:
        request = self.request
        sources = f", from {','.join(map(str, request.source_addresses))}" if request.source_addresses else ""
        return (f"signed {self.user_key_fingerprint} for {request.user}: key id {request.key_id!r}, serial "
                f"{request.serial}, principals {','.join(request.principals)}, valid until "
                f"{format_time(request.valid_before)}{sources}")


def init_ca(config: Config) -> tuple[str, str]:
    """Make the home CA; returns its public key line and fingerprint."""
    line = create_user_ca(config)
    return line, asyncssh.import_public_key(line).get_fingerprint("sha256")


def ca_policy_lines(line: str) -> str:
    """The `[cas.home]` table that declares the home CA in a policy file, for an admin who wants other settings
    (e.g. principals_as_groups = true); without it the CA is trusted as `home` with these defaults."""
    key = " ".join(line.split()[:2])
    return (f'[cas.{HOME_CA}]\nkey = "{key} bastion-home-ca"\nrequire_known_user = true\n'
            "principals_as_groups = false\n")


def sign(config: Config, user: str, public_key: Path, validity: str, now: datetime,
         principals: tuple[str, ...] = (), source_addresses: tuple[str, ...] = (),
         serial: int | None = None) -> Issued:
    """Sign `public_key` (a .pub file) as a user certificate for `user`; raises BastionError with one line."""
    try:
        text = public_key.read_text(encoding="utf-8")
    except OSError as exc:
        raise BastionError(f"{public_key}: cannot read the public key: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BastionError(f"{public_key}: not an OpenSSH public key file (not UTF-8 text)") from None
    if text.split(maxsplit=1)[:1] and text.split(maxsplit=1)[0].endswith("-cert-v01@openssh.com"):
        raise BastionError(f"{public_key}: is a certificate; give the user's public key (id_ed25519.pub)")
    try:
        user_key = asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise BastionError(f"{public_key}: not an OpenSSH public key ({exc}); give the user's .pub file") from None
    weakness = weak_key_reason(user_key)
    if weakness:
        raise BastionError(f"{public_key}: {weakness}")
    try:  # every value checked before a serial is used up
        signing_request(user, serial or 1, validity, config.ca_max_validity, now, principals, source_addresses)
    except PolicyError as exc:
        raise BastionError(str(exc)) from None
    ca = load_user_ca(config)
    with _serials(config) as serials:
        number = serials.next(serial)
        request = signing_request(user, number, validity, config.ca_max_validity, now, principals,
                                  source_addresses)
        certificate = ca.generate_user_certificate(
            user_key, request.key_id, serial=request.serial, principals=list(request.principals),
            valid_after=int(request.valid_after.timestamp()), valid_before=int(request.valid_before.timestamp()),
            source_address=[str(n) for n in request.source_addresses] or None,
            permit_port_forwarding=True, permit_x11_forwarding=False, permit_agent_forwarding=False,
            permit_pty=False, permit_user_rc=False, comment=f"{user}@bastion",
        )
        serials.commit(number)
    line = certificate.export_certificate("openssh").decode()
    return Issued(request, line if line.endswith("\n") else line + "\n", user_key.get_fingerprint("sha256"))


class _Serials:
    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def last(self) -> int:
        os.lseek(self.fd, 0, os.SEEK_SET)
        text = os.read(self.fd, 64).decode("ascii", "replace").strip()
        if not text:
            return 0
        if not text.isdigit():
            raise BastionError(f"{self.path}: not a serial number ({text[:20]!r}); it holds the last serial issued")
        return int(text)

    def next(self, wanted: int | None) -> int:
        last = self.last()
        if wanted is None:
            return last + 1
        if wanted <= last:
            raise BastionError(f"--serial {wanted} is not above the last serial issued ({last}); serials are never "
                               "reused, so a revocation by serial names one certificate")
        return wanted

    def commit(self, number: int) -> None:
        data = f"{number}\n".encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)
        os.fsync(self.fd)


class _serials:
    """`user_ca_key.serial` opened (0600, never through a link) and locked for one signing."""

    def __init__(self, config: Config):
        self.path = Path(f"{user_ca_path(config)}.serial")

    def __enter__(self) -> _Serials:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BastionError(f"{self.path}: cannot open the serial file: {exc.strerror}") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return _Serials(self.fd, self.path)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock
