"""`bastion user …`: who may log in, with which public keys."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from ..control import notify
from ..errors import BastionError
from ..store import Store, parse_public_keys
from .common import config_of, print_json, print_table

app = typer.Typer(help="Add, list and remove users and their public keys.", no_args_is_help=True)


def _store(ctx: typer.Context) -> Store:
    config = config_of(ctx)
    if not config.database.exists():
        raise BastionError(f"{config.database}: no database; run `bastion --home {config.home} init` first")
    return Store(config.database)


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name as typed in `ssh NAME@bastion`."),
    key: List[Path] = typer.Option(..., "--key", help="OpenSSH public key file (one or more keys); repeatable."),
) -> None:
    """Add a user, or add keys to an existing one.

    Example: bastion user add alice --key ~alice/.ssh/id_ed25519.pub
    """
    keys = []
    for path in key:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise BastionError(f"{path}: cannot read key file: {exc.strerror}") from None
        keys.extend(parse_public_keys(text, str(path)))
    store = _store(ctx)
    try:
        added = store.add_user(name, keys)
    finally:
        store.close()
    for public_key in added:
        typer.echo(f"{name}: added {public_key.key_type} {public_key.fingerprint} {public_key.comment}".rstrip())
    if not added:
        typer.echo(f"{name}: already has these keys; nothing changed")


@app.command("list")
def list_users(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List users with their keys and groups.

    Example: bastion user list --json
    """
    store = _store(ctx)
    try:
        users = store.list_users()
    finally:
        store.close()
    if json:
        print_json(users)
        return
    rows = [
        {
            "user": u["name"],
            "groups": ", ".join(u["groups"]),
            "keys": "\n".join(f"{k['type']} {k['fingerprint']} {k['comment']}".rstrip() for k in u["keys"]) or "(none)",
            "expires": u["expires"],
        }
        for u in users
    ]
    print_table(rows, ["user", "groups", "keys", "expires"], empty="no users")


@app.command("remove")
def remove(ctx: typer.Context, name: str = typer.Argument(..., help="The user to remove.")) -> None:
    """Remove a user, its keys and its policy.

    Example: bastion user remove alice
    """
    store = _store(ctx)
    try:
        store.remove_user(name)
    finally:
        store.close()
    typer.echo(f"removed user {name}")
    _notify(ctx, "user remove")


@app.command("remove-key")
def remove_key(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user."),
    fingerprint: str = typer.Argument(..., help="The key's SHA256:… fingerprint, as `user list` shows it."),
) -> None:
    """Remove one public key from a user.

    Example: bastion user remove-key alice SHA256:abc…
    """
    store = _store(ctx)
    try:
        store.remove_key(name, fingerprint)
    finally:
        store.close()
    typer.echo(f"{name}: removed key {fingerprint}")
    _notify(ctx, "key removed")


def _notify(ctx: typer.Context, why: str) -> None:
    note = notify(config_of(ctx).home, why)
    if note:
        typer.echo(note)
