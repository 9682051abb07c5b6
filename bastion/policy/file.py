"""Policy files (TOML) and their JSON form, to and from `Policy` values.

A file is checked whole before anything is used: one error rejects it, with a message of the
form "FILE:LINE: what is wrong; expected what", so an operator can fix it without reading code.

    [groups.ops]
    allow = ["10.20.0.0/16:22", "*.db.corp.internal:5432", "[fd00:1::/64]:22,443"]

    [users.alice]
    keys = ["ssh-ed25519 AAAA... alice@laptop"]        # optional: keys a policy file adds (and removes again)
    groups = ["ops"]
    allow = ["10.1.2.3:22,8000-8100", {target = "10.9.9.9:22", expires = 2026-12-01T18:00:00Z}]
    deny = ["10.20.0.9"]                                # a deny without ports covers every port
    expires = 2027-01-31T00:00:00Z                      # optional, must carry a timezone
    require_totp = true                                 # optional (#21): a one-time code after the key; also
                                                        # per group: every member then needs one
    require_security_key = true                         # optional (#21), also per group: only security keys
                                                        # (ssh-keygen -t ed25519-sk) log in
    require_user_verification = true                    # optional (#21), also per group: and they assert a
                                                        # PIN or biometric (policy/security_keys.py)

    [cas.corp]                                          # a trusted user CA (#21): its certificates log users in
    key = "ssh-ed25519 AAAA... ca@corp"                 # or keys = [...] (both may be given)
    require_known_user = true                           # default: the login user must be a [users.NAME]
    principals_as_groups = false                        # default; true: a principal naming a group grants its rules

    [revoked]                                           # refused even where a CA or the store accepts (#21)
    serials = { corp = [7, "10-20"] }                   # certificate serials per CA: numbers or "LOW-HIGH"
    key_ids = ["alice@old-laptop"]                      # certificate key ids, of any CA
    fingerprints = ["SHA256:..."]                       # keys: plain, a certificate's key, or a CA's key

tomllib reports no positions for values, so semantic errors find their line by searching the
text for the table, key and value in turn; a good guess is worth more than no line at all.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import binascii
import re
import tomllib
from datetime import datetime, timezone
from typing import Any, NoReturn

from .. import toml_input
from .keys import describe_key, weak_key_reason
from .model import (
    CertAuthority,
    ListenRule,
    RevokedList,
    parse_listen_rule,
    NAME_HINT,
    GroupPolicy,
    Policy,
    PolicyError,
    TargetRule,
    UserPolicy,
    format_time,
    parse_target_rule,
    valid_name,
)

KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
USER_KEYS = ("keys", "groups", "allow", "deny", "listen", "expires", "require_totp")
GROUP_KEYS = ("allow", "deny", "listen", "require_totp")
SECURITY_KEY_FLAGS = ("require_security_key", "require_user_verification")  # (#21) users and groups
USER_KEYS += SECURITY_KEY_FLAGS
GROUP_KEYS += SECURITY_KEY_FLAGS
RULE_KEYS = ("target", "expires")
CA_KEYS = ("key", "keys", "principals_as_groups", "require_known_user")
REVOKED_KEYS = ("serials", "key_ids", "fingerprints")
_SERIAL_MAX = 2**64 - 1
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_RULE_HINT = '; expected HOST[:PORTS] such as "10.1.2.3:22", "*.corp.internal:22,443" or "[fd00::/64]:22"'
_TIME_HINT = "a TOML date-time with a timezone such as 2027-01-31T00:00:00Z"


class PolicyFileError(ValueError):
    """A policy file or stored policy is invalid; the message starts with "FILE:LINE:"."""


class WeakKeyError(PolicyError):
    """A well-formed key too weak to log in with (algorithms.weak_key_reason)."""


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML `text`; `source` names the file in error messages."""
    try:
        data = toml_input.loads(text)  # bounded nesting: a deep file is an error line, not a traceback
    except tomllib.TOMLDecodeError as err:
        raise PolicyFileError(_toml_error(str(err), text, source)) from None
    return _FileReader(text, source).policy(data)


