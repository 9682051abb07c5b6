"""`bastion store …` (#22): the shared PostgreSQL store's schema, and moving a single node's SQLite state into it."""

from __future__ import annotations

from typing import Optional

import typer

from ..errors import BastionError
from .common import config_of

app = typer.Typer(help="The store of users, keys and policy: migrate a PostgreSQL one, copy SQLite into it.",
                  no_args_is_help=True)


@app.command("migrate")
def migrate(
    ctx: typer.Context,
    url: Optional[str] = typer.Option(None, "--url", help="A postgresql:// URL of a store; default: `store` in "
                                                          "config.toml."),
    audit_url: Optional[str] = typer.Option(None, "--audit-url", help="A postgresql:// URL of a fleet's audit "
                                                                      "trail; default: `audit_ship_to`."),
) -> None:
    """Create or upgrade the schemas in PostgreSQL: the store of users and policy (`store`) and the fleet's
    audit trail (`audit_ship_to`), each with its own version table; one database may hold both. Run it once,
    from any node, before the nodes use them and after upgrading bastion: nodes and other commands never
    change a shared schema, they say to run this. With --url or --audit-url, only what is named. The home's
    own SQLite file needs nothing: it migrates itself when opened.

    Example: bastion store migrate    |    bastion store migrate --url postgresql://bastion@db.internal/bastion
    """
    from ..audit import fleet
    from ..store import pg_schema
    from ..store.dialect import connect, is_postgres, redact

    if url is None and audit_url is None:
        config = config_of(ctx)
        url = config.store if is_postgres(config.store) else None
        audit_url = config.audit_ship_to or None
        if url is None and audit_url is None:
            typer.echo("this home's store is its SQLite file, which migrates itself when opened, and it ships no "
                       "audit (audit_ship_to is not set); nothing to do")
            return
    for name, given in (("--url", url), ("--audit-url", audit_url)):
        if given is not None and not is_postgres(given):
            raise BastionError(f"{name} must be a postgresql:// URL, not {redact(given)!r}")
    if url is not None:
        conn = connect(url)
        try:
            before, after = pg_schema.migrate(conn)
        finally:
            conn.close()
        _migrated(redact(url), "store", before, after)
    if audit_url is not None:
        trail = fleet.connect(audit_url)
        try:
            before, after = fleet.migrate(trail)
        finally:
            trail.close()
        _migrated(redact(audit_url), "audit trail", before, after)


def _migrated(where: str, what: str, before: int, after: int) -> None:
    if before == after:
        typer.echo(f"{where}: {what} schema version {after}, up to date")
    else:
        typer.echo(f"{where}: {what} schema migrated from version {before} to {after}")


@app.command("copy")
def copy(
    ctx: typer.Context,
    to: str = typer.Option(..., "--to", help="The PostgreSQL store: postgresql://USER@HOST/DB."),
    force: bool = typer.Option(False, "--force", help="Replace what the target already holds."),
) -> None:
    """Copy this home's SQLite store (users, keys with their options, groups, CAs, the revoked list, TOTP
    secrets, the policy version) and its home CA's public key and last serial (`ca init`; the private key stays
    here) into an empty PostgreSQL store, in one transaction. The schema is migrated
    first. A store that holds anything is refused unless --force. The audit log stays where it is.

    Example: bastion store copy --to postgresql://bastion@db.internal/bastion
    """
    from ..ops.ca import home_ca_of
    from ..store import pg_schema
    from ..store.copy import copy_store
    from ..store.dialect import connect, is_postgres, redact
    from ..store.sqlite import Store

    if not is_postgres(to):
        raise BastionError(f"--to must be a postgresql:// URL, not {redact(to)!r}")
    config = config_of(ctx)
    if not config.database.exists():
        raise BastionError(f"{config.database}: no database; nothing to copy")
    conn = connect(to)
    try:
        pg_schema.migrate(conn)
    finally:
        conn.close()
    ca = home_ca_of(config)  # (#22) the home CA: trusted on every node, its serials go on from this home's
    source, target = Store(config.database), Store(to)
    try:
        copied = copy_store(source, target, force=force, ca=ca)
    finally:
        source.close()
        target.close()
    what = ", ".join(f"{n} {table}" for table, n in copied.items() if table not in ("policy_version", "last_serial"))
    typer.echo(f"copied {config.database} to {redact(to)}: {what}; policy version {copied['policy_version']}")
    if ca.public_key:
        typer.echo(f"home CA {ca.fingerprint}: trusted by every node on the store; its private key stays in "
                   f"{config.home} (sign there); the fleet's serials go on after {copied['last_serial']}")
    if config.store != to:
        typer.echo(f'next: set store = "{redact(to)}" in {config.home / "config.toml"} on every node, and restart')
