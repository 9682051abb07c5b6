"""What the audit filters mean (`--user --since --until --target --denied --session --client --cert-serial
--key-id`), as values and as SQL, in one place. Pure: no connection, no clock (relative times take `now` as an argument).

Addresses are compared by `ip_key()`, a sortable text form (32 hex digits of the IPv6 address, IPv4 as
::ffff:a.b.c.d), so a CIDR is one BETWEEN range; channels store it in the indexed `target_ip_key` column.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..clock import iso
from ..errors import BastionError

TABLES = ("auth", "sessions", "channels", "listeners")
TIME_COLUMN = {"auth": "time", "sessions": "started_at", "channels": "opened_at", "listeners": "opened_at"}

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_NAME = re.compile(r"[A-Za-z0-9_*-][A-Za-z0-9_.*-]*")
MAX_AGE = timedelta(days=365_000)
_TARGET_EXAMPLES = "use e.g. 10.1.2.3, 10.0.0.0/16:22, db.corp.internal:5432, *.corp.internal or [fd00::/64]:22"


class FilterError(BastionError):
    """A filter value that cannot be read; the message says what was expected."""


def parse_moment(text: str, now: datetime) -> datetime:
    """'15m', '2h', '7d', '1w' (that long before `now`) or ISO 8601 ('2026-11-21', '2026-11-21T10:00:00Z');
    a time without zone is UTC."""
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    try:
        if match:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        # in UTC here, so a moment near year 1 or 9999 that UTC cannot hold is refused now, not when it is stored
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except ValueError:
        raise FilterError(f"cannot read time {text!r}: use e.g. 15m, 2h, 7d or 2026-11-21T10:00:00Z") from None
    except OverflowError:  # '99999999d': before year 1, which no datetime holds
        raise FilterError(f"time {text!r} is out of range: the calendar runs from year 1 to 9999") from None


def parse_age(text: str) -> timedelta:
    """'90d', '12h', '2w': a length of time."""
    match = _RELATIVE.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise FilterError(f"cannot read age {text!r}: use e.g. 90d, 12w or 36h")
    try:
        age = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:
        age = MAX_AGE + MAX_AGE
    if age > MAX_AGE:  # a cutoff that long before now would fall before year 1
        raise FilterError(f"age {text!r} is too long: at most 1000 years (365000d)")
    return age


@functools.lru_cache(maxsize=65536)  # the same few thousand client and target addresses, again and again
def ip_key(text: str | None) -> str | None:
    """The sortable key of an address (32 hex digits), or None when `text` is not an IP address."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 4:
        return "00000000000000000000ffff" + address.packed.hex()
    return address.packed.hex()


def _range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[str, str]:
    low, high = ip_key(str(network.network_address)), ip_key(str(network.broadcast_address))
    assert low is not None and high is not None
    return low, high


@dataclass(frozen=True, slots=True)
class TargetFilter:
    """`--target`: an address or network (a key range) or a host name (`*` matches within names), and a port."""

    text: str
    key_range: tuple[str, str] | None
    name: str | None
    port: int | None


def parse_target(text: str) -> TargetFilter:
    """HOST|CIDR[:PORT]; IPv6 with a port in brackets: [fd00::1]:22, [fd00::/64]:22."""
    spec = text.strip()
    host, port = spec, None
    if spec.startswith("["):
        end = spec.find("]")
        rest = spec[end + 1:] if end > 0 else "?"
        if end < 0 or (rest and not rest.startswith(":")):
            raise FilterError(f"cannot read target {text!r}: {_TARGET_EXAMPLES}")
        host = spec[1:end]
        port = _port(rest[1:], text) if rest else None
    elif spec.count(":") == 1:
        host, port_text = spec.split(":")
        port = _port(port_text, text)
    if not host:
        raise FilterError(f"cannot read target {text!r}: {_TARGET_EXAMPLES}")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        network = None
    if network is not None:
        return TargetFilter(text, _range(network), None, port)
    if ":" in host or not _NAME.fullmatch(host):
        raise FilterError(f"cannot read target {text!r}: {_TARGET_EXAMPLES}")
    return TargetFilter(text, None, host.lower(), port)


