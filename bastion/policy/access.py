"""Effective access, both ways: what one user can reach (`effective_grants`), and who can reach one target
(`who_can_reach`), derived from the same policy values `decide.evaluate` decides with.

A `Grant` is one unexpired allow or listen rule as it applies to a user, with the earliest expiry that ends it
(its own or the user's) and the user's deny rules that cut into it. Grants are frozen values, so the grant
sets of two policies can be compared with set arithmetic (a policy diff).

"Cut into": a deny of the same kind (address against address, name against name) whose hosts and ports
overlap the grant's. A deny by address also refuses a name grant whose name happens to resolve into it, and a
deny by name an address grant reached through that name, but which names resolve where is known only when a
channel is opened, so those are not listed here; `who_can_reach` for a resolved target is exact, because it
asks `evaluate` (or, for every port at once, mirrors it step by step).

Pure: no I/O, no clock; `now` is a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .decide import evaluate
from .model import AccessRequest, ListenRule, Policy, PortSet, TargetRule, UserPolicy, name_matches, parse_target_rule
from .netguard import IPAddress, NetGuard, canonical_address

OPEN = "open"  # -L, -W, -D and -J targets
LISTEN = "listen"  # -R binds

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Grant:
    """One thing a user may do now, through one rule. Hashable: compare two policies' grants as sets."""

    kind: str  # OPEN or LISTEN
    target: str  # the rule's host part as written: "10.20.0.0/16", "*.db.corp", "[fd00::/64]", "127.0.0.1"
    ports: str  # "22", "22,8000-8100", "any"
    via: str  # "user alice" or "group ops"
    rule: str  # the rule text as written
    expires: datetime | None  # the earlier of the rule's and the user's expiry
    except_: tuple[str, ...] = ()  # deny rules cutting into this grant, as "users.alice.deny: 10.20.0.9"


@dataclass(frozen=True)
class Reach:
    """One user's answer for one target: granted through `rule` on `ports`, or refused (`allowed` False) although
    a grant of theirs names the target, with the reason (a deny, the user's expiry, an address not covered)."""

    user: str
    allowed: bool
    rule: str  # "groups.ops.allow: 10.20.0.0/16:22"; for a refusal the deciding deny, else the grant refused
    ports: str  # the port asked about, or (any port) the ports this row covers: "22", "8000-8100", "any"
    expires: datetime | None  # when this access ends if nothing else changes; None: never
    reason: str  # "granted", or why not


def effective_grants(policy: Policy, user: str, now: datetime) -> list[Grant]:
    """Every unexpired allow (kind "open") and listen rule that applies to `user` now, own rules first, then
    each group's in the order the user lists them; [] for an unknown or expired user. Duplicates (one rule
    written twice) appear once."""
    user_policy = policy.users.get(user)
    if user_policy is None or _expired(user_policy.expires, now):
        return []
    denials = [(origin, rule) for origin, rule in policy.denials_for(user) if not rule.expired(now)]
    grants: list[Grant] = []
    for origin, rule in policy.grants_for(user):
        if not rule.expired(now):
            cutting = tuple(f"{deny_origin}: {deny.text}" for deny_origin, deny in denials if _cuts_into(deny, rule))
            grants.append(Grant(OPEN, target_text(rule), format_ports(rule.ports.ranges), _via(origin), rule.text,
                                _earliest(rule.expires, user_policy.expires), cutting))
    for origin, listen in policy.rules_for(user, "listen"):
        if not listen.expired(now):
            grants.append(Grant(LISTEN, bind_text(listen), format_ports(listen.ports.ranges), _via(origin),
                                listen.text, _earliest(listen.expires, user_policy.expires)))
    return list(dict.fromkeys(grants))  # open before listen, each in policy order: sorted, and stable


def target_refusal(guard: NetGuard, host: IPAddress | str, addresses: tuple[IPAddress, ...]) -> str | None:
    """Why nobody can reach `host` whatever the policy says (steps 3-4 of evaluate: no address, or the network
    guard refuses one), else None."""
    if not addresses:
        return f"{host} did not resolve to an address"
    for address in addresses:
        reason = guard.refusal(address)
        if reason is not None:
            return reason
    return None


