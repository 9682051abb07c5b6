"""OpenSSH `authorized_keys` lines: the options before a key, and what they mean at a bastion.

    from="10.0.0.0/8,!10.0.0.5",expiry-time="20271231",permitopen="db.internal:5432" ssh-ed25519 AAAA… alice@laptop

Options that mean something here are kept and enforced (sshd(8) AUTHORIZED_KEYS FILE FORMAT):
- `from=`: the source addresses allowed for that key, checked at login. Patterns are addresses with `*`/`?`
  wildcards or CIDR, `!` negates; host names are refused, because matching them needs reverse DNS, which a
  bastion must not trust (sshd's `UseDNS no`, its default).
- `expiry-time=`: the key is refused after that time.
- `permitopen=` / `permitlisten=`: narrow that key's tunnels (-L/-W/-D and -R) further than the policy does.
- `restrict`, `no-port-forwarding`: the key may log in but opens no tunnel (`restrict,port-forwarding` re-allows).
- `no-pty`, `no-X11-forwarding`, `no-agent-forwarding`, `no-user-rc`: already always in force here.
- `no-touch-required`, `verify-required` (#21): a security key's signatures need not assert user presence (touch),
  or must assert user verification (PIN); see policy/security_keys.py. As in sshd, other key types ignore them.
Any other option (`command=`, `environment=`, `cert-authority`, …) is refused by name: silently ignoring a
restriction would grant more than the file says.

Pure: no I/O and no clock; a local time zone for `expiry-time` comes in as an argument.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any

from .model import PolicyError, format_time
from .netguard import IPAddress, canonical_address

# The first word of a key line without options (sshd tries the line as a key first, just as here).
KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-", "rsa-sha2-")

ALWAYS_IN_FORCE = frozenset({"no-pty", "no-x11-forwarding", "no-agent-forwarding", "no-user-rc"})
REFUSED_HINTS = {
    "command": "a bastion runs no commands",
    "environment": "a bastion starts no shell to pass it to",
    "cert-authority": "a trusted CA is policy: declare it as [cas.NAME] in a policy file (see cert_authority_toml)",
    "principals": "only meaningful with cert-authority, which is declared in the policy as [cas.NAME]",
    "tunnel": "tun/tap forwarding is never offered",
    "pty": "a bastion gives no terminal",
    "x11-forwarding": "X11 forwarding is never offered",
    "agent-forwarding": "agent forwarding is never offered",
    "user-rc": "a bastion runs no rc files",
}
SECURITY_KEY_OPTIONS = frozenset({"no-touch-required", "verify-required"})  # (#21)
_EXPIRY = re.compile(r"(\d{8})(\d{4}(\d{2})?)?(Z)?")


@dataclass(frozen=True, slots=True)
class KeyOptions:
    """What an authorized_keys line says about its key; the default restricts nothing."""

    sources: tuple[str, ...] = ()  # one entry per from="…" option; each must match
    expires: datetime | None = None
    permit_open: tuple[str, ...] = ()  # "host:port" as written; port may be "*"
    permit_listen: tuple[str, ...] = ()  # "[host:]port" as written
    port_forwarding: bool = True
    touch_required: bool = True  # False: no-touch-required (a security key's signature need not assert presence)
    verify_required: bool = False  # verify-required: a security key's signature must assert user verification

    @property
    def restricts(self) -> bool:
        return self != KeyOptions()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.sources:
            data["from"] = list(self.sources)
        if self.expires is not None:
            data["expires"] = format_time(self.expires)
        if self.permit_open:
            data["permitopen"] = list(self.permit_open)
        if self.permit_listen:
            data["permitlisten"] = list(self.permit_listen)
        if not self.port_forwarding:
            data["port_forwarding"] = False
        if not self.touch_required:
            data["no_touch_required"] = True
        if self.verify_required:
            data["verify_required"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyOptions:
        expires = data.get("expires")
        return cls(
            sources=tuple(data.get("from", ())),
            expires=datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None,
            permit_open=tuple(data.get("permitopen", ())),
            permit_listen=tuple(data.get("permitlisten", ())),
            port_forwarding=bool(data.get("port_forwarding", True)),
            touch_required=not data.get("no_touch_required", False),
            verify_required=bool(data.get("verify_required", False)),
        )

    def describe(self) -> str:
        """The options in authorized_keys form, for listings ("" when the key is unrestricted)."""
        parts = [f'from="{source}"' for source in self.sources]
        if self.expires is not None:
            parts.append(f'expiry-time="{self.expires:%Y%m%d%H%M%S}Z"')
        if not self.port_forwarding:
            parts.append("no-port-forwarding")
        parts += [f'permitopen="{value}"' for value in self.permit_open]
        parts += [f'permitlisten="{value}"' for value in self.permit_listen]
        parts += ["no-touch-required"] * (not self.touch_required) + ["verify-required"] * self.verify_required
        return ",".join(parts)


def split_line(line: str) -> tuple[str, str]:
    """(options text, key text) of an authorized_keys line; options are "" when the line starts with a key."""
    line = line.strip()
    if line.startswith(KEY_TYPE_PREFIXES):
        return "", line
    quoted = False
    index = 0
    while index < len(line):
        char = line[index]
        if char == "\\" and quoted and line[index + 1:index + 2] == '"':
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char in " \t" and not quoted:
            return line[:index], line[index:].strip()
        index += 1
    if quoted:
        raise PolicyError("unbalanced quote in the options")
    raise PolicyError("no key after the options")


def _tokens(text: str) -> list[tuple[str, str | None]]:
    """name or name="value" items, comma separated, with \\" inside quotes (sshd's auth-options.c)."""
    items: list[tuple[str, str | None]] = []
    index = 0
    while index < len(text):
        match = re.compile(r'[A-Za-z0-9-]+').match(text, index)
        if match is None:
            raise PolicyError(f"cannot read the options at {text[index:index + 20]!r}")
        name = match.group().lower()
        index = match.end()
        value = None
        if text.startswith('="', index):
            index += 2
            chars = []
            while True:
                if index >= len(text):
                    raise PolicyError(f"{name}: unbalanced quote")
                if text.startswith('\\"', index):
                    chars.append('"')
                    index += 2
                    continue
                if text[index] == '"':
                    index += 1
                    break
                chars.append(text[index])
                index += 1
            value = "".join(chars)
        elif text.startswith("=", index):
            raise PolicyError(f"{name}: the value must be in double quotes")
        items.append((name, value))
        if index < len(text):
            if text[index] != ",":
                raise PolicyError(f"expected ',' after option {name}")
            index += 1
            if index == len(text):
                raise PolicyError("an option list may not end with ','")
    return items


