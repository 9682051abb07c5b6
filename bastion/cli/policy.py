"""`bastion policy …`: apply policy files, show what is in force, check one decision."""

from __future__ import annotations

import json as jsonlib
import socket
from pathlib import Path
from typing import Optional

import typer

from ..db import utc_now
from ..errors import BastionError
from ..netguard import TargetError, parse_host, parse_port
from ..policy import AccessRequest, evaluate
from ..policy_file import PolicyFileError, load_policy_file, policy_to_dict
from ..local_addresses import make_guard
from .common import config_of, notify_server, open_store, print_json

app = typer.Typer(help="Apply, show and check the access policy.", no_args_is_help=True)


@app.command("apply")
def apply(ctx: typer.Context, file: Path = typer.Argument(..., help="Policy file (TOML).")) -> None:
    """Apply a policy file: every user and group in it replaces its previous definition. All or nothing:
    a file with any error changes nothing. Running servers use it from the next channel open.

    Example: bastion policy apply policies/example.toml
    """
    try:
        update = load_policy_file(file)
    except (PolicyFileError, OSError) as exc:
        raise BastionError(f"policy not applied: {exc}") from None
    with open_store(ctx) as store:
        store.apply_policy(update)
    typer.echo(f"applied {file}: {len(update.users)} users, {len(update.groups)} groups")
    notify_server(ctx, "policy apply")


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
        _, policy = store.load_policy()
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
    port: int = typer.Argument(22, help="Target port."),
) -> None:
    """Would NAME be allowed to reach HOST:PORT now? Exit 0 if granted, 1 if refused; prints the deciding
    rule or the reason. Names are resolved here, as the server would.

    Example: bastion policy check alice 10.1.2.3 22
    """
    config = config_of(ctx)
    with open_store(ctx) as store:
        _, policy = store.load_policy()
    try:
        target = parse_host(host)
        checked_port = parse_port(port)
    except TargetError as exc:
        typer.echo(f"refused: {exc}")
        raise typer.Exit(1)
    if isinstance(target, str):
        try:
            infos = socket.getaddrinfo(target, checked_port, type=socket.SOCK_STREAM)
        except OSError as exc:
            typer.echo(f"refused: cannot resolve {target}: {exc}")
            raise typer.Exit(1)
        addresses = tuple(dict.fromkeys(parse_host(info[4][0].split("%")[0]) for info in infos))
    else:
        addresses = (target,)
    decision = evaluate(
        policy,
        make_guard(config),
        AccessRequest(user=name, host=target, addresses=addresses, port=checked_port, now=utc_now()),
    )
    shown = ", ".join(str(a) for a in addresses)
    if decision.allowed:
        typer.echo(f"granted: {name} -> {host}:{port} ({shown}) by {decision.rule}")
        return
    typer.echo(f"refused: {decision.reason}" + (f" (rule {decision.rule})" if decision.rule else ""))
    raise typer.Exit(1)


def to_toml(data: dict) -> str:
    """The policy dict as TOML: [users.NAME] / [groups.NAME] tables of strings, lists and inline tables."""
    lines: list[str] = []
    for section in ("groups", "users"):
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
    return jsonlib.dumps(value)