def parse_policy_bytes(raw: bytes, source: str) -> Policy:
    """Parse a policy file's bytes; `source` names it in errors (a file's path)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise PolicyFileError(f"{source}:{line}: not UTF-8 text; expected a UTF-8 TOML file") from None
    return parse_policy(text, source)


def check_key_line(line: str) -> str:
    """Return an OpenSSH public key line "TYPE BASE64 [comment]" unchanged, or raise PolicyError.

    The base64 blob must decode and start with its own type name, which catches keys pasted
    with the wrong type or truncated in the middle -- before the user finds out at login.
    """
    if not isinstance(line, str) or not line.isprintable() or not line.isascii():
        raise PolicyError("a key must be one printable ASCII line")
    parts = line.split(maxsplit=2)
    if len(parts) < 2:
        raise PolicyError("a key must look like 'TYPE BASE64 [comment]'")
    key_type, blob_text = parts[0], parts[1]
    if key_type not in KEY_TYPES:
        raise PolicyError(f"key type {key_type[:40]!r} is not one of {', '.join(sorted(KEY_TYPES))}")
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        raise PolicyError(f"{key_type} key is not valid base64") from None
    length = int.from_bytes(blob[:4], "big")
    if blob[4:4 + length] != key_type.encode():
        raise PolicyError(f"{key_type} key data does not start with its type; is it truncated?")
    weakness = weak_key_reason(blob)
    if weakness:
        raise WeakKeyError(f"{describe_key(blob, parts[2] if len(parts) > 2 else '')}: {weakness}")
    return line


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The JSON-serializable form used by `policy show --json` and the store."""
    return {
        "users": {name: {
            "groups": list(user.groups),
            "allow": [_rule_to_json(rule) for rule in user.allow],
            "deny": [_rule_to_json(rule) for rule in user.deny],
            "listen": [_rule_to_json(rule) for rule in user.listen],
            "expires": None if user.expires is None else format_time(user.expires),
            "keys": None if user.keys is None else list(user.keys),
        } | ({"require_totp": True} if user.require_totp else {})  # absent when false: older readers agree
          | _true_flags(user, SECURITY_KEY_FLAGS)
            for name, user in policy.users.items()},
        "groups": {name: {
            "allow": [_rule_to_json(rule) for rule in group.allow],
            "deny": [_rule_to_json(rule) for rule in group.deny],
            "listen": [_rule_to_json(rule) for rule in group.listen],
        } | ({"require_totp": True} if group.require_totp else {}) | _true_flags(group, SECURITY_KEY_FLAGS)
            for name, group in policy.groups.items()},
    } | ({"cas": {name: {
            "keys": list(ca.keys),
            "principals_as_groups": ca.principals_as_groups,
            "require_known_user": ca.require_known_user,
        } for name, ca in policy.cas.items()}} if policy.cas else {}) \
      | ({"revoked": revoked_to_dict(policy.revoked)} if policy.revoked else {})  # (#21) absent when empty


def policy_from_dict(data: dict[str, Any]) -> Policy:
    """The inverse of `policy_to_dict`; absent keys take their defaults. Raises PolicyFileError."""
    try:
        return Policy(
            users={name: _user_from_json(name, user)
                   for name, user in _mapping(data.get("users", {}), "users").items()},
            groups={name: _group_from_json(name, group)
                    for name, group in _mapping(data.get("groups", {}), "groups").items()},
            cas={name: _ca_from_json(name, ca) for name, ca in _mapping(data.get("cas", {}), "cas").items()},
            revoked=_revoked_from_json(_mapping(data.get("revoked", {}), "revoked")),
        )
    except (PolicyError, TypeError, AttributeError) as err:
        raise PolicyFileError(f"<stored policy>: {err}") from None
    except KeyError as err:
        raise PolicyFileError(f"<stored policy>: missing key {err}") from None


def _rule_to_json(rule: TargetRule) -> str | dict[str, str]:
    if rule.expires is None:
        return rule.text
    return {"target": rule.text, "expires": format_time(rule.expires)}


def _user_from_json(name: str, data: dict[str, Any]) -> UserPolicy:
    _check_name("user", name)
    data = _mapping(data, f"users.{name}")
    keys = data.get("keys")
    return UserPolicy(
        name=name,
        groups=tuple(_check_name("group", g) for g in data.get("groups", ())),
        allow=tuple(_rule_from_json(r, deny=False) for r in data.get("allow", ())),
        deny=tuple(_rule_from_json(r, deny=True) for r in data.get("deny", ())),
        listen=tuple(_listen_from_json(r) for r in data.get("listen", ())),
        expires=_time_from_json(data.get("expires")),
        keys=None if keys is None else tuple(check_key_line(k) for k in keys),
        require_totp=_flag_from_json(data, "require_totp", f"users.{name}"),
        **{flag: _flag_from_json(data, flag, f"users.{name}") for flag in SECURITY_KEY_FLAGS},
    )