def parse_options(text: str, local_zone: tzinfo = timezone.utc) -> KeyOptions:
    """The KeyOptions of an options text ("" gives the default); an option this bastion cannot honour raises
    PolicyError naming it. `local_zone` is the zone of an `expiry-time` without "Z", as sshd uses its own."""
    if not text:
        return KeyOptions()
    sources: list[str] = []
    permit_open: list[str] = []
    permit_listen: list[str] = []
    expires: datetime | None = None
    restrict = explicit_forwarding = no_forwarding = False
    security_key_options: set[str] = set()
    for name, value in _tokens(text):
        valued = name in ("from", "expiry-time", "permitopen", "permitlisten")
        if name in REFUSED_HINTS or (not valued and name not in ALWAYS_IN_FORCE
                                     and name not in ("restrict", "no-port-forwarding", "port-forwarding")
                                     and name not in SECURITY_KEY_OPTIONS):
            hint = REFUSED_HINTS.get(name, "not an option this bastion knows")
            raise PolicyError(f"option {name} is refused: {hint}")
        if valued and value is None:
            raise PolicyError(f'option {name} needs a value: {name}="…"')
        if not valued and value is not None:
            raise PolicyError(f"option {name} takes no value")
        if name == "from":
            sources.append(_check_sources(value))
        elif name == "expiry-time":
            moment = _expiry(value, local_zone)
            expires = moment if expires is None else min(expires, moment)
        elif name == "permitopen":
            permit_open.append(_check_permit(value, name, host_required=True))
        elif name == "permitlisten":
            permit_listen.append(_check_permit(value, name, host_required=False))
        elif name == "restrict":
            restrict = True
        elif name == "no-port-forwarding":
            no_forwarding = True
        elif name == "port-forwarding":
            explicit_forwarding = True
        elif name in SECURITY_KEY_OPTIONS:
            security_key_options.add(name)
    forwarding = not no_forwarding and (not restrict or explicit_forwarding)
    return KeyOptions(tuple(sources), expires, tuple(permit_open), tuple(permit_listen), forwarding,
                      touch_required="no-touch-required" not in security_key_options,
                      verify_required="verify-required" in security_key_options)


