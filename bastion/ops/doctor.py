"""`bastion doctor`: check an install and say, for each thing that is wrong, what it is and how to fix it.

Each check is a pure function from facts to `Finding`s; the few functions that gather the facts (bind a
socket, stat a file, open the database) are at the bottom and say so. A `problem` stops the bastion from
working or makes it unsafe (exit 1); a `warning` is worth a look but the bastion runs (exit 0); a `note` says
how it will run (exit 0).

Checked: the configuration loads; the home is not writable by others; the listen port can be bound (or
this bastion already holds it); host keys exist, are private and load; the database is there, healthy,
current and writable; the clock is not behind the audit log; the policy grants something; every user
has a key; no grant points outside `internal_networks` (the network guard would refuse it anyway); whether
the asyncssh fast path will be on, and if not, why (a note: asyncssh as shipped is slower, not wrong).
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import stat
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Mapping

import psutil

from ..clock import utc_now
from ..config import DEFAULT_HOME, Config, load_config, split_listen
from ..errors import BastionError
from ..policy.certificates import key_fingerprint
from ..policy.model import CertAuthority, Policy, TargetRule
from ..policy.netguard import IPNetwork, NetGuard
from ..policy.revocation import RevokedKeyFiles
from ..policy.signing import HOME_CA, with_home_authority
from ..service.home import HomeAuthority, host_key_problem, user_ca_path
from ..store.schema import MIGRATIONS

OK, NOTE, WARNING, PROBLEM = "ok", "note", "warning", "problem"

CLOCK_SKEW_ALLOWED = timedelta(minutes=5)
EARLIEST_SANE_TIME = datetime.fromisoformat("2024-01-01T00:00:00+00:00")


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # config, transport, home, port, host key, database, clock, policy, users, grants
    level: str  # ok | note | warning | problem
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# ---- pure checks ----------------------------------------------------------------------------------------


def home_findings(home: Path, mode: int | None) -> list[Finding]:
    if mode is None:
        return [Finding("home", PROBLEM, f"{home} does not exist", f"run: bastion --home {home} init")]
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return [Finding("home", PROBLEM, f"{home} is writable by others (mode {stat.S_IMODE(mode):o})",
                        f"run: chmod 700 {home}")]
    return [Finding("home", OK, f"{home} is private")]


@dataclass(frozen=True, slots=True)
class Listener:
    """The process that listens on the port now, as far as the OS tells us."""

    pid: int
    description: str  # "NAME (pid N): COMMAND"
    bastion_home: Path | None  # its --home or BASTION_HOME, when it is a bastion and we may read that


def port_finding(host: str, port: int, error: OSError | None, holder: Listener | None, home: Path) -> Finding:
    """Whether `serve` could listen: `error` is what binding the address raised, `holder` who listens now."""
    where = f"{host}:{port}"
    if error is None:
        return Finding("port", OK, f"{where} can be bound")
    if error.errno == errno.EADDRINUSE:
        if holder is not None and holder.bastion_home is not None and holder.bastion_home == home:
            return Finding("port", OK, f"{where} is held by this bastion, already running (pid {holder.pid})")
        held = f" by {holder.description}" if holder else ""
        fix = "stop whatever listens there, or set another listen address in config.toml"
        if port == 22:
            fix = ("move the host's own sshd off port 22 (`Port 2022` in /etc/ssh/sshd_config, then restart "
                   "ssh), or give the bastion an address of its own (listen = \"ADDRESS:22\")")
        return Finding("port", PROBLEM, f"{where} is already in use{held}", fix)
    if error.errno == errno.EACCES:
        return Finding("port", PROBLEM, f"not allowed to listen on port {port} (ports below 1024 need a privilege)",
                       "run it from deploy/bastion.service (AmbientCapabilities=CAP_NET_BIND_SERVICE), or "
                       "listen on a port >= 1024")
    if error.errno == errno.EADDRNOTAVAIL:
        return Finding("port", PROBLEM, f"{host} is not an address of this machine",
                       "set listen in config.toml to one of this host's addresses, or 0.0.0.0")
    return Finding("port", PROBLEM, f"cannot listen on {where}: {error.strerror or error}",
                   "check the listen address in config.toml")


@dataclass(frozen=True, slots=True)
class HostKeyFacts:
    path: Path
    mode: int | None  # None: the file does not exist
    uid: int | None
    load_error: str | None


def host_key_findings(keys: list[HostKeyFacts], home_uid: int | None) -> list[Finding]:
    present = [k for k in keys if k.mode is not None]
    if not present:
        home = keys[0].path.parent if keys else "HOME"
        return [Finding("host key", PROBLEM, f"no host key in {home}", f"run: bastion --home {home} init")]
    findings = []
    for key in present:
        assert key.mode is not None
        if key.mode & 0o077:
            findings.append(Finding("host key", PROBLEM,
                                    f"{key.path} is readable by others (mode {stat.S_IMODE(key.mode):o}); "
                                    "the server refuses to start", f"run: chmod 600 {key.path}"))
        elif key.load_error is not None:
            findings.append(Finding("host key", PROBLEM, f"{key.path} cannot be loaded: {key.load_error}",
                                    "move it aside and run `bastion init` to make a new one (users must then "
                                    "update known_hosts; see `bastion ssh-config --known-hosts`)"))
        elif home_uid is not None and key.uid != home_uid:
            findings.append(Finding("host key", WARNING,
                                    f"{key.path} is owned by uid {key.uid}, the home by uid {home_uid}",
                                    f"run: chown {home_uid} {key.path} (the service user must read it)"))
        else:
            findings.append(Finding("host key", OK, f"{key.path} is private and loads"))
    return findings


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    path: Path
    mode: int | None  # None: missing
    open_error: str | None = None
    integrity: str = "ok"  # PRAGMA quick_check's first line
    schema_version: int = 0
    write_error: str | None = None
    newest_audit: datetime | None = None


def database_findings(db: DatabaseFacts, current_version: int = len(MIGRATIONS)) -> list[Finding]:
    if db.mode is None:
        return [Finding("database", PROBLEM, f"{db.path} does not exist", f"run: bastion --home {db.path.parent} init")]
    if db.open_error is not None:
        return [Finding("database", PROBLEM, f"{db.path} cannot be opened: {db.open_error}",
                        "check the owner and mode of the file and its directory")]
    if db.integrity != "ok":
        return [Finding("database", PROBLEM, f"{db.path} is damaged: {db.integrity}",
                        "stop the bastion and restore the newest backup (see `bastion backup`)")]
    findings = []
    if db.schema_version > current_version:
        findings.append(Finding("database", PROBLEM,
                                f"schema version {db.schema_version} is newer than this bastion ({current_version})",
                                "upgrade bastion to the version that wrote it"))
    elif db.schema_version < current_version:
        findings.append(Finding("database", WARNING,
                                f"schema version {db.schema_version} is older than {current_version}",
                                "it is migrated at the next start; take a `bastion backup` first"))
    if db.write_error is not None:
        findings.append(Finding("database", PROBLEM, f"{db.path} is not writable: {db.write_error}",
                                f"give the service user the home: chown -R bastion: {db.path.parent} (the "
                                "directory must be writable too, for the -wal and -shm files)"))
    if db.mode & 0o077:
        findings.append(Finding("database", WARNING,
                                f"{db.path} is readable by others (mode {stat.S_IMODE(db.mode):o})",
                                f"run: chmod 600 {db.path}"))
    if not findings:
        findings.append(Finding("database", OK, f"{db.path} is healthy and writable"))
    return findings


def clock_finding(now: datetime, newest_audit: datetime | None) -> Finding:
    """The clock decides expiries; it must not run before the audit log's newest row (or before 2024)."""
    if now < EARLIEST_SANE_TIME:
        return Finding("clock", PROBLEM, f"the clock says {now:%Y-%m-%d}, which cannot be right",
                       "set the time and enable NTP: timedatectl set-ntp true")
    if newest_audit is not None and newest_audit > now + CLOCK_SKEW_ALLOWED:
        behind = newest_audit - now
        return Finding("clock", PROBLEM,
                       f"the clock is {_duration(behind)} behind the newest audit row ({newest_audit:%Y-%m-%d %H:%M}Z)",
                       "expiries are decided by this clock: fix the time and enable NTP (timedatectl set-ntp true)")
    return Finding("clock", OK, f"the clock says {now:%Y-%m-%d %H:%M}Z")


