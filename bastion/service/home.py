"""The home directory: what `init` creates (config.toml, host keys, the database), and the one place the
host keys are read (the server's private keys, the public ones that clients pin)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh

from ..config import Config, render_config
from ..errors import BastionError, ConfigError
from ..policy.model import CertAuthority
from ..policy.signing import home_authority
from ..safe_files import FileExists, write_new
from ..store.sqlite import Store


HOST_KEY_ALGORITHMS = {"ssh_host_ed25519_key": ("ssh-ed25519", {}), "ssh_host_rsa_key": ("ssh-rsa", {"key_size": 3072})}


def initialize(config: Config) -> list[str]:
    """Create what is missing in the home: the directory (0700), config.toml, host keys (0600), the
    database. Never overwrites an existing key or config. Returns what was created."""
    created = []
    home = config.home
    if not home.exists():
        home.mkdir(mode=0o700, parents=True)
        created.append(str(home))
    if not config.config_file.exists():
        _write_private(config.config_file, render_config(config).encode())
        created.append(str(config.config_file))
    for path in config.host_key_paths:
        if path.exists():
            continue
        algorithm, options = HOST_KEY_ALGORITHMS[path.name]
        key = asyncssh.generate_private_key(algorithm, comment="bastion host key", **options)
        _write_private(path, key.export_private_key("openssh"))
        path.with_name(path.name + ".pub").write_bytes(key.export_public_key("openssh"))
        created.append(str(path))
    new_database = not config.database.exists()
    Store(config.database).close()  # creates and migrates
    if new_database:
        os.chmod(config.database, 0o600)
        created.append(str(config.database))
    return created


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, from the first byte (no chmod race)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def load_host_keys(config: Config) -> list[asyncssh.SSHKey]:
    """Read the host keys once, as key objects (given as paths, asyncssh would re-read them per login)."""
    keys = []
    for path in config.host_key_paths:
        if not path.exists():
            continue
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path}: host key is readable by others (mode {mode & 0o777:o}); run: chmod 600 {path}")
        try:
            keys.append(asyncssh.read_private_key(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"{path}: cannot load host key: {exc}") from None
    if not keys:
        raise ConfigError(f"{config.home}: no host key; run `bastion --home {config.home} init`")
    return keys


def host_public_keys(config: Config) -> list[str]:
    """The bastion's public host keys, "TYPE BASE64", from the .pub files `init` wrote (or the private keys)."""
    keys = []
    for path in config.host_key_paths:
        public = Path(f"{path}.pub")
        try:
            if public.exists():
                keys.append(" ".join(public.read_text().split()[:2]))
            elif path.exists():
                keys.append(asyncssh.read_private_key(path).export_public_key("openssh").decode().strip())
        except (OSError, asyncssh.KeyImportError) as exc:
            raise BastionError(f"{path}: cannot read the host key: {exc}") from None
    if not keys:
        raise BastionError(f"{config.home}: no host key; run `bastion --home {config.home} init`")
    return keys


def host_key_problem(path: Path) -> str | None:
    """Why the private host key at `path` cannot be loaded, or None (for `doctor`, which reports, not raises)."""
    try:
        asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        return str(exc)
    return None


# ---- the home's user CA (#21): `bastion ca init` makes it, `bastion ca sign` signs with it, the server trusts it --

USER_CA_KEY = "user_ca_key"


def user_ca_path(config: Config) -> Path:
    return config.home / USER_CA_KEY


def create_user_ca(config: Config) -> str:
    """Make the home's CA key (Ed25519; the private key 0600 from its first byte, never overwriting anything, a
    link included) and its .pub; returns the public key line. FileExists if there is one."""
    path = user_ca_path(config)
    public = path.with_name(path.name + ".pub")
    if not config.home.is_dir():
        raise BastionError(f"{config.home}: no home; run `bastion --home {config.home} init` first")
    for taken in (path, public):
        if os.path.lexists(taken):
            raise FileExists(f"{taken} already exists; bastion ca init never replaces a CA key (certificates it "
                             "signed would stop working)")
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"bastion user CA ({config.home.resolve()})")
    write_new(path, key.export_private_key("openssh"), 0o600)
    line = key.export_public_key("openssh")
    write_new(public, line, 0o644)
    return line.decode().strip()


def load_user_ca(config: Config) -> asyncssh.SSHKey:
    """The home's CA private key, for signing; refused when others may read it."""
    path = user_ca_path(config)
    if not path.exists():
        raise BastionError(f"{path}: no CA key; run `bastion --home {config.home} ca init` first")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: CA key is readable by others (mode {mode & 0o777:o}); run: chmod 600 {path}")
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"{path}: cannot load the CA key: {exc}") from None


class HomeAuthority:
    """The home CA as the policy's CA `home` (policy/signing.py), or None when `ca init` was never run. Read from
    user_ca_key.pub, again only when the file changed (one stat per call), so a running server trusts a CA made
    by `ca init` at its next policy check without a restart."""

    def __init__(self, config: Config):
        self._public = Path(f"{user_ca_path(config)}.pub")
        self._seen: tuple[int, int, int] | None = None
        self._authority: CertAuthority | None = None

    def __call__(self) -> CertAuthority | None:
        try:
            facts = self._public.stat()
        except OSError:
            self._seen, self._authority = None, None
            return None
        seen = (facts.st_ino, facts.st_mtime_ns, facts.st_size)
        if seen != self._seen:
            try:
                words = self._public.read_text(encoding="ascii").split()
            except (OSError, UnicodeDecodeError):
                words = []
            self._authority = home_authority(" ".join(words[:2])) if len(words) >= 2 else None
            self._seen = seen
        return self._authority
