"""One frozen, typed Config, loaded TOML < environment < CLI flag (same names everywhere), validated at load.

The file is `HOME/config.toml`; environment variables are `BASTION_<KEY>` (upper case);
CLI flags override both. Errors name the file (or variable) and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import toml_input
from .errors import ConfigError
from .policy.limits import StartupLimit
from .policy.model import PolicyError
from .policy.netguard import DEFAULT_INTERNAL_NETWORKS, IPNetwork, parse_networks
from .policy.signing import parse_validity

DEFAULT_HOME = Path("/var/lib/bastion")
CONFIG_FILE = "config.toml"
DATABASE_FILE = "bastion.db"
HOST_KEY_FILES = ("ssh_host_ed25519_key", "ssh_host_rsa_key")
EVENT_LOOPS = ("uvloop", "asyncio")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Config:
    home: Path = DEFAULT_HOME
    listen: str = "0.0.0.0:22"
    internal_networks: tuple[IPNetwork, ...] = DEFAULT_INTERNAL_NETWORKS
    login_grace_seconds: float = 30.0
    max_auth_tries: int = 6
    connect_timeout: float = 10.0
    resolve_timeout: float = 5.0
    # zlib@openssh.com after login. Off: it rarely pays on a jump host, and inflating costs the server CPU
    # (when on, each packet is bounded by the packet limit, see transport/zlib_limit.py).
    compression: bool = False
    # The AES-GCM/ChaCha20 packet path in transport/ (pins.py); off runs asyncssh as shipped (as any asyncssh
    # other than the version it was written for does anyway). See README, Benchmarks.
    fast_path: bool = True
    # On SIGTERM, open tunnels get this long to finish before connections are closed.
    shutdown_grace_seconds: float = 10.0
    # Before authentication (like sshd's MaxStartups and PerSourcePenalties).
    max_startups: str = "10:30:100"
    penalty_threshold: int = 5
    penalty_seconds: float = 30.0
    penalty_max_seconds: float = 3600.0
    # Sources never penalized nor dropped by max_startups (sshd's PerSourcePenaltyExemptList), e.g. a NAT.
    penalty_exempt: tuple[IPNetwork, ...] = ()
    # Load balancers (CIDRs) whose connections must start with a PROXY protocol header (v1 or v2, HAProxy's
    # send-proxy-v2): the client address in it is the one audited, penalized, limited and matched. Empty: off.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    # After authentication; 0 turns a timeout off.
    unused_timeout_seconds: float = 600.0
    max_session_seconds: float = 43200.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 4
    max_sessions_per_user: int = 20
    max_channels_per_user: int = 200
    # A session refused this many requests (channels, listeners) within a minute is disconnected.
    max_refusals_per_minute: int = 60
    # Processes sharing the port (SO_REUSEPORT), so sessions spread over cores. Limits and penalties
    # are counted per process.
    workers: int = 1
    # "uvloop" (libuv, C) or "asyncio" (the standard library's loop); see README, Benchmarks.
    event_loop: str = "uvloop"
    log_level: str = "INFO"
    # "text" (for people; no timestamps under journald, which adds its own) or "json" (one object a line, for SIEMs)
    log_format: str = "text"
    # Where users are told to jump through in the session banner; defaults to the listen address.
    public_name: str = ""
    # HOST:PORT serving Prometheus metrics over plain HTTP (service/metrics.py); "" (the default) serves none.
    metrics_listen: str = ""
    # Fleet (#22): ship this node's audit events to PostgreSQL, "postgresql://USER@HOST/DB" (a libpq URL; keep a
    # password in ~/.pgpass or PGPASSFILE rather than here). The server writes locally first, as always, and a
    # thread sends the events in order; "" (the default) ships nothing. See README, One audit trail.
    audit_ship_to: str = ""
    # This node's name in the fleet's audit trail: letters, digits, '.', '_', '-'; "" means the host name.
    node_id: str = ""
    # OpenSSH KRLs (ssh-keygen -k) or text files of public keys, like sshd's RevokedKeys (#21): keys and
    # certificates they revoke are refused, and live sessions using them end. Re-read when a file changes and on
    # SIGHUP; one that cannot be read refuses every key and certificate login until it can.
    revoked_keys: tuple[str, ...] = ()
    # The longest validity `bastion ca sign --valid` may give a certificate (#21): 30m, 8h, 2d, 1w.
    ca_max_validity: str = "24h"
    # Where users, keys, CAs and the policy live (#22): "" (the default) is the home's own SQLite file; a
    # "postgresql://USER@HOST/DB" URL is one store shared by several nodes (keep a password in ~/.pgpass or
    # PGPASSFILE, not here). See README, Several nodes on PostgreSQL.
    store: str = ""
    # How long a node keeps serving logins on the policy it holds while a PostgreSQL store is unreachable; then
    # it refuses new logins until the store is back (fail closed). 30s, 5m, 1h.
    store_outage_grace: str = "5m"

    @property
    def node(self) -> str:
        """This node's name in the fleet (#22): node_id, or the host name."""
        return self.node_id or default_node_id()

    @property
    def store_outage_grace_seconds(self) -> float:
        return parse_validity(self.store_outage_grace).total_seconds()

    @property
    def database(self) -> Path:
        return self.home / DATABASE_FILE

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def host_key_paths(self) -> tuple[Path, ...]:
        return tuple(self.home / name for name in HOST_KEY_FILES)

    @property
    def listen_host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_listen(self.listen)[1]