def _check_sources(value: str) -> str:
    for pattern in value.split(","):
        body = pattern[1:] if pattern.startswith("!") else pattern
        if not body:
            raise PolicyError(f'from="{value}": empty pattern')
        if "/" in body:
            try:
                ipaddress.ip_network(body, strict=True)
            except ValueError as exc:
                raise PolicyError(f'from="{value}": {body} is not a network ({exc})') from None
        elif not re.fullmatch(r"[0-9A-Fa-f:.*?]+", body) or not (any(c in body for c in "*?") or _is_address(body)):
            raise PolicyError(f'from="{value}": {body} is not an address, address pattern or CIDR; host names '
                              "would need reverse DNS, which the bastion does not trust")
    return value


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _expiry(value: str, local_zone: tzinfo) -> datetime:
    match = _EXPIRY.fullmatch(value)
    if match is None:
        raise PolicyError(f'expiry-time="{value}": expected YYYYMMDD[HHMM[SS]][Z]')
    digits = match.group(1) + (match.group(2) or "0000")
    if len(digits) == 12:
        digits += "00"
    try:
        moment = datetime.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        raise PolicyError(f'expiry-time="{value}": not a valid date and time') from None
    return moment.replace(tzinfo=timezone.utc if match.group(4) else local_zone).astimezone(timezone.utc)


def _check_permit(value: str, name: str, *, host_required: bool) -> str:
    host, port = _split_host_port(value)
    if host_required and not host:
        raise PolicyError(f'{name}="{value}": expected HOST:PORT (PORT may be *)')
    if port != "*" and not (port.isdigit() and 0 < int(port) <= 65535):
        raise PolicyError(f'{name}="{value}": the port must be 1..65535 or *')
    return value


def _split_host_port(value: str) -> tuple[str, str]:
    if ":" not in value:
        return "", value
    host, port = value.rsplit(":", 1)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def wildcard_match(pattern: str, text: str) -> bool:
    """ssh_config PATTERNS: `*` any run of characters, `?` one character, nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


def source_allowed(patterns: str, address: IPAddress) -> bool:
    """sshd's match_host_and_ip with UseDNS off: a negated match refuses, otherwise any match allows."""
    address = canonical_address(address)
    text = str(address)
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if "/" in body:
            network = ipaddress.ip_network(body)
            hit = network.version == address.version and address in network
        else:
            hit = wildcard_match(body.lower(), text)
        if hit and negated:
            return False
        matched = matched or hit
    return matched


def key_login_refusal(options: KeyOptions, address: IPAddress, now: datetime) -> str | None:
    """Why this key may not log in from `address` now, or None."""
    for patterns in options.sources:
        if not source_allowed(patterns, address):
            return f'key not allowed from {address} (from="{patterns}")'
    if options.expires is not None and now >= options.expires:
        return f"key expired at {format_time(options.expires)} (expiry-time)"
    return None


