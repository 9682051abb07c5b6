"""What every CLI command shares: the home directory from the global --home, and output helpers."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..config import Config, load_config
from ..errors import BastionError
from ..printable import printable
from ..service import logs
from ..service.control import notify
from ..store.sqlite import Store

console = Console()
err_console = Console(stderr=True)


def home_of(ctx: typer.Context) -> Path | None:
    root = ctx.find_root()
    return root.params.get("home") if root.params else None


def config_of(ctx: typer.Context, **overrides: Any) -> Config:
    return load_config(home_of(ctx), overrides=overrides)


@contextlib.contextmanager
def open_store(ctx: typer.Context) -> Iterator[Store]:
    """The home's store, closed afterwards; a clear error if the home was never initialized."""
    config = config_of(ctx)
    if not config.database.exists():
        raise BastionError(f"{config.database}: no database; run `bastion --home {config.home} init` first")
    store = Store(config.database)
    try:
        yield store
    finally:
        store.close()


def configure_logging(level: str, log_format: str = "text") -> None:
    """The server's operational log on stderr, one line per record whatever a client put in its name, version
    or target: text (no timestamps under journald) or JSON lines (service/logs.py)."""
    logs.configure(level, log_format)


def notify_server(ctx: typer.Context, why: str) -> None:
    """Tell a running server to re-check live sessions after a change, and say what it did."""
    note = notify(config_of(ctx).home, why)
    if note:
        typer.echo(note)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(rows: Iterable[dict], columns: list[str], title: str | None = None, empty: str = "nothing") -> None:
    rows = list(rows)
    if not rows:
        console.print(f"({empty})")
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, not str: a cell is shown as it is, never read as rich markup; printable: never as a terminal escape
        table.add_row(*(Text(printable("" if row.get(c) is None else str(row.get(c)))) for c in columns))
    console.print(table)


def human_bytes(count: int | None) -> str:
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)