def split_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT', '[::]:22' or ':2222' -> (host, port); raises ValueError with a readable message."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"listen address {text!r} must be HOST:PORT, e.g. 0.0.0.0:22 or [::]:22")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"listen port {port} is outside 0..65535")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def default_node_id() -> str:
    """The host name, as a node id: its first 63 characters of letters, digits, '.', '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:63]
    return name or "node"


_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "home"}
_SECONDS = {name for name, f in _FIELDS.items() if f.type == "float"}
_COUNTS = {name for name, f in _FIELDS.items() if f.type == "int"}
_FLAGS = {name for name, f in _FIELDS.items() if f.type == "bool"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_ZERO_MEANS_OFF = {"shutdown_grace_seconds", "unused_timeout_seconds", "max_session_seconds", "keepalive_interval"}


def _coerce(name: str, value: Any, where: str) -> Any:
    """Turn a TOML/env value into the field's type, or raise ConfigError naming where it came from."""
    try:
        if name in ("internal_networks", "penalty_exempt", "proxy_protocol_from"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("must be a list of CIDR strings")
            networks = parse_networks(value)
            if name == "proxy_protocol_from" and any(n.prefixlen == 0 for n in networks):
                raise ValueError("must name the load balancers, not every address (anyone could claim any address)")
            return networks
        if name == "listen":
            if not isinstance(value, str):
                raise ValueError("must be a string HOST:PORT")
            try:
                split_listen(value)
            except ValueError as exc:  # its message already says "listen address ..." or "listen port ..."
                raise ConfigError(f"{where}: {exc}") from None
            return value
        if name == "revoked_keys":  # (#21) absolute paths
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
                raise ValueError('must be a list of absolute paths of KRL files, e.g. ["/etc/bastion/revoked.krl"]')
            return tuple(dict.fromkeys(value))
        if name == "metrics_listen":
            if not isinstance(value, str):
                raise ValueError("must be a string HOST:PORT, or empty for off")
            if value.strip():
                try:
                    split_listen(value.strip())
                except ValueError:
                    raise ValueError(f"{value!r} must be HOST:PORT, e.g. 127.0.0.1:9122, or empty for off") from None
            return value.strip()
        if name == "store":  # (#22)
            if not isinstance(value, str) or (value.strip() and not value.strip().startswith(
                    ("postgresql://", "postgres://"))):
                raise ValueError('must be a PostgreSQL URL, "postgresql://USER@HOST:PORT/DATABASE", or empty for '
                                 "the home's own SQLite file")
            return value.strip()
        if name == "store_outage_grace":  # (#22)
            try:
                parse_validity(str(value))
            except PolicyError as exc:
                raise ValueError(f"must be a length of time such as 30s or 5m ({exc})") from None
            return str(value).strip()
        if name == "ca_max_validity":
            try:
                parse_validity(str(value))
            except PolicyError as exc:
                raise ValueError(f"must be a length of time such as 8h or 2d ({exc})") from None
            return str(value).strip()
        if name == "audit_ship_to":  # (#22)
            if not isinstance(value, str) or (value.strip() and not value.strip().startswith(
                    ("postgresql://", "postgres://"))):
                raise ValueError('must be a PostgreSQL URL, "postgresql://USER@HOST:PORT/DATABASE", or empty for off')
            return value.strip()
        if name == "node_id":  # (#22)
            if not isinstance(value, str) or (value and not _NODE_ID.fullmatch(value)):
                raise ValueError("must be 1 to 63 letters, digits, '.', '_' or '-' (starting with a letter or "
                                 "digit), or empty for the host name")
            return value
        if name in _FLAGS:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in _TRUE + _FALSE:
                return str(value).strip().lower() in _TRUE
            raise ValueError("must be true or false")
        if name in _SECONDS:
            if isinstance(value, bool):
                raise ValueError("must be a number of seconds")
            number = float(value)
            if not number >= 0 or (number == 0 and name not in _ZERO_MEANS_OFF):
                raise ValueError("must be a number of seconds greater than 0")
            return number
        if name in _COUNTS:
            if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
                raise ValueError("must be a whole number >= 1")
            return int(value)
        if name == "max_startups":
            StartupLimit.parse(str(value))
            return str(value)
        if name == "log_level":
            level = str(value).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
            return level
        if name == "log_format":
            if value not in LOG_FORMATS:
                raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
            return value
        if name == "event_loop":
            if value not in EVENT_LOOPS:
                raise ValueError(f"must be one of {', '.join(EVENT_LOOPS)}")
            return value
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name} {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse config.toml into raw values; a missing file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return toml_input.loads(text)  # bounded nesting: a deep file is an error line, not a traceback
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def load_config(
    home: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config: file, then BASTION_* environment, then `overrides` (CLI flags; None values ignored)."""
    environ = os.environ if environ is None else environ
    home_path = Path(home or environ.get("BASTION_HOME") or DEFAULT_HOME)
    values: dict[str, Any] = {}
    config_path = home_path / CONFIG_FILE
    for name, value in read_config_file(config_path).items():
        if name not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"{config_path}: unknown key {name!r}; known keys: {known}")
        values[name] = _coerce(name, value, str(config_path))
    for name in _FIELDS:
        env_name = f"BASTION_{name.upper()}"
        if env_name in environ:
            values[name] = _coerce(name, environ[env_name], f"environment {env_name}")
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, f"option --{name.replace('_', '-')}")
    return Config(home=home_path, **values)


def render_config(config: Config) -> str:
    """The config.toml that `init` writes: every key with its value, so operators see what they can change."""
    networks = ", ".join(f'"{n}"' for n in config.internal_networks)
    exempt = ", ".join(f'"{n}"' for n in config.penalty_exempt)
    balancers = ", ".join(f'"{n}"' for n in config.proxy_protocol_from)
    return (
        "# bastion configuration. Environment BASTION_<KEY> and CLI flags override these.\n"
        f'listen = "{config.listen}"\n'
        "# Targets must resolve only to addresses inside these networks. Loopback, link-local,\n"
        "# multicast and the bastion's own addresses stay refused unless listed explicitly here.\n"
        f"internal_networks = [{networks}]\n"
        f"login_grace_seconds = {config.login_grace_seconds:g}\n"
        f"max_auth_tries = {config.max_auth_tries}\n"
        f"connect_timeout = {config.connect_timeout:g}\n"
        f"resolve_timeout = {config.resolve_timeout:g}\n"
        "# zlib@openssh.com compression after login (each packet bounded by the packet limit).\n"
        f"compression = {'true' if config.compression else 'false'}\n"
        "# The faster packet path for asyncssh's AES-GCM and ChaCha20 (off: asyncssh as shipped).\n"
        f"fast_path = {'true' if config.fast_path else 'false'}\n"
        f"shutdown_grace_seconds = {config.shutdown_grace_seconds:g}\n"
        f'log_level = "{config.log_level}"\n'
        '# "text" (for people; no timestamps under journald) or "json" (one object a line, for SIEMs).\n'
        f'log_format = "{config.log_format}"\n'
        f'public_name = "{config.public_name}"\n'
        "# Before authentication: drop unauthenticated connections past START:RATE:FULL (like sshd's\n"
        "# MaxStartups); refuse a source (IPv4 address or IPv6 /64) for a growing time after\n"
        "# penalty_threshold connections in a row that never authenticated.\n"
        f'max_startups = "{config.max_startups}"\n'
        f"penalty_threshold = {config.penalty_threshold}\n"
        f"penalty_seconds = {config.penalty_seconds:g}\n"
        f"penalty_max_seconds = {config.penalty_max_seconds:g}\n"
        "# Sources (CIDRs) never penalized nor dropped by max_startups, e.g. a NAT many users share.\n"
        f"penalty_exempt = [{exempt}]\n"
        "# Load balancers (CIDRs) that put a PROXY protocol header (v1 or v2) before each connection; their\n"
        "# connections must have one, nobody else's may. Empty: off. See README, Behind a load balancer.\n"
        f"proxy_protocol_from = [{balancers}]\n"
        "# After authentication (0 turns a timeout off): close sessions with no open channel for this\n"
        "# long, and any session after max_session_seconds; keepalives drop dead clients.\n"
        f"unused_timeout_seconds = {config.unused_timeout_seconds:g}\n"
        f"max_session_seconds = {config.max_session_seconds:g}\n"
        f"keepalive_interval = {config.keepalive_interval:g}\n"
        f"keepalive_count_max = {config.keepalive_count_max}\n"
        f"max_sessions_per_user = {config.max_sessions_per_user}\n"
        f"max_channels_per_user = {config.max_channels_per_user}\n"
        "# A session with this many refused channel or listener requests within a minute is disconnected.\n"
        f"max_refusals_per_minute = {config.max_refusals_per_minute}\n"
        "# Worker processes sharing the port; per-user caps and penalties are counted per worker.\n"
        f"workers = {config.workers}\n"
        '# "uvloop" (faster) or "asyncio" (the standard library\'s loop).\n'
        f'event_loop = "{config.event_loop}"\n'
        "# Prometheus metrics over plain HTTP at http://HOST:PORT/metrics, e.g. \"127.0.0.1:9122\"; empty: off.\n"
        "# No login guards it: keep it on loopback or a management network (counts only, no names or addresses).\n"
        f'metrics_listen = "{config.metrics_listen}"\n'
        "# Several nodes, one store: users, keys and the policy in PostgreSQL, e.g. \"postgresql://bastion@db/bastion\"\n"
        "# (a password belongs in ~/.pgpass); empty: this home's SQLite file. While it is unreachable a node serves\n"
        "# on the policy it holds for store_outage_grace, then refuses new logins until it is back.\n"
        f'store = "{config.store}"\n'
        f'store_outage_grace = "{config.store_outage_grace}"\n'
        "# Fleet: ship the audit events to PostgreSQL, e.g. \"postgresql://bastion@db.internal/bastion\" (a password\n"
        "# belongs in ~/.pgpass); empty: off. node_id names this node there; empty: the host name.\n"
        f'audit_ship_to = "{config.audit_ship_to}"\n'
        f'node_id = "{config.node_id}"\n'
        "# Revoked keys and certificates: OpenSSH KRL files (ssh-keygen -k) or lists of public keys, like sshd's\n"
        "# RevokedKeys. Re-read when they change; one that cannot be read refuses every key and certificate login.\n"
        f"revoked_keys = [{', '.join(json.dumps(path) for path in config.revoked_keys)}]\n"
        "# The longest validity `bastion ca sign --valid` may give a user certificate, e.g. \"8h\" or \"2d\".\n"
        f'ca_max_validity = "{config.ca_max_validity}"\n'
    )