def who_can_reach(policy: Policy, guard: NetGuard, host: IPAddress | str, addresses: tuple[IPAddress, ...],
                  port: int | None, now: datetime) -> list[Reach]:
    """Who can reach `host` (parsed by netguard.parse_host, resolved to `addresses`) at `port`, or at any port
    when `port` is None, sorted by user.

    With a port every user's answer is `evaluate`'s own; the users listed are those it allows, plus those it
    refuses although one of their unexpired grants names the target (the refusal says why). Without a port,
    one row per user and grant with the ports that grant actually opens on this target (denies and other
    addresses taken off), and one refused row per deny that takes ports off. [] when the target is refused for
    everyone (see `target_refusal`, which says why once).
    """
    addresses = tuple(canonical_address(a) for a in addresses)
    if target_refusal(guard, host, addresses) is not None:
        return []
    found: list[Reach] = []
    for name in sorted(policy.users):
        user_policy = policy.users[name]
        if port is None:
            found += _reach_any_port(policy, user_policy, host, addresses, now)
        else:
            found += _reach_port(policy, guard, user_policy, host, addresses, port, now)
    return found


def _reach_port(policy: Policy, guard: NetGuard, user: UserPolicy, host: IPAddress | str,
                addresses: tuple[IPAddress, ...], port: int, now: datetime) -> list[Reach]:
    decision = evaluate(policy, guard, AccessRequest(user.name, host, addresses, port, now))
    grants = [(origin, rule) for origin, rule in policy.grants_for(user.name) if not rule.expired(now)]
    if decision.allowed:
        # access ends when some address loses its last grant, or the user expires
        ends = [_latest(rule.expires for _, rule in grants if rule.matches(host, address, port))
                for address in addresses]
        return [Reach(user.name, True, decision.rule or "", str(port), _earliest(user.expires, *ends), "granted")]
    naming = next((f"{origin}: {rule.text}" for origin, rule in grants
                   if any(rule.matches(host, address, port) for address in addresses)), None)
    if naming is None and decision.rule is None:
        return []  # nothing of theirs names this target: not worth a row
    reason = decision.reason.split("; ask your bastion admin")[0]  # the hint is for the client, not the admin
    return [Reach(user.name, False, decision.rule or naming or "", str(port), None, reason)]


def _reach_any_port(policy: Policy, user: UserPolicy, host: IPAddress | str, addresses: tuple[IPAddress, ...],
                    now: datetime) -> list[Reach]:
    """evaluate() for every port at once: an address needs some grant on the port, and no deny may match the host
    or any address on it. The ports a grant's row shows are its own ports where every address is covered and
    nothing is denied, so the rows' ports together are exactly the ports evaluate() allows."""
    grants = [(origin, rule) for origin, rule in policy.grants_for(user.name) if not rule.expired(now)]
    naming = [(origin, rule) for origin, rule in grants if _names(rule, host, addresses)]
    if not naming:
        return []
    if _expired(user.expires, now):
        origin, rule = naming[0]
        return [Reach(user.name, False, f"{origin}: {rule.text}", format_ports(rule.ports.ranges), None,
                      f"access for {user.name} expired")]
    covered: Ranges = ((1, 65535),)
    for address in addresses:
        covered = _intersect(covered, _union(*(rule.ports.ranges for _, rule in grants
                                               if _names(rule, host, (address,)))))
    denied_rows: list[Reach] = []
    denied: Ranges = ()
    for origin, deny in policy.denials_for(user.name):
        if not deny.expired(now) and _names(deny, host, addresses):
            cut = _difference(_intersect(deny.ports.ranges, covered), denied)
            if cut:
                denied_rows.append(Reach(user.name, False, f"{origin}: {deny.text}", format_ports(cut), None,
                                         "denied by policy"))
            denied = _union(denied, deny.ports.ranges)
    allowed = _difference(covered, denied)
    rows = []
    for origin, rule in naming:
        ports = _intersect(rule.ports.ranges, allowed)
        if ports:
            rows.append(Reach(user.name, True, f"{origin}: {rule.text}", format_ports(ports),
                              _earliest(rule.expires, user.expires), "granted"))
    if not rows and not denied_rows:  # a grant covers one address of several, none the others
        rows.append(Reach(user.name, False, f"{naming[0][0]}: {naming[0][1].text}", "any", None,
                          f"not every address of {host} is granted"))
    return rows + denied_rows


def allowed_ports(reaches: list[Reach], user: str) -> PortSet:
    """The ports `user` may reach, from who_can_reach(port=None) rows (for tests and callers that want a set)."""
    ranges: list[tuple[int, int]] = []
    for reach in reaches:
        if reach.user == user and reach.allowed:
            ranges += parse_port_text(reach.ports)
    return PortSet.from_ranges(ranges)


# ---- the parts of a rule as shown ----------------------------------------------------------------------------


def target_text(rule: TargetRule) -> str:
    """The host part of the rule as written: "[fd00:1::/64]" of "[fd00:1::/64]:22,443", "10.20.0.9" of itself."""
    if rule.text.startswith("["):
        return rule.text[: rule.text.index("]") + 1]
    return rule.text.partition(":")[0]


def bind_text(rule: ListenRule) -> str:
    """The bind part of a listen rule as written; an empty one (":9000") means loopback and says so."""
    written = rule.text.rpartition(":")[0]
    return written or str(rule.bind)


