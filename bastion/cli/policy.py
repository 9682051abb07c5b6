"""`bastion policy …`: apply policy files, show what is in force, check one decision."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from ..clock import utc_now
from ..errors import BastionError, StoreError
from ..gateway.local_addresses import make_guard
from ..gateway.resolve import resolve
from ..ops.policy_apply import LiveLoss, live_losses
from ..ops.policy_files import load_policy_files
from ..policy.access import Grant
from ..policy.decide import evaluate
from ..policy.file import PolicyFileError, policy_to_dict, to_toml
from ..policy.diff import PolicyDiff, policy_diff
from ..policy.model import AccessRequest, format_time
from ..policy.signing import with_home_authority
from ..service.home import HomeAuthority
from ..store.sqlite import PolicyPlan, PolicyRefused
from ..policy.netguard import TargetError, parse_host, parse_port
from .common import config_of, notify_server, open_store, print_json

app = typer.Typer(help="Apply, show and check the access policy.", no_args_is_help=True)


@app.command("apply")
def apply(
    ctx: typer.Context,
    files: List[Path] = typer.Argument(..., help="Policy files (TOML), or directories of *.toml files."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before removing access (asked only on a terminal)."),
) -> None:
    """Make the policy in force equal to the given files: their groups, users and trusted CAs, nothing else. A user
    the files do not name keeps their keys but loses their grants; keys are never removed unless a policy file added
    them.
    Prints what changes first: access granted and removed, and the live sessions and tunnels that would close.
    All or nothing. Exit 0 applied (or shown, with --dry-run), 1 refused (an invalid policy), 2 bad usage.

    Example: bastion policy apply --dry-run policies/
    """
    config = config_of(ctx)
    for path in files:
        if not path.exists():
            raise BastionError(f"{path}: no such file or directory")  # a mistyped path: bad usage, exit 2
    try:
        declared, paths = load_policy_files(files)
    except PolicyFileError as exc:
        _refused(f"policy not applied: {exc}")
    now = utc_now()
    with open_store(ctx) as store:
        try:
            plan = store.plan_policy(declared)
        except PolicyRefused as exc:
            _refused(str(exc))
        except StoreError as exc:  # a key in a file that cannot be used
            _refused(f"policy not applied: {exc}")
        diff = policy_diff(plan.current, plan.target, now)
        losses = live_losses(config.database, plan, make_guard(config), now)
        for line in describe_plan(diff, plan, losses):
            typer.echo(line)
        for entry in declared.expired_entries(now):
            typer.echo(f"warning: {entry}; it grants nothing", err=True)
        if dry_run:
            typer.echo(f"dry run: nothing changed ({_files(paths)})")
            return
        if (diff.removes_access or plan.keys_removed or losses) and not yes and sys.stdin.isatty():
            if not typer.confirm("Apply, removing the access above?", default=False):
                _refused("policy not applied: not confirmed")
        try:
            store.apply_policy(declared, expected_version=plan.version)
        except PolicyRefused as exc:
            _refused(str(exc))
    typer.echo(f"applied {_files(paths)}: {len(declared.users)} users, {len(declared.groups)} groups")
    notify_server(ctx, "policy apply")


def _refused(message: str) -> NoReturn:
    """An invalid policy is a problem found (exit 1), not bad usage; nothing was changed."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _files(paths: List[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{len(paths)} files"


