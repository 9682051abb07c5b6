"""`bastion access USER` and `bastion access --to HOST[:PORT]`: effective access, both ways, from the policy in
force (policy/access.py), names resolved here as the server would."""

from __future__ import annotations

import asyncio
from typing import Optional

import typer

from ..clock import utc_now
from ..errors import BastionError
from ..gateway.local_addresses import make_guard
from ..gateway.resolve import resolve
from ..policy.access import effective_grants, guard_refusal, target_refusal, who_can_reach
from ..policy.model import DEFAULT_PORT, format_time
from ..policy.netguard import IPAddress, TargetError, parse_host, parse_port
from .common import config_of, open_store, print_json, print_table


def access(
    ctx: typer.Context,
    user: Optional[str] = typer.Argument(None, help="A user: every target and port range they can reach now."),
    to: Optional[str] = typer.Option(None, "--to", metavar="HOST[:PORT]",
                                     help="Who can reach this target now, and why: a name, an IPv4 address or "
                                     "[IPv6], with :PORT or every port when omitted."),
    json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show effective access: what USER can reach (through which rule, expiring when, which denies cut into it),
    or with --to who can reach HOST[:PORT] (decided exactly as the gateway would, network guard included).
    Give USER or --to, not both.

    Example: bastion access alice

    Example: bastion access --to db.internal:5432
    """
    if (user is None) == (to is None):
        raise BastionError("give a USER or --to HOST[:PORT], not both or neither; see `bastion access --help`")
    if user is not None:
        _user_access(ctx, user, json)
    else:
        assert to is not None
        _target_access(ctx, to, json)


def _user_access(ctx: typer.Context, user: str, json: bool) -> None:
    with open_store(ctx) as store:
        _, policy = store.load_policy()
    user_policy = policy.users.get(user)
    if user_policy is None:
        raise BastionError(f"no user named {user!r} in the policy (see `bastion user list`)")
    now = utc_now()
    grants = effective_grants(policy, user, now)
    guard = make_guard(config_of(ctx))
    refused = [guard_refusal(guard, g) for g in grants]
    expired = user_policy.expires is not None and now >= user_policy.expires
    if json:
        print_json({
            "user": user,
            "expires": _time(user_policy.expires),
            "expired": expired,
            "grants": [{"kind": g.kind, "target": g.target, "ports": g.ports, "via": g.via, "rule": g.rule,
                        "expires": _time(g.expires), "except": list(g.except_), "guard_refuses": why}
                       for g, why in zip(grants, refused)],
        })
        return
    if expired:
        typer.echo(f"{user} can reach nothing: access expired at {format_time(user_policy.expires)}")
        return
    if not grants:
        typer.echo(f"{user} can reach nothing: no unexpired grants")
        return
    # a cell is one line (print_table shows a newline as "\n"), so several denies are joined with "; "
    rows = [{"kind": g.kind, "target": g.target, "ports": g.ports, "via": g.via, "expires": _time(g.expires) or "never",
             "except": "; ".join([*g.except_, *([f"all: {why} (network guard)"] if why else [])])}
            for g, why in zip(grants, refused)]
    # narrow: the denies are shortened before any column goes, and the expiry goes first
    print_table(rows, ["kind", "target", "ports", "via", "expires", "except"], title=f"what {user} can reach",
                drop=["expires", "via"], text={"except": 20})


def _target_access(ctx: typer.Context, to: str, json: bool) -> None:
    host_text, port_text = split_target(to)
    try:
        host = parse_host(host_text)
        port = parse_port(port_text) if port_text is not None else None
    except TargetError as exc:
        raise BastionError(f"--to {to!r}: {exc}") from None
    config = config_of(ctx)
    with open_store(ctx) as store:
        _, policy = store.load_policy()
    addresses: tuple[IPAddress, ...]
    if isinstance(host, str):
        addresses = asyncio.run(resolve(host, port or DEFAULT_PORT, config.resolve_timeout))
        if not addresses:
            raise BastionError(f"--to {to!r}: cannot resolve {host}")
    else:
        addresses = (host,)
    guard = make_guard(config)
    now = utc_now()
    refusal = target_refusal(guard, host, addresses)
    reaches = who_can_reach(policy, guard, host, addresses, port, now)
    shown = _endpoint(host, port)
    if json:
        print_json({
            "target": _endpoint(host, None), "port": port, "addresses": [str(a) for a in addresses],
            "refused": refusal,
            "reach": [{"user": r.user, "allowed": r.allowed, "ports": r.ports, "rule": r.rule,
                       "expires": _time(r.expires), "reason": r.reason} for r in reaches],
        })
        return
    if isinstance(host, str):
        typer.echo(f"{host} resolves to {', '.join(str(a) for a in addresses)}")
    if refusal is not None:
        typer.echo(f"nobody can reach {shown}: {refusal} (the network guard refuses it whatever the policy grants)")
        return
    title = f"who can reach {shown}"
    if not any(r.allowed for r in reaches):
        typer.echo(f"nobody can reach {shown}")
        if not reaches:
            return
        title = "refused, though a grant names it"
    rows = [{"user": r.user, "access": "granted" if r.allowed else "refused", "ports": r.ports, "rule": r.rule,
             "expires": (_time(r.expires) or "never") if r.allowed else "", "why": "" if r.allowed else r.reason}
            for r in reaches]
    columns = ["user", "access", "ports", "rule"]
    columns += ["expires"] * any(r.allowed for r in reaches) + ["why"] * (not all(r.allowed for r in reaches))
    print_table(rows, columns, title=title, drop=["expires"], text={"rule": 24, "why": 16})


def split_target(text: str) -> tuple[str, str | None]:
    """"db.internal:5432" -> ("db.internal", "5432"); "[fd00::1]:22" -> ("[fd00::1]", "22"); "10.1.2.3" and
    "fd00::1" (IPv6 without brackets, so no port) -> (text, None)."""
    if text.startswith("[") and "]:" in text:
        host, _, port = text.rpartition(":")
        return host, port
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None


def _endpoint(host: IPAddress | str, port: int | None) -> str:
    shown = f"[{host}]" if not isinstance(host, str) and host.version == 6 else str(host)
    return shown if port is None else f"{shown}:{port}"


def _time(moment) -> str | None:
    return None if moment is None else format_time(moment)
