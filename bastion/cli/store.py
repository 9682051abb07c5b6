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
    url: Optional[str] = typer.Option(None, "--url", help="A postgresql:// URL; default: `store` in config.toml."),
) -> None:
    """Create or upgrade the schema of a PostgreSQL store (run once, from any node, before the nodes use it and
    after upgrading bastion). The home's own SQLite store needs nothing: it migrates itself when opened.

    Example: bastion store migrate --url postgresql://bastion@db.internal/bastion
    """
    from ..store import pg_schema
    from ..store.dialect import connect, is_postgres, redact

    target = url or config_of(ctx).store
    if not target:
        typer.echo("this home's store is its SQLite file, which migrates itself when opened; nothing to do")
        return
    if not is_postgres(target):
        raise BastionError(f"--url must be a postgresql:// URL, not {redact(target)!r}")
    conn = connect(target)
    try:
        before, after = pg_schema.migrate(conn)
    finally:
        conn.close()
    if before == after:
        typer.echo(f"{redact(target)}: store schema version {after}, up to date")
    else:
        typer.echo(f"{redact(target)}: store schema migrated from version {before} to {after}")


@app.command("copy")
def copy(
    ctx: typer.Context,
    to: str = typer.Option(..., "--to", help="The PostgreSQL store: postgresql://USER@HOST/DB."),
    force: bool = typer.Option(False, "--force", help="Replace what the target already holds."),
) -> None:
    """Copy this home's SQLite store (users, keys with their options, groups, CAs, the revoked list, TOTP
    secrets, the policy version) into an empty PostgreSQL store, in one transaction. The schema is migrated
    first. A store that holds anything is refused unless --force. The audit log stays where it is.

    Example: bastion store copy --to postgresql://bastion@db.internal/bastion
    """
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
    source, target = Store(config.database), Store(to)
    try:
        copied = copy_store(source, target, force=force)
    finally:
        source.close()
        target.close()
    what = ", ".join(f"{n} {table}" for table, n in copied.items() if table != "policy_version")
    typer.echo(f"copied {config.database} to {redact(to)}: {what}; policy version {copied['policy_version']}")
    if config.store != to:
        typer.echo(f'next: set store = "{redact(to)}" in {config.home / "config.toml"} on every node, and restart')
