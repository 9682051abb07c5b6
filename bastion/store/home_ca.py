"""The home CA of a fleet on one PostgreSQL store (#22; the CA itself is #21's, ops/ca.py).

One node's home keeps the private key (`user_ca_key`, where `bastion ca init` ran). The store keeps the rest, in
the one row of `home_ca` (pg_schema.py, migration 2):

- the public key, which every node trusts as CA `home` (`trusted`, applied to the snapshot a node holds), so a
  certificate signed on one node logs in on all of them, including nodes that never saw the private key;
- where the private key is (host and home), for the message of a `ca sign` run elsewhere;
- the last serial issued, raised in the transaction of each `ca sign` (its row locked), so two signings
  anywhere in the fleet never share a serial and a revocation by serial names one certificate.

Publishing a CA is a policy change: the version is bumped in the same transaction and every node is told.
On SQLite none of this applies: the home's files (user_ca_key.pub, user_ca_key.serial) are the whole story.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Iterator

from ..clock import iso, utc_now
from ..errors import StoreError
from ..policy.model import Policy
from ..policy.signing import home_authority, with_home_authority

_COLUMNS = "public_key, fingerprint, key_home, last_serial"


@dataclass(frozen=True, slots=True)
class FleetCA:
    public_key: str | None  # "ssh-ed25519 AAAA…", None until one is published
    fingerprint: str | None
    key_home: str | None  # "host:/path/of/the/home" holding the private key
    last_serial: int


def applies(store: Any) -> bool:
    """Whether `store` keeps the home CA (PostgreSQL); a SQLite store leaves it to the home's files."""
    return store.dialect == "postgresql"


def read(store: Any) -> FleetCA:
    with store._lock:
        return row(store._db)


def row(db: Any, lock: bool = False) -> FleetCA:
    """The one row, in the caller's transaction (`lock`: until it ends)."""
    found = db.execute(f"SELECT {_COLUMNS} FROM home_ca WHERE id = 1" + (" FOR UPDATE" if lock else "")).fetchone()
    if found is None:  # the migration inserts it; a database edited by hand
        raise StoreError("the store's home_ca table has no row; run `bastion store migrate`")
    return FleetCA(found[0], found[1], found[2], int(found[3]))


class Locked:
    """The row, locked until the transaction of `locked()` ends: read it, publish a CA, record a serial."""

    def __init__(self, store: Any):
        self._store = store
        self.ca = row(store._db, lock=True)

    def publish(self, line: str, fingerprint: str, key_home: str, last_serial: int = 0) -> None:
        """Make `line` the fleet's home CA (trusted by every node once this commits); the serial never goes down."""
        publish(self._store._db, line, fingerprint, key_home, last_serial)
        self._store._bump_policy_version()  # every node reads the new trust, as after a policy apply
        self.ca = row(self._store._db)

    def issued(self, serial: int) -> None:
        """`serial` was used: the next one is above it (committed with the certificate's signing)."""
        if serial <= self.ca.last_serial:
            raise StoreError(f"serial {serial} is not above the fleet's last ({self.ca.last_serial})")
        self._store._db.execute("UPDATE home_ca SET last_serial = ? WHERE id = 1", [serial])
        self.ca = replace(self.ca, last_serial=serial)


@contextlib.contextmanager
def locked(store: Any) -> Iterator[Locked]:
    """One transaction of the store with the home CA's row locked: concurrent signers anywhere take turns."""
    with store._lock:
        try:
            with store._db.transaction():
                yield Locked(store)
        except store._db.errors as exc:
            raise StoreError(f"{store.where}: the home CA's row: {exc}") from None


def publish(db: Any, line: str, fingerprint: str, key_home: str, last_serial: int = 0) -> None:
    """In the caller's transaction: the public key, where its private key is, and the last serial (raised to
    `last_serial` if that is higher; never lowered)."""
    db.execute("UPDATE home_ca SET public_key = ?, fingerprint = ?, key_home = ?, created_at = ?, "
               "last_serial = CASE WHEN last_serial < ? THEN ? ELSE last_serial END WHERE id = 1",
               [" ".join(line.split()[:2]), fingerprint, key_home, iso(utc_now()), last_serial, last_serial])


def trusted(db: Any, policy: Policy) -> Policy:
    """`policy` (read in the caller's transaction) with the fleet's home CA trusted as `home`, as a single node
    trusts its own (policy/signing.py): unless there is none, or the policy declares `home` itself."""
    ca = row(db)
    return with_home_authority(policy, home_authority(ca.public_key)) if ca.public_key else policy
