"""What the running gateway reads from the store, as an interface: the users' keys, and the policy with its version.
The SQLite backend (sqlite.py) implements it; a second backend (PostgreSQL, for a fleet) can implement the same
without touching gateway/ or policy/. Administration (adding users, applying policy) is the backend's own API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..policy.authorized_keys import KeyOptions
from ..policy.model import Policy


@dataclass(frozen=True, slots=True)
class PublicKey:
    fingerprint: str  # SHA256:...
    key_type: str
    public_key: str  # "TYPE BASE64", no comment
    comment: str
    options: KeyOptions = KeyOptions()  # from its authorized_keys line: from=, expiry-time=, permitopen=, …
    source: str = "cli"  # who added it: "cli" (user add), "import" (user import) or "policy" (a policy file)


class AccessStore(Protocol):
    """Read by the server, from worker threads (implementations must be thread-safe)."""

    def user_keys(self, name: str) -> list[PublicKey]:
        """The user's public keys now; [] for an unknown user."""
        ...

    def policy_version(self) -> int:
        """A number that changes whenever users, keys or the policy change (a cheap 'is mine stale?')."""
        ...

    def load_policy(self) -> tuple[int, Policy]:
        """The policy and the version it belongs to, read together."""
        ...

    def totp_secret(self, name: str) -> tuple[str, int | None] | None:
        """The user's TOTP secret and the last time step accepted (None: none yet); None when not enrolled (#21)."""
        ...

    def totp_accept(self, name: str, step: int) -> bool:
        """Mark the code of `step` used; False when it or a later step already was (atomic across processes)."""
        ...

    def login_refusal(self) -> str | None:
        """Why new logins are refused because of the store itself (#22: a shared store unreachable for longer
        than store_outage_grace); None when logins may go on."""
        ...

    def close(self) -> None: ...