def parse_client(text: str) -> tuple[str, str]:
    """`--client`: an address or CIDR, as a key range."""
    try:
        return _range(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise FilterError(f"cannot read client {text!r}: use an address or CIDR, e.g. 203.0.113.7 or 10.8.0.0/16") from None


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise FilterError(f"cannot read port in {whole!r}: use a number from 1 to 65535, e.g. 10.0.0.0/16:22")
    return int(text)


@dataclass(frozen=True, slots=True)
class Filters:
    """The filters every audit query shares; None or False means "any"."""

    user: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    target: TargetFilter | None = None
    denied: bool = False
    session: str | None = None
    client: tuple[str, str] | None = None
    limit: int | None = None
    cert_serial: int | None = None  # (#21) logins and sessions by the certificate that logged in
    key_id: str | None = None

    def __post_init__(self) -> None:
        if self.cert_serial is not None and not 0 <= self.cert_serial <= 2**64 - 1:
            raise FilterError("--cert-serial must be a certificate serial, 0 to 18446744073709551615")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise FilterError(f"--until ({iso(self.until)}) is not after --since ({iso(self.since)})")
        if self.limit is not None and self.limit < 1:
            raise FilterError("--limit must be at least 1")


_DENIED = {
    "auth": "result = 'failure'",
    "channels": "decision = 'deny'",
    "listeners": "decision = 'deny'",
    # a session "was refused something": a refused channel or listener
    "sessions": "(EXISTS (SELECT 1 FROM channels c WHERE c.session_id = sessions.id AND c.decision = 'deny') "
    "OR EXISTS (SELECT 1 FROM listeners l WHERE l.session_id = sessions.id AND l.decision = 'deny'))",
}


def where_clause(table: str, filters: Filters, time_first: bool = False) -> tuple[str, list]:
    """The SQL condition (or '') and its parameters for `filters` on `table`. The reading connection must have
    the `ip_key` function (query.open_reader registers it).

    `time_first` keeps SQLite off the target-address index (a unary + on the column), for a wide network in a
    short time window, where walking the window is cheaper than walking every row of the network."""
    if table not in TABLES:
        raise FilterError(f"unknown audit table {table!r}: one of {', '.join(TABLES)}")
    clauses: list[str] = []
    params: list = []
    time_column = TIME_COLUMN[table]
    if filters.user is not None:
        clauses.append("user = ?")
        params.append(filters.user)
    if filters.since is not None:
        clauses.append(f"{time_column} >= ?")
        params.append(iso(filters.since))
    if filters.until is not None:
        clauses.append(f"{time_column} < ?")
        params.append(iso(filters.until))
    if filters.session is not None:
        if table == "auth":
            raise FilterError("--session does not apply to auth rows (a login comes before its session); "
                              "use `bastion audit show SESSION_ID`")
        clauses.append("id = ?" if table == "sessions" else "session_id = ?")
        params.append(filters.session)
    if filters.denied:
        clauses.append(_DENIED[table])
    if filters.client is not None:
        if table in ("auth", "sessions"):
            clauses.append("ip_key(client_ip) BETWEEN ? AND ?")
        else:
            # per row through the sessions primary key: cheap inside a time window, unlike scanning every session
            clauses.append(f"EXISTS (SELECT 1 FROM sessions s WHERE s.id = {table}.session_id "
                           "AND ip_key(s.client_ip) BETWEEN ? AND ?)")
        params.extend(filters.client)
    for value, column in ((filters.cert_serial, "cert_serial"), (filters.key_id, "cert_key_id")):
        if value is None:
            continue
        if table in ("auth", "sessions"):  # (#21) indexed, partial: only certificate rows
            clauses.append(f"{column} = ?")
        else:  # a channel or listener of a session that logged in with that certificate
            clauses.append(f"session_id IN (SELECT id FROM sessions WHERE {column} = ?)")
        params.append(str(value))
    if filters.target is not None:
        if table == "auth":
            raise FilterError("--target does not apply to auth rows; query sessions or channels")
        if table == "listeners":
            sql, more = _target_sql(filters.target, "ip_key(listen_host)", "listen_host", "listen_port")
        else:
            key_column = "+target_ip_key" if time_first else "target_ip_key"
            sql, more = _target_sql(filters.target, key_column, "target_host", "target_port")
            if table == "sessions":
                # a channel opens after its session starts, so the window bounds the channels too
                if filters.since is not None:
                    sql += " AND opened_at >= ?"
                    more.append(iso(filters.since))
                sql = f"id IN (SELECT session_id FROM channels WHERE {sql})"
        clauses.append(sql)
        params.extend(more)
    return " AND ".join(clauses), params


def _target_sql(target: TargetFilter, key_column: str, host_column: str, port_column: str) -> tuple[str, list]:
    clauses: list[str] = []
    params: list = []
    if target.key_range is not None:
        if target.key_range[0] == target.key_range[1]:
            clauses.append(f"{key_column} = ?")
            params.append(target.key_range[0])
        else:
            clauses.append(f"{key_column} BETWEEN ? AND ?")
            params.extend(target.key_range)
    elif target.name is not None and "*" in target.name:
        pattern = target.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").replace("*", "%")
        clauses.append(f"{host_column} LIKE ? ESCAPE '\\'")
        params.append(pattern)
    else:
        clauses.append(f"{host_column} = ? COLLATE NOCASE")
        params.append(target.name)
    if target.port is not None:
        clauses.append(f"{port_column} = ?")
        params.append(target.port)
    return " AND ".join(clauses), params
