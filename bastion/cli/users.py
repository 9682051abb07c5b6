"""`bastion user …`: who may log in, with which public keys."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from ..errors import BastionError
from ..store.sqlite import parse_public_keys
from .common import notify_server, open_store, print_json, print_table

app = typer.Typer(help="Add, list and remove users and their public keys.", no_args_is_help=True)


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
        except UnicodeDecodeError:  # a private key in DER, a backup, any binary file given by mistake
            raise BastionError(f"{path}: not an OpenSSH public key file (not UTF-8 text)") from None
        keys.extend(parse_public_keys(text, str(path)))
    with open_store(ctx) as store:
        added = store.add_user(name, keys)
    for public_key in added:
        typer.echo(f"{name}: added {public_key.key_type} {public_key.fingerprint} {public_key.comment}".rstrip())
    if not added:
        typer.echo(f"{name}: already has these keys; nothing changed")


@app.command("list")
def list_users(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List users with their keys and groups.

    Example: bastion user list --json
    """
    with open_store(ctx) as store:
        users = store.list_users()
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
    with open_store(ctx) as store:
        store.remove_user(name)
    typer.echo(f"removed user {name}")
    notify_server(ctx, "user remove")


@app.command("remove-key")
def remove_key(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user."),
    fingerprint: str = typer.Argument(..., help="The key's SHA256:… fingerprint, as `user list` shows it."),
) -> None:
    """Remove one public key from a user.

    Example: bastion user remove-key alice SHA256:abc…
    """
    with open_store(ctx) as store:
        store.remove_key(name, fingerprint)
    typer.echo(f"{name}: removed key {fingerprint}")
    notify_server(ctx, "key removed")