def policy_findings(policy: Policy, users: list[dict]) -> list[Finding]:
    """An empty policy, users without keys, users naming missing groups."""
    findings = []
    if not users:
        findings.append(Finding("policy", WARNING, "there are no users, so nobody can log in",
                                "run: bastion user add NAME --key FILE.pub"))
    elif not any(policy.grants_for(user["name"]) for user in users):
        findings.append(Finding("policy", WARNING, "no user may reach anything: the policy grants nothing",
                                "write a policy file (see policies/example.toml) and run: bastion policy apply FILE"))
    for user in users:
        if not user["keys"] and not policy.cas:  # with a trusted CA (#21) a certificate logs them in
            findings.append(Finding("users", WARNING, f"user {user['name']} has no public key and cannot log in",
                                    f"run: bastion user add {user['name']} --key FILE.pub"))
    for problem in policy.problems():
        findings.append(Finding("policy", WARNING, problem, "define the group, or remove it from the user"))
    if not findings:
        keyless = sum(not user["keys"] for user in users)
        which = f"{keyless} of them with no key, by certificate only" if keyless else "all with keys"
        findings.append(Finding("policy", OK, f"{len(users)} users, {which}; the policy grants access"))
    return findings


def home_ca_findings(policy: Policy, home_ca: CertAuthority | None, key_mode: int | None,
                     fleet: bool = False) -> list[Finding]:
    """The home's user CA (`bastion ca init`, #21): trusted as CA `home`, unless the policy's own [cas.home] holds
    another key (then `ca sign`'s certificates are refused); its private key readable by others. `fleet`: the
    fleet's CA, from the store, its private key in another home (#22)."""
    if home_ca is None:
        return []
    findings = []
    declared = policy.cas.get(HOME_CA)
    fingerprint = key_fingerprint(home_ca.keys[0])
    if declared is not None and fingerprint not in {key_fingerprint(line) for line in declared.keys}:
        findings.append(Finding("home CA", WARNING, f"the policy's [cas.{HOME_CA}] does not hold the home CA key "
                                f"{fingerprint}: certificates from `bastion ca sign` are refused",
                                "put the line of user_ca_key.pub in [cas.home], or name the policy's CA otherwise"))
    else:
        settings = declared or home_ca
        where = "the fleet's, from the store; its private key is in another home" if fleet else "user_ca_key"
        findings.append(Finding("home CA", OK, f"{fingerprint} ({where}) trusted as CA {HOME_CA} "
                                f"(require_known_user = {str(settings.require_known_user).lower()}, "
                                f"principals_as_groups = {str(settings.principals_as_groups).lower()})"))
    if key_mode is not None and key_mode & 0o077:
        findings.append(Finding("home CA", PROBLEM, f"user_ca_key is readable by others (mode {key_mode & 0o777:o})",
                                "run: chmod 600 user_ca_key in the home"))
    return findings