def format_ports(ranges: Ranges) -> str:
    if tuple(ranges) == ((1, 65535),):
        return "any"
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def parse_port_text(text: str) -> Ranges:
    """The inverse of format_ports."""
    if text == "any":
        return ((1, 65535),)
    ranges = []
    for item in text.split(","):
        low, _, high = item.partition("-")
        ranges.append((int(low), int(high or low)))
    return tuple(ranges)


def _via(origin: str) -> str:
    """"users.alice.allow" -> "user alice", "groups.ops.listen" -> "group ops"."""
    section, _, rest = origin.partition(".")
    name = rest.rpartition(".")[0]
    return f"{'user' if section == 'users' else 'group'} {name}"


def _expired(expires: datetime | None, now: datetime) -> bool:
    return expires is not None and now >= expires


def _earliest(*moments: datetime | None) -> datetime | None:
    return min((m for m in moments if m is not None), default=None)


def _latest(moments) -> datetime | None:
    """The last of `moments`, None (never) when any is None or there are none (the caller knows there are some)."""
    moments = list(moments)
    if not moments or any(m is None for m in moments):
        return None
    return max(moments)


def _names(rule: TargetRule, host: IPAddress | str, addresses: tuple[IPAddress, ...]) -> bool:
    """Whether the rule's host part matches the target on some port (TargetRule.matches without the port)."""
    if not rule.ports.ranges:
        return False
    any_port = rule.ports.ranges[0][0]
    return any(rule.matches(host, address, any_port) for address in addresses)


def _cuts_into(deny: TargetRule, grant: TargetRule) -> bool:
    if not _intersect(deny.ports.ranges, grant.ports.ranges):
        return False
    if deny.network is not None and grant.network is not None:
        return deny.network.version == grant.network.version and deny.network.overlaps(grant.network)
    if deny.name_pattern is not None and grant.name_pattern is not None:
        return _patterns_overlap(deny.name_pattern, grant.name_pattern)
    return False  # name against address: decided by DNS when a channel opens (module docstring)


def _patterns_overlap(first: str, second: str) -> bool:
    """Whether some name matches both patterns ('*' within one label, see model.name_matches)."""
    first_labels, second_labels = first.split("."), second.split(".")
    return len(first_labels) == len(second_labels) and all(map(_labels_overlap, first_labels, second_labels))


def _labels_overlap(first: str, second: str) -> bool:
    if "*" not in first:
        return _glob(second, first)
    if "*" not in second:
        return _glob(first, second)
    # Both have a '*': the fixed starts must agree and the fixed ends must agree; then the longer start, every
    # middle piece of both and the longer end, in that order, is a label both match (the stars take the rest).
    first_start, first_end = first.split("*")[0], first.split("*")[-1]
    second_start, second_end = second.split("*")[0], second.split("*")[-1]
    return ((first_start.startswith(second_start) or second_start.startswith(first_start))
            and (first_end.endswith(second_end) or second_end.endswith(first_end)))


def _glob(pattern: str, label: str) -> bool:
    return name_matches(pattern, label)  # one label matched as a one-label name


# ---- port range arithmetic over sorted, merged inclusive ranges -------------------------------------------------


def _union(*sets: Ranges) -> Ranges:
    return PortSet.from_ranges([r for ranges in sets for r in ranges]).ranges


def _intersect(first: Ranges, second: Ranges) -> Ranges:
    found = [(max(a, c), min(b, d)) for a, b in first for c, d in second if max(a, c) <= min(b, d)]
    return PortSet.from_ranges(found).ranges


def _difference(first: Ranges, second: Ranges) -> Ranges:
    left = list(PortSet.from_ranges(list(first)).ranges)
    for low, high in second:
        remaining = []
        for a, b in left:
            if high < a or low > b:
                remaining.append((a, b))
                continue
            if a < low:
                remaining.append((a, low - 1))
            if high < b:
                remaining.append((high + 1, b))
        left = remaining
    return tuple(left)


def guard_refusal(guard: NetGuard, grant: Grant) -> str | None:
    """Why the network guard makes an address grant reach nothing at all, else None: a single address the guard
    refuses (127.0.0.1), or a network that no internal network overlaps. Name grants are decided per address
    when a channel opens, and a network partly refused is still partly reachable: both None."""
    if grant.kind != OPEN:
        return None
    rule = parse_target_rule(grant.rule)
    network = rule.network
    if network is None:
        return None
    if network.num_addresses == 1:
        return guard.refusal(network.network_address)
    if not any(inside.version == network.version and inside.overlaps(network) for inside in guard.internal_networks):
        return f"{target_text(rule)} is not in an internal network"
    return None
