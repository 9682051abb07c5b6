"""`bastion user …`: who may log in, with which public keys."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import BastionError, StoreError
from ..policy.authorized_keys import cert_authority_key, cert_authority_toml
from ..policy.model import valid_name
from ..store.sqlite import parse_public_keys
from . import totp
from .common import notify_server, open_store, print_json, print_table

app = typer.Typer(help="Add, list and remove users and their public keys.", no_args_is_help=True)
app.add_typer(totp.app, name="totp")  # one-time codes after the key (#21)


@app.command("add")
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="User name as typed in `ssh NAME@bastion`."),
    key: List[Path] = typer.Option(..., "--key", help="OpenSSH public key or authorized_keys file; repeatable."),
) -> None:
    """Add a user, or add keys to an existing one. A key file may be an `authorized_keys` file: the options
    from=, expiry-time=, permitopen=, permitlisten=, restrict and no-port-forwarding are kept and enforced,
    and any option the bastion cannot honour is refused by name.

    Example: bastion user add alice --key ~alice/.ssh/id_ed25519.pub
    """
    _add(ctx, name, key, create=True)


@app.command("add-key")
def add_key(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="An existing user."),
    key: List[Path] = typer.Option(..., "--key", help="OpenSSH public key or authorized_keys file; repeatable."),
) -> None:
    """Add keys to an existing user (as `user add`, but a misspelt name is an error, not a new user).

    Example: bastion user add-key alice --key new-laptop.pub
    """
    _add(ctx, name, key, create=False)


def _add(ctx: typer.Context, name: str, paths: List[Path], *, create: bool) -> None:
    _refuse_cert_authorities([(name, path) for path in paths])
    keys = [key for path in paths for key in parse_public_keys(_read_key_file(path), str(path))]
    with open_store(ctx) as store:
        changes = store.add_user(name, keys, create=create)
    _print_changes(name, changes)
    if not changes:
        typer.echo(f"{name}: already has these keys; nothing changed")
    elif any(change == "updated" for _, change in changes):
        notify_server(ctx, "key options changed")


@app.command("import")
def import_keys(
    ctx: typer.Context,
    files: List[Path] = typer.Argument(..., help="authorized_keys files, or directories of per-user key files."),
    user: Optional[str] = typer.Option(None, "--user", help="Whose keys these are (else told by each path)."),
) -> None:
    """Bring existing OpenSSH keys across, options and all, in one transaction (one bad line: nothing imported,
    every bad line named). Without --user the owner comes from the path: `/home/NAME/.ssh/authorized_keys` is
    NAME's, and in a directory each file `NAME` or `NAME.pub` is NAME's. Users are created as needed, with no
    grants: give those with `policy apply`.

    Example: bastion user import /home/*/.ssh/authorized_keys
    """
    sources = _import_sources(files, user)
    _refuse_cert_authorities(sources)
    keys_by_user: dict[str, list] = {}
    problems = []
    for owner, path in sources:
        try:
            keys_by_user.setdefault(owner, []).extend(parse_public_keys(_read_key_file(path), str(path)))
        except StoreError as exc:
            problems.append(str(exc))
    if problems:
        raise BastionError("nothing imported: " + "; ".join(problems))
    with open_store(ctx) as store:
        changes = store.import_keys(keys_by_user)
    total = 0
    for owner, owner_changes in changes.items():
        _print_changes(owner, owner_changes)
        total += len(owner_changes)
    typer.echo(f"imported {len(sources)} files: {total} keys added or changed for {len(changes)} users")
    if total:
        notify_server(ctx, "keys imported")


def _import_sources(files: List[Path], user: Optional[str]) -> list[tuple[str, Path]]:
    sources: list[tuple[str, Path]] = []
    for path in files:
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not entries:
                raise BastionError(f"{path}: no key files in this directory")
            sources += [(user or entry.name.removesuffix(".pub"), entry) for entry in entries]
        elif user is not None:
            sources.append((user, path))
        elif path.name in ("authorized_keys", "authorized_keys2") and path.parent.name == ".ssh" \
                and path.parent.parent.name:
            sources.append((path.parent.parent.name, path))
        else:
            raise BastionError(f"{path}: cannot tell whose keys these are; give --user NAME, or a path like "
                               "/home/NAME/.ssh/authorized_keys")
    return sources


def _refuse_cert_authorities(sources: list[tuple[str, Path]]) -> None:
    """A `cert-authority` line trusts a CA, and trusted CAs are policy (declared in the policy files; an apply
    replaces them), so a key import must not add one that the next apply would remove (#21). Print the ready
    [cas.NAME] lines for a policy file, and refuse the whole import in one line."""
    found: dict[str, dict] = {}  # the key's base64 -> its line's text and who held it
    places = []
    for owner, path in sources:
        for number, line in enumerate(_read_key_file(path).splitlines(), start=1):
            authority = cert_authority_key(line)
            if authority is None:
                continue
            key_text, principals, others = authority
            places.append(f"{path}:{number}")
            entry = found.setdefault(key_text.split()[1] if len(key_text.split()) > 1 else key_text,
                                     {"key": key_text, "users": {}})
            entry["users"][owner] = (principals, others)
    if not found:
        return
    for index, entry in enumerate(found.values(), start=1):
        comment = entry["key"].split()[2].lower() if len(entry["key"].split()) > 2 else ""  # "ca@corp": corp
        name = next((part for part in comment.split("@")[::-1] if valid_name(part)), "imported")
        names = [n for n in (name, f"{name}{index}") if n not in [e.get("name") for e in found.values()]]
        entry["name"] = names[0]
        typer.echo(cert_authority_toml(entry["name"], entry["key"], entry["users"]))
    more = f" (and {len(places) - 1} more)" if len(places) > 1 else ""
    raise BastionError(f"nothing imported: {places[0]}{more}: a cert-authority line trusts a CA, and CAs are "
                       "policy: add the [cas.NAME] lines printed above to a policy file and run `bastion policy "
                       "apply`, then import again without those lines")


def _read_key_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BastionError(f"{path}: cannot read key file: {exc.strerror}") from None
    except UnicodeDecodeError:  # a private key in DER, a backup, any binary file given by mistake
        raise BastionError(f"{path}: not an OpenSSH public key file (not UTF-8 text)") from None


def _print_changes(name: str, changes: list) -> None:
    for public_key, change in changes:
        options = public_key.options.describe()
        typer.echo(f"{name}: {change} {public_key.key_type} {public_key.fingerprint} {public_key.comment}".rstrip()
                   + (f" [{options}]" if options else ""))


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
    rows = []  # one row per key: a fingerprint is never wrapped into another key's line
    for u in users:
        for index, k in enumerate(u["keys"] or [None]):
            rows.append({
                "user": u["name"] if index == 0 else "",
                "groups": ", ".join(u["groups"]) if index == 0 else "",
                "expires": u["expires"] if index == 0 else None,
                "fingerprint": k["fingerprint"] if k else "(no keys)",
                "type": k["type"] if k else "",
                "comment": k["comment"] if k else "",
                "options": k["options"] if k else "",
            })
    print_table(rows, ["user", "fingerprint", "type", "comment", "options", "groups", "expires"], empty="no users",
                # options wrap (a narrowed key must show it is narrowed); the rest is left out first when narrow
                drop=["expires", "groups", "type", "comment"], text={"comment": 12, "options": 16})


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