def revoked_keys_findings(paths: tuple[str, ...], files: RevokedKeyFiles) -> list[Finding]:
    """The config's revoked_keys (#21): one that cannot be read or parsed makes the server refuse every key and
    certificate login, so it is a problem; the others, what they hold."""
    if not paths:
        return []
    if files.failure is not None:
        return [Finding("revoked", PROBLEM, f"{files.failure}: the server refuses every key and certificate "
                        "login while it cannot be read", "make it again with ssh-keygen -k (or take it out of "
                        "revoked_keys), then send the server SIGHUP")]
    return [Finding("revoked", OK, f"{path}: {revocations.describe()}") for path, revocations in files.lists]


def expiry_findings(policy: Policy, now: datetime) -> list[Finding]:
    """Users and grants past their `expires`: they refuse quietly, one warning each."""
    return [Finding("policy", WARNING, entry, "renew it (a later expires) or remove it, then: bastion policy apply FILE")
            for entry in policy.expired_entries(now)]


def grant_findings(policy: Policy, guard: NetGuard) -> list[Finding]:
    """Address grants the network guard refuses whatever the policy says: outside `internal_networks`,
    loopback, link-local, the bastion's own addresses. Name grants are checked at connect time."""
    findings = []
    for origin, rule in _all_grants(policy):
        reason = _grant_refusal(rule, guard)
        if reason is not None:
            findings.append(Finding(
                "grants", WARNING, f"{origin}: {rule.text} {reason}; the guard refuses it whatever the policy says",
                "remove the grant, or, if the network really is internal, add it to internal_networks in config.toml",
            ))
    if not findings:
        findings.append(Finding("grants", OK, "every address grant is inside internal_networks"))
    return findings