def _true_flags(entry: Any, flags: tuple[str, ...]) -> dict[str, bool]:
    """The boolean settings of a user or group that are on, by name; those off are left out, so the dict (and the
    stored JSON) of a policy that does not use them stays as it was."""
    return {flag: True for flag in flags if getattr(entry, flag)}


def _flag_from_json(data: dict[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{where}.{key} must be true or false")
    return value


def _group_from_json(name: str, data: dict[str, Any]) -> GroupPolicy:
    _check_name("group", name)
    data = _mapping(data, f"groups.{name}")
    return GroupPolicy(
        name=name,
        allow=tuple(_rule_from_json(r, deny=False) for r in data.get("allow", ())),
        deny=tuple(_rule_from_json(r, deny=True) for r in data.get("deny", ())),
        listen=tuple(_listen_from_json(r) for r in data.get("listen", ())),
        require_totp=_flag_from_json(data, "require_totp", f"groups.{name}"),
        **{flag: _flag_from_json(data, flag, f"groups.{name}") for flag in SECURITY_KEY_FLAGS},
    )


def _ca_from_json(name: str, data: dict[str, Any]) -> CertAuthority:
    _check_name("CA", name)
    data = _mapping(data, f"cas.{name}")
    keys = tuple(check_key_line(k) for k in data["keys"])
    if not keys:
        raise PolicyError(f"cas.{name} has no keys")
    return CertAuthority(name=name, keys=keys, principals_as_groups=bool(data.get("principals_as_groups", False)),
                         require_known_user=bool(data.get("require_known_user", True)))


def revoked_to_dict(revoked: RevokedList) -> dict[str, Any]:
    """[revoked] as the file writes it: serials per CA as numbers or "LOW-HIGH", key ids, fingerprints."""
    serials: dict[str, list[int | str]] = {}
    for ca, low, high in revoked.serials:
        serials.setdefault(ca, []).append(low if low == high else f"{low}-{high}")
    return {"serials": serials, "key_ids": list(revoked.key_ids), "fingerprints": list(revoked.fingerprints)}


def parse_serials(value: Any) -> tuple[tuple[int, int], ...]:
    """A list of serials, each a number or "LOW-HIGH" (1 <= LOW <= HIGH <= 2**64-1); raises PolicyError."""
    if not isinstance(value, list):
        raise PolicyError('must be a list of serial numbers or "LOW-HIGH" ranges')
    ranges = []
    for item in value:
        if isinstance(item, bool):
            raise PolicyError(f"serial {item!r} is not a number")
        if isinstance(item, int):
            low = high = item
        elif isinstance(item, str) and re.fullmatch(r"\s*\d{1,20}\s*(-\s*\d{1,20}\s*)?", item):
            low_text, _, high_text = item.partition("-")
            low, high = int(low_text), int(high_text or low_text)
        else:
            raise PolicyError(f'serial {str(item)[:40]!r} is not a number or a "LOW-HIGH" range')
        if not 1 <= low <= high <= _SERIAL_MAX:
            raise PolicyError(f"serial range {low}-{high} is outside 1..{_SERIAL_MAX} or runs backwards")
        ranges.append((low, high))
    return tuple(ranges)


def check_fingerprint(value: Any) -> str:
    """A key's "SHA256:…" fingerprint as `ssh-keygen -l` prints it; raises PolicyError."""
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value.strip()):
        raise PolicyError(f"fingerprint {str(value)[:60]!r} is not SHA256:<43 base64 characters> "
                          "(as ssh-keygen -l prints it)")
    return value.strip()


def _revoked_from_json(data: dict[str, Any]) -> RevokedList:
    serials = _mapping(data.get("serials", {}), "revoked.serials")
    return RevokedList(
        serials=tuple((_check_name("CA", ca), low, high) for ca, items in serials.items()
                      for low, high in parse_serials(items)),
        key_ids=tuple(str(k) for k in data.get("key_ids", ())),
        fingerprints=tuple(check_fingerprint(f) for f in data.get("fingerprints", ())),
    )


def _listen_from_json(item: str | dict[str, Any]) -> ListenRule:
    if isinstance(item, str):
        return parse_listen_rule(item)
    item = _mapping(item, "listen rule")
    return _with_expiry(parse_listen_rule(item["target"]), _time_from_json(item.get("expires")))


def _rule_from_json(item: str | dict[str, Any], *, deny: bool) -> TargetRule:
    if isinstance(item, str):
        return parse_target_rule(item, any_port_when_omitted=deny)
    item = _mapping(item, "rule")
    rule = parse_target_rule(item["target"], any_port_when_omitted=deny)
    return _with_expiry(rule, _time_from_json(item.get("expires")))


def _time_from_json(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise PolicyError(f"time {text!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        raise PolicyError(f"time {text!r} has no timezone")
    return moment.astimezone(timezone.utc)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{what} must be a table")
    return value


def _check_name(kind: str, name: str) -> str:
    if not valid_name(name):
        raise PolicyError(f"{kind} name {str(name)[:40]!r} is not valid; expected {NAME_HINT}")
    return name


def _with_expiry(rule: TargetRule | ListenRule, expires: datetime | None) -> TargetRule | ListenRule:
    return dataclasses.replace(rule, expires=expires)


def _toml_error(message: str, text: str, source: str) -> str:
    """Turn tomllib's "Invalid value (at line 3, column 9)" into "FILE:3: Invalid value ..."."""
    match = _TOML_POSITION.search(message)
    if match:
        line, what = match.group(1), f"{message[:match.start()]} at column {match.group(2)}"
    else:  # "(at end of document)"
        line, what = str(text.count("\n") + 1), message
    return f"{source}:{line}: {what}; expected valid TOML"


class _FileReader:
    """Checks the parsed TOML tables and raises PolicyFileError with a line for the first fault."""

    def __init__(self, text: str, source: str) -> None:
        self._text = text
        self._source = source

    def policy(self, data: dict[str, Any]) -> Policy:
        for key in data:
            if key not in ("users", "groups", "cas", "revoked"):
                self._fail(f"unknown top-level key {key!r}; expected [users.NAME] or [groups.NAME] tables, "
                           "[cas.NAME] for a user certificate authority, or [revoked]", key)
        users = self._tables(data.get("users", {}), "users")
        groups = self._tables(data.get("groups", {}), "groups")
        cas = self._tables(data.get("cas", {}), "cas")
        return Policy(
            users={name: self._user(name, table) for name, table in users.items()},
            groups={name: self._group(name, table) for name, table in groups.items()},
            cas={name: self._ca(name, table) for name, table in cas.items()},
            revoked=self._revoked(data.get("revoked", {})),
        )

    def _revoked(self, table: Any) -> RevokedList:
        """[revoked] (#21): serials = { CA = [7, "10-20"] }, key_ids = [...], fingerprints = ["SHA256:..."]."""
        if not isinstance(table, dict):
            self._fail("revoked must be a table: [revoked] with serials, key_ids, fingerprints", "revoked")
        self._known_keys(table, REVOKED_KEYS, ("revoked",))  # type: ignore[arg-type]
        serials = table.get("serials", {})
        if not isinstance(serials, dict):
            self._fail('revoked.serials must be a table of CA names, e.g. serials = { corp = [7, "10-20"] }',
                       "revoked", "serials")
        found = []
        for ca, items in serials.items():
            if not valid_name(ca):
                self._fail(f"revoked.serials: CA name {ca[:40]!r} is not valid; expected {NAME_HINT}",
                           "revoked", "serials", ca)
            try:
                found += [(ca, low, high) for low, high in parse_serials(items)]
            except PolicyError as err:
                self._fail(f"revoked.serials.{ca}: {err}; expected e.g. [7, \"10-20\"]", "revoked", "serials", ca)
        key_ids = table.get("key_ids", [])
        if not isinstance(key_ids, list) or not all(isinstance(k, str) and k for k in key_ids):
            self._fail("revoked.key_ids must be a list of certificate key ids (non-empty strings)",
                       "revoked", "key_ids")
        fingerprints = table.get("fingerprints", [])
        if not isinstance(fingerprints, list):
            self._fail('revoked.fingerprints must be a list of "SHA256:..." key fingerprints', "revoked",
                       "fingerprints")
        checked = []
        for value in fingerprints:
            try:
                checked.append(check_fingerprint(value))
            except PolicyError as err:
                self._fail(f"revoked.fingerprints: {err}", "revoked", "fingerprints", str(value)[:60])
        return RevokedList(serials=tuple(dict.fromkeys(found)), key_ids=tuple(dict.fromkeys(key_ids)),
                           fingerprints=tuple(dict.fromkeys(checked)))

    def _tables(self, value: Any, kind: str) -> dict[str, dict[str, Any]]:
        if not isinstance(value, dict):
            self._fail(f"{kind} must be a table of [{kind}.NAME] tables", kind)
        for name, table in value.items():
            if not valid_name(name):
                self._fail(f"{kind[:-1]} name {name[:40]!r} is not valid; expected {NAME_HINT}",
                           kind, name)
            if not isinstance(table, dict):
                self._fail(f"{kind}.{name} must be a table, e.g. [{kind}.{name}]", kind, name)
        return value

    def _user(self, name: str, table: dict[str, Any]) -> UserPolicy:
        where = ("users", name)
        self._known_keys(table, USER_KEYS, where)
        return UserPolicy(
            name=name,
            groups=self._groups_list(table.get("groups", []), where),
            allow=self._rules(table.get("allow", []), where, "allow"),
            deny=self._rules(table.get("deny", []), where, "deny"),
            listen=self._rules(table.get("listen", []), where, "listen"),
            expires=self._time(table["expires"], f"users.{name}.expires", *where, "expires")
            if "expires" in table else None,
            keys=self._keys(table["keys"], where) if "keys" in table else None,
            require_totp=self._flag(table, "require_totp", where),
            **{flag: self._flag(table, flag, where) for flag in SECURITY_KEY_FLAGS},
        )

    def _group(self, name: str, table: dict[str, Any]) -> GroupPolicy:
        where = ("groups", name)
        self._known_keys(table, GROUP_KEYS, where)
        return GroupPolicy(
            name=name,
            allow=self._rules(table.get("allow", []), where, "allow"),
            deny=self._rules(table.get("deny", []), where, "deny"),
            listen=self._rules(table.get("listen", []), where, "listen"),
            require_totp=self._flag(table, "require_totp", where),
            **{flag: self._flag(table, flag, where) for flag in SECURITY_KEY_FLAGS},
        )

    def _flag(self, table: dict[str, Any], key: str, where: tuple[str, str]) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            self._fail(f"{'.'.join(where)}.{key} must be true or false", *where, key)
        return value

    def _ca(self, name: str, table: dict[str, Any]) -> CertAuthority:
        where = ("cas", name)
        path = f"cas.{name}"
        self._known_keys(table, CA_KEYS, where)
        lines: list[str] = []
        if "key" in table:
            if not isinstance(table["key"], str):
                self._fail(f"{path}.key must be one OpenSSH public key line", *where, "key")
            lines.append(table["key"])
        if "keys" in table:
            if not isinstance(table["keys"], list) or not all(isinstance(k, str) for k in table["keys"]):
                self._fail(f"{path}.keys must be a list of OpenSSH public key lines", *where, "keys")
            lines += table["keys"]
        if not lines:
            self._fail(f"{path} has no key; expected key = \"ssh-ed25519 AAAA... ca@corp\" (the CA's .pub line)",
                       *where)
        for number, line in enumerate(lines, 1):
            try:
                check_key_line(line)
            except PolicyError as err:
                hint = ("use an Ed25519 CA key (ssh-keygen -t ed25519)" if isinstance(err, WeakKeyError)
                        else "expected the line of the CA's .pub file")
                self._fail(f"{path}: key {number}: {err}; {hint}", *where, line[:60])
        flags = {}
        for flag, default in (("principals_as_groups", False), ("require_known_user", True)):
            value = table.get(flag, default)
            if not isinstance(value, bool):
                self._fail(f"{path}.{flag} must be true or false", *where, flag)
            flags[flag] = value
        return CertAuthority(name=name, keys=tuple(dict.fromkeys(lines)), **flags)

    def _known_keys(self, table: dict[str, Any], allowed: tuple[str, ...],
                    where: tuple[str, str]) -> None:
        for key in table:
            if key not in allowed:
                self._fail(f"{'.'.join(where)} has unknown key {key[:40]!r}; allowed keys are "
                           f"{', '.join(allowed)}", *where, key)

    def _groups_list(self, value: Any, where: tuple[str, str]) -> tuple[str, ...]:
        path = f"{'.'.join(where)}.groups"
        if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
            self._fail(f"{path} must be a list of group names", *where, "groups")
        for group in value:
            if not valid_name(group):
                self._fail(f"{path}: group name {group[:40]!r} is not valid; expected {NAME_HINT}",
                           *where, "groups", group)
        return tuple(value)

    def _rules(self, value: Any, where: tuple[str, str], kind: str) -> tuple[TargetRule, ...]:
        path = f"{'.'.join(where)}.{kind}"
        if not isinstance(value, list):
            self._fail(f"{path} must be a list of strings or {{target, expires}} tables",
                       *where, kind)
        rules = []
        for item in value:
            if isinstance(item, dict):
                rules.append(self._rule_table(item, path, where, kind))
            elif isinstance(item, str):
                rules.append(self._rule(item, path, where, kind))
            else:
                self._fail(f"{path} must be a list of strings or {{target, expires}} tables",
                           *where, kind)
        return tuple(rules)

    def _rule_table(self, item: dict[str, Any], path: str, where: tuple[str, str],
                    kind: str) -> TargetRule:
        for key in item:
            if key not in RULE_KEYS:
                self._fail(f"{path}: a rule table has unknown key {key[:40]!r}; allowed keys are "
                           f"{', '.join(RULE_KEYS)}", *where, kind, key)
        target = item.get("target")
        if not isinstance(target, str):
            self._fail(f"{path}: a rule table needs target = \"HOST[:PORTS]\"", *where, kind)
        rule = self._rule(target, path, where, kind)
        if "expires" not in item:
            return rule
        return _with_expiry(rule, self._time(item["expires"], f"{path}: {target!r} expires",
                                             *where, kind, target, "expires"))

    def _rule(self, text: str, path: str, where: tuple[str, str], kind: str) -> TargetRule:
        try:
            if kind == "listen":
                return parse_listen_rule(text)
            return parse_target_rule(text, any_port_when_omitted=(kind == "deny"))
        except PolicyError as err:
            hint = "" if "expected" in str(err) else _RULE_HINT
            self._fail(f"{path}: {err}{hint}", *where, kind, text)

    def _time(self, value: Any, path: str, *needles: str) -> datetime:
        if isinstance(value, datetime) and value.tzinfo is not None:
            return value.astimezone(timezone.utc)
        problem = "has no timezone" if isinstance(value, datetime) else "is not a date-time"
        self._fail(f"{path} {problem}; expected {_TIME_HINT}", *needles)

    def _keys(self, value: Any, where: tuple[str, str]) -> tuple[str, ...]:
        path = f"{'.'.join(where)}.keys"
        if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
            self._fail(f"{path} must be a list of OpenSSH public key lines", *where, "keys")
        for number, line in enumerate(value, 1):
            try:
                check_key_line(line)
            except PolicyError as err:
                hint = ("use an Ed25519 key (ssh-keygen -t ed25519)" if isinstance(err, WeakKeyError)
                        else "expected a line from an id_*.pub file")
                self._fail(f"{path}: key {number}: {err}; {hint}", *where, "keys", line[:60])
        return tuple(value)

    def _fail(self, message: str, *needles: str) -> NoReturn:
        raise PolicyFileError(f"{self._source}:{self._line_of(needles)}: {message}")

    def _line_of(self, needles: tuple[str, ...]) -> int:
        """The line of the last of `needles` found, each searched after the previous one."""
        position = found = 0
        for needle in needles:
            match = re.compile(rf"(?<![\w-]){re.escape(needle)}(?![\w-])").search(
                self._text, position)
            if match is None:
                continue  # e.g. a value written with escapes; keep the line found so far
            position = found = match.start()
        return self._text.count("\n", 0, found) + 1


def to_toml(data: dict) -> str:
    """The policy dict as TOML: [cas.NAME] / [groups.NAME] / [users.NAME] tables of strings, booleans, lists and
    inline tables."""
    lines: list[str] = []
    if data.get("revoked"):  # (#21) one table, not a table per name
        lines.append("[revoked]")
        lines += [f"{key} = {_toml_value(key, value)}" for key, value in data["revoked"].items() if value]
        lines.append("")
    for section in ("cas", "groups", "users"):
        for name, entry in data.get(section, {}).items():
            lines.append(f"[{section}.{name}]")
            for key, value in entry.items():
                if value is None or value == [] or value == ():
                    continue
                lines.append(f"{key} = {_toml_value(key, value)}")
            lines.append("")
    return "\n".join(lines)


def _toml_value(key: str, value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(key, item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(k, v)}" for k, v in value.items() if v is not None) + "}"
    if key == "expires" and isinstance(value, str):
        return value  # an ISO datetime is a bare TOML datetime
    return json.dumps(value)
