"""Key pairs made by the real ssh-keygen: the users', the target's and the benchmark's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.processes import SSH_KEYGEN, run


@dataclass(frozen=True, slots=True)
class Key:
    """An ed25519 key pair made by ssh-keygen."""

    path: Path
    pub_path: Path
    public: str  # "ssh-ed25519 AAAA... comment"
    fingerprint: str  # "SHA256:..."


def generate_key(path: Path, comment: str) -> Key:
    path.parent.mkdir(parents=True, exist_ok=True)
    run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True, timeout=10)
    return load_key(path)


def load_key(path: Path) -> Key:
    pub_path = Path(f"{path}.pub")
    listing = run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", pub_path], check=True, timeout=10)
    fingerprint = listing.stdout.decode().split()[1]
    return Key(path, pub_path, pub_path.read_text().strip(), fingerprint)