def _all_grants(policy: Policy) -> list[tuple[str, TargetRule]]:
    rules = [(f"users.{name}.allow", rule) for name, user in policy.users.items() for rule in user.allow]
    rules += [(f"groups.{name}.allow", rule) for name, group in policy.groups.items() for rule in group.allow]
    return rules


def _grant_refusal(rule: TargetRule, guard: NetGuard) -> str | None:
    network = rule.network
    if network is None:
        return None
    if network.num_addresses == 1:
        reason = guard.refusal(network.network_address)
        return None if reason is None else reason.removeprefix(f"{network.network_address} ")
    if any(_within(network, internal) for internal in guard.internal_networks):
        return None
    if any(network.version == internal.version and network.overlaps(internal) for internal in guard.internal_networks):
        return "is partly outside the internal networks"
    return "is outside the internal networks"


def _within(network: IPNetwork, other: IPNetwork) -> bool:
    return network.version == other.version and network.subnet_of(other)  # type: ignore[arg-type]


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


def transport_finding(fast_path: bool, describe: str, reason: str) -> Finding:
    """Whether `serve` will run the fast path (`transport.status()`: on, or off and why)."""
    if fast_path:
        return Finding("transport", OK, describe)
    if reason == "fast_path = false":
        return Finding("transport", NOTE, describe, "set fast_path = true in config.toml for the faster packet path")
    return Finding("transport", NOTE, describe,
                   "install the asyncssh version it was written for: pip install -c requirements.lock bastion")


def summary(findings: list[Finding]) -> str:
    problems = sum(f.level == PROBLEM for f in findings)
    warnings = sum(f.level == WARNING for f in findings)
    if not problems and not warnings:
        return "all checks passed"
    return f"{problems} problem{'s' * (problems != 1)}, {warnings} warning{'s' * (warnings != 1)}"


# ---- gathering the facts (I/O) --------------------------------------------------------------------------


def run_checks(home: Path | None, environ: Mapping[str, str] | None = None) -> list[Finding]:
    """Every check against the install at `home` (or $BASTION_HOME, or the default). Reads only; the one
    write is a transaction that is rolled back, to prove the database is writable."""
    # Resolved as load_config does: a home that is a file would otherwise surface as an unreadable config.
    home_path = Path(home or (os.environ if environ is None else environ).get("BASTION_HOME") or DEFAULT_HOME)
    if home_path.exists() and not home_path.is_dir():
        return [Finding("home", PROBLEM, f"{home_path} is not a directory",
                        "point --home (or BASTION_HOME) at a directory; `bastion init` creates one")]
    try:
        config = load_config(home, environ=environ)
    except BastionError as exc:
        return [Finding("config", PROBLEM, str(exc), "fix the named key (`bastion init` writes every key)")]
    findings = []
    if config.config_file.exists():
        findings.append(Finding("config", OK, f"{config.config_file} loads"))
    else:
        findings.append(Finding("config", WARNING, f"{config.config_file} does not exist; defaults apply",
                                f"run: bastion --home {config.home} init"))
    from ..service.revoked_keys import read_files

    findings += revoked_keys_findings(config.revoked_keys, read_files(config.revoked_keys))  # (#21)
    from .. import transport  # imported here: it loads asyncssh

    status = transport.status(fast_path=config.fast_path)
    findings.append(transport_finding(status.fast_path, status.describe(), status.reason))
    home_stat = _stat(config.home)
    findings += home_findings(config.home, None if home_stat is None else home_stat.st_mode)
    if home_stat is None:
        return findings
    host, port = split_listen(config.listen)
    error = try_bind(host, port)
    holder = listener_of(port) if error is not None else None
    findings.append(port_finding(host, port, error, holder, config.home.resolve()))
    findings += host_key_findings([host_key_facts(p) for p in config.host_key_paths], home_stat.st_uid)
    database = database_facts(config.database)
    findings += database_findings(database)
    findings.append(clock_finding(utc_now(), database.newest_audit))
    if database.mode is not None and database.open_error is None and database.integrity == "ok" \
            and database.schema_version == len(MIGRATIONS):
        findings += _policy_checks(config)
    return findings