def describe_plan(diff: PolicyDiff, plan: PolicyPlan, losses: list[LiveLoss]) -> list[str]:
    """The plan as the admin reads it before it happens: one line per change, removals marked "-"."""
    if diff.empty and not plan.keys_added and not plan.keys_removed:
        return ["no change in access"]
    lines = []
    granted = [c for c in diff.changes if c.before is None]
    removed = [c for c in diff.changes if c.after is None]
    changed = [c for c in diff.changes if c.before is not None and c.after is not None]
    if granted:
        lines.append("access granted:")
        lines += [f"  + {c.user}: {_grant(c.after)}" for c in granted]
    if removed:
        lines.append("access removed:")
        lines += [f"  - {c.user}: {_grant(c.before)}" for c in removed]
    if changed:
        lines.append("access changed:")
        lines += [f"  {'-' if c.removes_access else '+'} {c.user}: {_grant(c.after)} (was {_limits(c.before)})"
                  for c in changed]
    if diff.groups_added or diff.groups_removed:
        lines.append("groups: " + ", ".join([f"+ {name}" for name in diff.groups_added]
                                            + [f"- {name}" for name in diff.groups_removed]))
    for name in diff.users_added:
        lines.append(f"new user {name}")
    lines += [f"  + CA {name} trusted for user certificates" for name in diff.cas_added]
    lines += [f"  - CA {name} no longer trusted: its certificates stop working" for name in diff.cas_removed]
    lines += [f"  - CA {name} changed (keys or settings)" for name in diff.cas_changed]
    lines += [f"  - revoked: {entry}" for entry in diff.revoked_added]  # (#21)
    lines += [f"  + no longer revoked: {entry}" for entry in diff.revoked_removed]
    lines += [f"  {'-' if on else '+'} {who}: {field} {'on' if on else 'off'}" for who, field, on in diff.requirements]
    for user, key in plan.keys_added:
        lines.append(f"  + {user}: key {key.key_type} {key.fingerprint} {key.comment}".rstrip())
    for user, key in plan.keys_removed:
        lines.append(f"  - {user}: key {key.key_type} {key.fingerprint} (a policy file added it; none lists it now)")
    if losses:
        lines.append("live sessions affected:")
        lines += [f"  - {loss.user}: {loss.what} (session {loss.session_id}) would close: {loss.reason}"
                  for loss in losses]
    return lines


def _grant(grant: Grant | None) -> str:
    assert grant is not None
    ports = "*" if grant.ports == "any" else grant.ports  # the rule's ports spelled out: "10.1.2.3" is port 22
    return f"{grant.kind} {grant.target}:{ports} via {grant.via}" + _limits(grant, prefix="; ")


def _limits(grant: Grant | None, prefix: str = "") -> str:
    assert grant is not None
    parts = [f"expires {format_time(grant.expires)}" if grant.expires else ""]
    parts += [f"except {', '.join(grant.except_)}" if grant.except_ else ""]
    text = "; ".join(part for part in parts if part)
    if not prefix:
        return text or "no expiry, no exceptions"
    return prefix + text if text else ""


@app.command("show")
def show(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="A user or group name; all when omitted."),
    json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Show the policy in force, as TOML that `policy apply` accepts, or as JSON.

    Example: bastion policy show alice
    """
    with open_store(ctx) as store:
        _, policy = store.policy_in_force()  # a fleet's home CA from the store (#22)
    policy = with_home_authority(policy, HomeAuthority(config_of(ctx))())  # the home CA is in force too (#21)
    data = policy_to_dict(policy)
    for user in data.get("users", {}).values():
        user.pop("keys", None)  # keys are shown by `user list`
    if name is not None:
        data = {
            section: {name: entries[name]} for section, entries in data.items() if name in entries
        }
        if not data:
            raise BastionError(f"no user or group named {name!r} in the policy")
    if json:
        print_json(data)
    else:
        typer.echo(to_toml(data), nl=False)


@app.command("check")
def check(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name."),
    host: str = typer.Argument(..., help="Target host name or address."),
    port: str = typer.Argument("22", help="Target port, 1-65535."),
) -> None:
    """Would NAME be allowed to reach HOST:PORT now? Exit 0 if granted, 1 if refused; prints the deciding
    rule or the reason. Names are resolved here, as the server would. An unknown user, a malformed host or
    a port outside 1-65535 is a usage error (exit 2), not a refusal.

    Example: bastion policy check alice 10.1.2.3 22
    """
    try:  # what the admin typed, checked before anything is looked up: a typo is not a refusal
        target = parse_host(host)
        checked_port = parse_port(port)
    except TargetError as exc:
        raise BastionError(str(exc)) from None
    config = config_of(ctx)
    with open_store(ctx) as store:
        _, policy = store.load_policy()
    if name not in policy.users:
        raise BastionError(f"no user named {name!r} in the policy (see `bastion user list`)")
    if isinstance(target, str):
        addresses = asyncio.run(resolve(target, checked_port, config.resolve_timeout))
        if not addresses:
            typer.echo(f"refused: cannot resolve {target}")
            raise typer.Exit(1)
    else:
        addresses = (target,)
    decision = evaluate(
        policy,
        make_guard(config),
        AccessRequest(user=name, host=target, addresses=addresses, port=checked_port, now=utc_now()),
    )
    shown = ", ".join(str(a) for a in addresses)
    if decision.allowed:
        typer.echo(f"granted: {name} -> {host}:{checked_port} ({shown}) by {decision.rule}")
        return
    typer.echo(f"refused: {decision.reason}" + (f" (rule {decision.rule})" if decision.rule else ""))
    raise typer.Exit(1)
