"""`bastion policy …`: apply policy files, show what is in force, check one decision."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

from ..clock import utc_now
from ..errors import BastionError
from ..gateway.local_addresses import make_guard
from ..gateway.resolve import resolve
from ..ops.policy_files import load_policy_file
from ..policy.decide import evaluate
from ..policy.file import PolicyFileError, policy_to_dict, to_toml
from ..policy.model import AccessRequest
from ..policy.netguard import TargetError, parse_host, parse_port
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
    for entry in update.expired_entries(utc_now()):
        typer.echo(f"warning: {entry}; it grants nothing", err=True)
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
        typer.echo(f"granted: {name} -> {host}:{port} ({shown}) by {decision.rule}")
        return
    typer.echo(f"refused: {decision.reason}" + (f" (rule {decision.rule})" if decision.rule else ""))
    raise typer.Exit(1)
