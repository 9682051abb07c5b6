"""The home's user CA (#21): `bastion ca init` makes it, `bastion ca sign` signs a user's public key with it.

The CA key is `HOME/user_ca_key` (Ed25519, 0600; service/home.py makes and reads it) with `user_ca_key.pub` beside
it. The running gateway trusts it as the CA `home` without a policy file naming it (policy/signing.py). Serials are
kept in the home too, in `user_ca_key.serial`: the last serial issued, raised under an exclusive lock, so two
`ca sign` at once never issue the same serial, and a serial given with --serial must be above every one issued.
Signing uses asyncssh's public `SSHKey.generate_user_certificate`.

In a fleet on a PostgreSQL store (#22; store/home_ca.py) the private key stays in the one home where `ca init` ran,
and the store holds the rest: the public key (every node trusts it as `home`, also those that never saw the
private key) and the last serial, raised in the transaction of each signing with the row locked, so serials
never repeat across the fleet. `ca init` on another node refuses to make a second CA and says where the key is;
so does `ca sign` there. The serial file is still written beside the key (never below the store's).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
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
from ..store import home_ca
from ..store.dialect import is_postgres


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


def init_ca(config: Config) -> tuple[str, str, str | None]:
    """Make the home CA; returns its public key line, fingerprint, and what happened in the fleet's store (None
    without one). With a PostgreSQL store: made and published in one transaction of the store, so two nodes
    running it at once cannot both make one; a home that already holds a key (made before the store was
    set) publishes that one; a store that already has another CA is refused, naming where its key is."""
    if not is_postgres(config.store):
        line = create_user_ca(config)
        return line, _fingerprint(line), None
    public = Path(f"{user_ca_path(config)}.pub")
    with _fleet_store(config) as store, home_ca.locked(store) as row:
        here = _public_line(public)
        if row.ca.public_key is not None:
            if here is not None and _same_key(here, row.ca.public_key):
                return here, _fingerprint(here), "already the fleet's home CA (in the store); nothing changed"
            raise BastionError(f"the fleet already has a home CA ({row.ca.fingerprint}); its private key is in "
                               f"{row.ca.key_home}, where `ca init` ran: sign there (`bastion ca sign`), a second "
                               "CA is not made")
        made = here is None
        line = create_user_ca(config) if made else here
        try:
            row.publish(line, _fingerprint(line), key_home(config), last_serial(config))
        except BaseException:
            if made:  # never trusted nor used: leave the home as it was
                for path in (user_ca_path(config), public):
                    with contextlib.suppress(OSError):
                        path.unlink()
            raise
    what = "made and published" if made else "this home's CA key published"
    return line, _fingerprint(line), f"{what} in the store: every node on it trusts it as CA home"


def key_home(config: Config) -> str:
    """Where this home's CA key is, as the fleet's store names it: host and home."""
    return f"{socket.gethostname()}:{config.home.resolve()}"


def home_ca_of(config: Config) -> home_ca.FleetCA:
    """This home's CA as `store copy` carries it: public key and fingerprint (None when `ca init` never ran
    here), where its private key is, the last serial issued."""
    line = _public_line(Path(f"{user_ca_path(config)}.pub"))
    return home_ca.FleetCA(line, _fingerprint(line) if line else None, key_home(config), last_serial(config))


def last_serial(config: Config) -> int:
    """The last serial this home issued (0 when none; store copy carries it)."""
    if not Path(f"{user_ca_path(config)}.serial").exists():
        return 0
    with _serials(config) as serials:
        return serials.last()


def _public_line(path: Path) -> str | None:
    try:
        words = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return " ".join(words[:2]) if len(words) >= 2 else None


def _same_key(line: str, other: str) -> bool:
    return line.split()[:2] == other.split()[:2]


def _fingerprint(line: str) -> str:
    return asyncssh.import_public_key(line).get_fingerprint("sha256")


@contextlib.contextmanager
def _fleet_store(config: Config):  # type: ignore[no-untyped-def]
    from ..store.sqlite import Store

    store = Store(config.store)  # its schema checked: an old one says to run `store migrate`
    try:
        yield store
    finally:
        store.close()


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
    if is_postgres(config.store):
        certificate, request = _sign_in_fleet(config, user_key, user, validity, now, principals, source_addresses,
                                              serial)
    else:
        ca = load_user_ca(config)
        with _serials(config) as serials:
            number = serials.next(serial)
            request = signing_request(user, number, validity, config.ca_max_validity, now, principals,
                                      source_addresses)
            certificate = _certificate(ca, user_key, request)
            serials.commit(number)
    line = certificate.export_certificate("openssh").decode()
    return Issued(request, line if line.endswith("\n") else line + "\n", user_key.get_fingerprint("sha256"))


def _certificate(ca: asyncssh.SSHKey, user_key: asyncssh.SSHKey, request: SigningRequest) -> asyncssh.SSHCertificate:
    return ca.generate_user_certificate(
        user_key, request.key_id, serial=request.serial, principals=list(request.principals),
        valid_after=int(request.valid_after.timestamp()), valid_before=int(request.valid_before.timestamp()),
        source_address=[str(n) for n in request.source_addresses] or None,
        permit_port_forwarding=True, permit_x11_forwarding=False, permit_agent_forwarding=False,
        permit_pty=False, permit_user_rc=False, comment=f"{request.user}@bastion",
    )


def _sign_in_fleet(config: Config, user_key: asyncssh.SSHKey, user: str, validity: str, now: datetime,
                   principals: tuple[str, ...], source_addresses: tuple[str, ...],
                   serial: int | None) -> tuple[asyncssh.SSHCertificate, SigningRequest]:
    """Sign with this home's key, which must be the fleet's home CA, the serial taken from the store: the row
    locked, the serial raised and the certificate made in one transaction (the home's file lock taken first,
    then the row's, by every signer). The file is written too, never below the store."""
    with _fleet_store(config) as store:
        fleet = home_ca.read(store)
        path = user_ca_path(config)
        if fleet.public_key is None:
            hint = "run `bastion ca init` here to make this home's CA the fleet's" if path.exists() else \
                "run `bastion ca init` on the node that is to keep its private key"
            raise BastionError(f"the store {store.where} has no home CA yet; {hint}")
        here = _public_line(Path(f"{path}.pub"))
        if not path.exists() or here is None:
            raise BastionError(f"the fleet's home CA key ({fleet.fingerprint}) is not in this home: it is in "
                               f"{fleet.key_home}, where `ca init` ran; sign there")
        if not _same_key(here, fleet.public_key):
            raise BastionError(f"{path} is not the fleet's home CA ({fleet.fingerprint}, whose key is in "
                               f"{fleet.key_home}); sign there")
        ca = load_user_ca(config)
        with _serials(config) as serials, home_ca.locked(store) as row:
            last = max(row.ca.last_serial, serials.last())
            if serial is not None and serial <= last:
                raise BastionError(f"--serial {serial} is not above the last serial issued in the fleet ({last}); "
                                   "serials are never reused, so a revocation by serial names one certificate")
            number = serial if serial is not None else last + 1
            request = signing_request(user, number, validity, config.ca_max_validity, now, principals,
                                      source_addresses)
            certificate = _certificate(ca, user_key, request)
            row.issued(number)
            serials.commit(number)  # before the store's commit: a failure here uses no serial
    return certificate, request


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
