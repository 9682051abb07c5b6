"""What every CLI command shares: the home directory from the global --home, and output helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..clock import human
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
    """The configured store (the home's SQLite file, or `store = "postgresql://…"`, #22), closed afterwards; a
    clear error if the home was never initialized."""
    config = config_of(ctx)
    if config.store:
        store = Store(config.store)
    else:
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


def print_table(rows: Iterable[dict], columns: list[str], title: str | None = None, empty: str = "nothing", *,
                drop: Sequence[str] | None = None, text: Collection[str] = ()) -> None:
    """Rows as an aligned table that fits the terminal (see `fit_table`). `drop`: the columns that may be left
    out when it is narrow, first left out first (default: empty columns, then from the right, never the first);
    `text`: free-text columns that may be shortened with '…'. Times are shown as `human_cell` does."""
    rows = list(rows)
    if not rows:
        console.print(f"({empty})", markup=False, highlight=False)
        return
    cells = [[human_cell(row.get(c)) for c in columns] for row in rows]
    if drop is None:
        empties = [c for i, c in enumerate(columns) if i and not any(line[i] for line in cells)]
        drop = empties + [c for c in reversed(columns[1:]) if c not in empties]
    show_table(fit_table(columns, cells, screen_width(), drop=drop, text=text, title=title))


_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:?[0-9]{2})?")


def human_cell(value: Any) -> str:
    """A table cell: a time (a datetime, or text that is one) in the one human form (clock.human); anything else
    as text, non-printable characters escaped (a cell is shown as it is, never as a terminal escape); None empty."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return human(value)
    shown = str(value)
    if _TIME.fullmatch(shown):
        try:
            return human(shown)
        except ValueError:  # 2026-02-31: not a time after all
            pass
    return printable(shown)


def screen_width() -> int | None:
    """How wide a table may be: the terminal's width; when stdout is a pipe or a file, $COLUMNS if set (the
    width asked for), else none (natural width, one row per line, easy to grep)."""
    if sys.stdout.isatty():
        return Console().width
    asked = os.environ.get("COLUMNS", "")
    return int(asked) if asked.isdigit() and int(asked) > 0 else None


_GAP = 2  # between two columns: no box, a space of padding either side


class FittedTable:
    """A rich Table sized to a width, with the names of the columns left out to fit it."""

    def __init__(self, table: Table, width: int | None, dropped: list[str]):
        self.table, self.width, self.dropped = table, width, dropped


def fit_table(columns: Sequence[str], rows: list[list[str]], width: int | None, *, drop: Sequence[str] = (),
              text: Collection[str] = (), justify: dict[str, str] | None = None,
              title: str | None = None) -> FittedTable:
    """Lay `rows` (cells already text) out in `width` columns without breaking a word: a fingerprint, a session
    id, an address or a time is never split across lines. Free text (`text`) wraps at spaces and may lose the end
    of a word too long for it ('…'); a mapping gives the narrowest each may become (default 12). When even that is
    too wide, the columns in `drop` are left out, in order, then others from the right, never the first, until it
    fits. Without a width: natural width, one row per line."""
    names = list(columns)
    natural = {c: max([cell_len(c)] + [cell_len(line) for row in rows for line in row[i].splitlines() or [""]])
               for i, c in enumerate(names)}
    word = {c: max([cell_len(c)] + [cell_len(w) for row in rows for w in row[i].split()])
            for i, c in enumerate(names)}
    shortest = {c: text[c] if isinstance(text, Mapping) else 12 for c in text}
    roomy = {c: min(natural[c], max(cell_len(c), shortest[c])) if c in text else natural[c] for c in names}
    least = {**roomy, **{c: word[c] for c in names if c not in text}}  # ids whole, wrapped at spaces between

    def total(sizes: dict[str, int], kept: list[str]) -> int:
        return sum(sizes[c] for c in kept) + _GAP * (len(kept) - 1)

    def leave_out(sizes: dict[str, int], also: Sequence[str] = ()) -> list[str] | None:
        kept = list(names)
        for name in [*drop, *also]:
            if total(sizes, kept) <= width:
                break
            if name in kept and len(kept) > 1:
                kept.remove(name)
        return kept if total(sizes, kept) <= width else None

    kept, widths = names, None
    if width is not None and total(natural, names) > width:
        # rather leave out a column than wrap an id-like one; rather wrap it (at its spaces) than leave out more
        # and when the columns it may leave out are not enough, leave out more, from the right (a narrow terminal)
        for sizes, also in ((roomy, ()), (least, ()), (least, names[:0:-1])):
            chosen = leave_out(sizes, also)
            if chosen is not None:
                kept, widths = chosen, {c: sizes[c] for c in chosen}
                break
        if widths is not None:  # share what is left: free text first, then the columns that wrapped
            for group in ([c for c in kept if c in text], kept):
                while (spare := width - total(widths, kept)) > 0:
                    wanting = [c for c in group if widths[c] < natural[c]]
                    if not wanting:
                        break
                    for c in wanting[:spare]:
                        widths[c] += 1
    dropped = [c for c in names if c not in kept]
    table = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False,
                  show_edge=False)
    for name in kept:
        align = (justify or {}).get(name, "left")
        if widths is None:  # natural width; or too narrow even with every column it may drop: fold as a last resort
            table.add_column(Text(name), justify=align, no_wrap=width is None, overflow="fold")
        else:
            table.add_column(Text(name), justify=align, width=widths[name],
                             overflow="ellipsis" if name in text else "fold")
    where = [names.index(c) for c in kept]
    for row in rows:
        table.add_row(*(Text(row[i]) for i in where))
    return FittedTable(table, width, dropped)


def show_table(fitted: FittedTable) -> None:
    """Print a fitted table, and say which columns it left out."""
    out = Console(width=fitted.width or 100_000, highlight=False)
    out.print(fitted.table, markup=False)
    if fitted.dropped:
        out.print(f"(left out at {fitted.width} columns: {', '.join(fitted.dropped)}; --json has all)",
                  markup=False, style="dim")


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int | None], None] | None]:
    """A progress callback for long work (audit/chain.py's Progress) that draws a bar on standard error when that
    is a terminal, and gone when the work is done; None (nothing drawn, nothing written) when it is a pipe or a
    file, so scripts and logs see only the result."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    tasks: dict[str, TaskID] = {}

    def update(what: str, done: int, total: int | None) -> None:
        if what not in tasks:
            for earlier in tasks.values():  # one step at a time: the step before is over
                bar.update(earlier, visible=False)
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    with bar:
        yield update


def human_bytes(count: int | None) -> str:
    if count is None:
        return ""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)