def _policy_checks(config: Config) -> list[Finding]:
    from ..gateway.local_addresses import make_guard  # the server's own guard, with this host's addresses
    from ..store.sqlite import Store

    try:
        store = Store(config.store or config.database)  # a shared PostgreSQL store when configured (#22)
        try:
            _, policy = store.load_policy()
            _, fleet_policy = store.policy_in_force()  # with a fleet's home CA from the store (#22)
            users = store.list_users()
        finally:
            store.close()
    except (BastionError, sqlite3.Error) as exc:
        return [Finding("policy", PROBLEM, f"cannot read the policy: {exc}", "see the database finding above")]
    key, home_ca = _stat(user_ca_path(config)), HomeAuthority(config)()
    in_force = with_home_authority(fleet_policy, home_ca)  # as the server has it: users may log in by certificate
    fleet_ca = fleet_policy.cas.get(HOME_CA) if HOME_CA not in policy.cas else None
    return (policy_findings(in_force, users) + expiry_findings(policy, utc_now())
            + grant_findings(policy, make_guard(config))
            + home_ca_findings(policy, home_ca or fleet_ca, None if key is None else key.st_mode,
                               fleet=home_ca is None and fleet_ca is not None))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def try_bind(host: str, port: int) -> OSError | None:
    """Bind (not listen) the address the server would, with the same SO_REUSEADDR; None if it worked."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host}: {exc.strerror}")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def listener_of(port: int) -> Listener | None:
    """The process listening on TCP `port` in this network namespace, if the OS lets us see it."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    pid = next((c.pid for c in connections
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid), None)
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        description = f"{process.name()} (pid {pid}): {' '.join(command)[:120]}"
    except psutil.Error:
        return Listener(pid, f"pid {pid}", None)
    home = None
    if any("bastion" in part for part in command):
        home = _bastion_home_of(process, command)
    return Listener(pid, description, home)


def _bastion_home_of(process: psutil.Process, command: list[str]) -> Path | None:
    """A running bastion's home: its --home flag, else its BASTION_HOME, else the default."""
    try:
        cwd = Path(process.cwd())
        if "--home" in command[:-1]:
            return (cwd / command[command.index("--home") + 1]).resolve()
        flag = next((part for part in command if part.startswith("--home=")), None)
        if flag is not None:
            return (cwd / flag.split("=", 1)[1]).resolve()
        return (cwd / process.environ().get("BASTION_HOME", str(DEFAULT_HOME))).resolve()
    except (psutil.Error, OSError):
        return None


def host_key_facts(path: Path) -> HostKeyFacts:
    info = _stat(path)
    if info is None:
        return HostKeyFacts(path, None, None, None)
    load_error = None if info.st_mode & 0o077 else host_key_problem(path)
    return HostKeyFacts(path, info.st_mode, info.st_uid, load_error)


def database_facts(path: Path) -> DatabaseFacts:
    """Open without creating; quick_check; schema version; a write rolled back; the newest audit time."""
    info = _stat(path)
    if info is None:
        return DatabaseFacts(path, None)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2)
    except sqlite3.Error as exc:
        return DatabaseFacts(path, info.st_mode, open_error=str(exc))
    try:
        try:
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError as exc:  # cannot open, read-only, locked: access, not damage
            return DatabaseFacts(path, info.st_mode, open_error=str(exc))
        except sqlite3.DatabaseError as exc:  # not a database, malformed
            return DatabaseFacts(path, info.st_mode, integrity=str(exc))
        if integrity != "ok":
            return DatabaseFacts(path, info.st_mode, integrity=integrity)
        write_error = None
        try:
            # BEGIN IMMEDIATE alone succeeds on a read-only file in WAL mode; a real (rolled back) write does not.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {int(version)}")
        except sqlite3.Error as exc:
            write_error = str(exc)
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        return DatabaseFacts(path, info.st_mode, schema_version=version, write_error=write_error,
                             newest_audit=_newest_audit(conn) if version else None)
    finally:
        conn.close()


def _newest_audit(conn: sqlite3.Connection) -> datetime | None:
    newest = None
    for table, column in (("auth", "time"), ("sessions", "started_at"), ("channels", "opened_at")):
        try:
            value = conn.execute(f"SELECT max({column}) FROM {table}").fetchone()[0]
        except sqlite3.Error:
            continue
        if value:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            newest = moment if newest is None else max(newest, moment)
    return newest