def key_open_refusal(options: KeyOptions, host: str, port: int) -> str | None:
    """Why this key may not open a tunnel to `host`:`port` as the client named it (permitopen compares the
    name as typed, without lookups, as sshd does), or None."""
    if not options.port_forwarding:
        return "this key may not open tunnels (no-port-forwarding or restrict in its authorized_keys line)"
    if not options.permit_open:
        return None
    for value in options.permit_open:
        allowed_host, allowed_port = _split_host_port(value)
        if allowed_host.lower() == host.lower().strip("[]") and allowed_port in ("*", str(port)):
            return None
    return f"this key may only open {', '.join(options.permit_open)} (permitopen)"


def key_listen_refusal(options: KeyOptions, host: str, port: int) -> str | None:
    """Why this key may not listen on `host`:`port` as the client asked (-R), or None. A permitlisten without a
    host allows any bind address the policy grants; a host may hold wildcards, as in sshd."""
    if not options.port_forwarding:
        return "this key may not forward ports (no-port-forwarding or restrict in its authorized_keys line)"
    if not options.permit_listen:
        return None
    for value in options.permit_listen:
        allowed_host, allowed_port = _split_host_port(value)
        host_ok = not allowed_host or wildcard_match(allowed_host.lower(), host.lower().strip("[]"))
        if host_ok and allowed_port in ("*", str(port)):
            return None
    return f"this key may only listen on {', '.join(options.permit_listen)} (permitlisten)"


def cert_authority_key(line: str) -> tuple[str, tuple[str, ...] | None, tuple[str, ...]] | None:
    """(key text, principals= names or None, the line's other option names) when `line` is an authorized_keys
    `cert-authority` line, else None (also for lines that cannot be read: parse_options names their problem)."""
    try:
        options_text, key_text = split_line(line)
        tokens = _tokens(options_text) if options_text else []
    except PolicyError:
        return None
    if "cert-authority" not in [name for name, _ in tokens]:
        return None
    principals = next((value for name, value in tokens if name == "principals"), None)
    listed = tuple(p for p in principals.split(",") if p) if principals is not None else None
    others = tuple(dict.fromkeys(name for name, _ in tokens if name not in ("cert-authority", "principals")))
    return " ".join(key_text.split()), listed, others


CertAuthorityLine = tuple[tuple[str, ...] | None, tuple[str, ...]]  # principals= (None: absent), other options


def cert_authority_toml(name: str, key_text: str, users: dict[str, CertAuthorityLine]) -> str:
    """The `[cas.NAME]` lines of a policy file that trust the CA of an authorized_keys `cert-authority` line
    (#21), with comments where the line meant something the policy says differently. `users`: whose
    authorized_keys held the line, with its principals= and other options.

    In OpenSSH the line trusts the CA for logins as that one user, and principals= lists the certificate
    principals accepted for that login. Here a trusted CA logs in any known user its certificate names as a
    principal (require_known_user = true). principals= naming just that user means the same; any other list,
    and options such as from=, have no equivalent here and are said so, never silently widened or dropped."""
    holders = _printable(", ".join(sorted(users)))
    lines = [f"[cas.{name}]",
             f"# from the cert-authority line in the authorized_keys of {holders}; here it logs in any user of the",
             "# policy whom a certificate it signed names as a principal",
             f"key = {_toml_string(key_text)}",
             "require_known_user = true"]
    for user, (principals, others) in sorted(users.items()):
        shown = _printable(user)
        if principals is not None and principals != (user,):
            lines.append(f'# {shown}: principals="{_printable(",".join(principals))}" has no equivalent here: a '
                         f"certificate must name the login user ({shown}) as a principal")
        if others:
            lines.append(f"# {shown}: options {_printable(','.join(others))} of the line have no equivalent here")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    """A TOML basic string of `text`, made printable first (a key's comment is the file's, maybe hostile)."""
    return '"' + _printable(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
