"""The `bastion` command: thin adapters over the library; the only place exceptions become exit codes."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Optional

import typer
import typer.main
from rich.markup import escape
from typer._click import exceptions as parse_errors  # typer 0.29 carries its own click; its errors are these

from ..errors import BastionError, DamagedDatabase
from ..printable import printable
from . import audit, ca, policy, sessions, users
from . import access, admin, store
from .common import config_of, configure_logging

app = typer.Typer(
    help="bastion: an SSH jump host. Key-only logins, policy-checked tunnels, SQLite audit.\n\n"
    "Example: bastion --home ./demo serve --listen 127.0.0.1:2222",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},  # every subcommand inherits it
    pretty_exceptions_enable=False,
)
app.add_typer(users.app, name="user")
app.add_typer(policy.app, name="policy")
app.add_typer(audit.app, name="audit")
app.add_typer(sessions.app, name="sessions")
app.add_typer(ca.app, name="ca")  # the home's own user CA (#21)
app.add_typer(store.app, name="store")  # a PostgreSQL store for several nodes (#22)
admin.register(app)
app.command("access")(access.access)


@app.callback()
def root(
    home: Optional[Path] = typer.Option(
        None,
        "--home",
        envvar="BASTION_HOME",
        help="State directory (config.toml, host keys, bastion.db). Default: $BASTION_HOME, else /var/lib/bastion.",
    ),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=lambda shown: _print_version(shown),
                                 help="Print the version and exit."),
) -> None:
    """bastion: an SSH jump host.

    Example: bastion --home ./demo init --listen 127.0.0.1:2222
    """


@app.command()
def init(
    ctx: typer.Context,
    listen: Optional[str] = typer.Option(None, help="Address to listen on, HOST:PORT (default 0.0.0.0:22)."),
) -> None:
    """Create config.toml, host keys (mode 0600) and the database. Never overwrites existing keys.

    Example: bastion --home /var/lib/bastion init --listen 0.0.0.0:22
    """
    from ..config import Config, read_config_file
    from ..service.home import initialize

    os.umask(0o077)  # everything the server creates (keys, database, WAL, socket) is the owner's alone
    config = config_of(ctx, listen=listen)
    created = initialize(config)
    for path in created:
        typer.echo(f"created {path}")
    if not created:
        typer.echo(f"{config.home} is already initialized; nothing changed")
        # init never rewrites config.toml (an operator's edits live there); say so when --listen asked otherwise
        kept = read_config_file(config.config_file).get("listen", Config().listen)
        if listen is not None and listen != kept:
            typer.echo(f"warning: listen stays {kept} as set in {config.config_file}; "
                       f"edit it there to listen on {listen}", err=True)


@app.command()
def serve(
    ctx: typer.Context,
    listen: Optional[str] = typer.Option(None, help="Address to listen on, HOST:PORT (overrides config.toml)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", min=1, help="Processes sharing the port, e.g. one per core (overrides config.toml)."
    ),
) -> None:
    """Run the gateway in the foreground (creates the home first if it is empty). SIGTERM stops it gracefully,
    SIGHUP reloads config.toml.

    Example: bastion --home ./demo serve --listen 127.0.0.1:2222 --workers 2
    """
    from ..service.control import serve_lock
    from ..service.home import initialize
    from ..service.lifecycle import run

    os.umask(0o077)
    config = config_of(ctx, listen=listen, workers=workers)
    configure_logging(config.log_level, config.log_format)
    if config.home.is_dir():
        with serve_lock(config.home):  # refuse before initialize() may migrate a live server's database
            pass
    for path in initialize(config):
        logging.getLogger("bastion").info("created %s", path)
    raise typer.Exit(run(config))


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"bastion {version('bastion')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from .. import __version__

            typer.echo(f"bastion {__version__}")
        raise typer.Exit(0)


def readable_help(command: Any) -> Any:
    """The command tree as people read it in --help: help text shown as written (typer reads it as rich markup,
    which ate `[fd00::/64]`), a flag without a `<bool>` placeholder, and a value placeholder in capitals named
    after the parameter (`--key KEY`, `--since SINCE`, `NAME`) instead of `<str>` or `<list[Path]>`."""
    if getattr(command, "help", None):
        command.help = escape(command.help)
    if getattr(command, "short_help", None):
        command.short_help = escape(command.short_help)
    for param in getattr(command, "params", []):
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if param.metavar is None and param.name:
            param.metavar = "" if getattr(param, "is_flag", False) else param.name.upper()
        if param.param_type_name == "argument":  # its name column already says NAME; no `<str>` beside it
            param.display_type_rich = lambda ctx: None
    made = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = made(ctx)
        if option is not None:
            option.metavar = ""  # -h, --help: a flag, no `<bool>`
        return option

    command.get_help_option = help_option
    for sub in (getattr(command, "commands", None) or {}).values():
        readable_help(sub)
    return command


def main() -> None:
    """Exit 0 done, 1 a problem found (a damaged database), 2 bad input: always one plain line on stderr, no
    wrapping, easy to grep, never a traceback."""
    try:
        # not standalone: usage errors come back here to be one line, not a box drawn by rich
        code = readable_help(typer.main.get_command(app))(standalone_mode=False, prog_name="bastion")
    except parse_errors.NoArgsIsHelpError as exc:  # `bastion audit`: the help is the answer
        exc.show()
        code = exc.exit_code
    except parse_errors.UsageError as exc:
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        _error(exc.format_message().rstrip(".") + where)
        code = 2
    except parse_errors.ClickException as exc:
        _error(exc.format_message())
        code = exc.exit_code
    except typer.Abort:  # Ctrl-C at a prompt
        _error("aborted")
        code = 1
    except DamagedDatabase as exc:
        _error(str(exc))
        code = 1
    except sqlite3.DatabaseError as exc:  # damage met outside the audit commands, which name their database
        _error(f"the database is damaged or unreadable: {exc} (run `bastion doctor`)")
        code = 1
    except BastionError as exc:
        _error(str(exc))
        code = 2
    except OSError as exc:  # a path given that cannot be, or a system that refused: named, never a traceback
        where = f"{exc.filename}: " if exc.filename is not None else ""
        _error(f"{where}{exc.strerror or exc}")
        code = 2 if exc.errno in _BAD_PATH else 1
    sys.exit(code if isinstance(code, int) else 0)


# the path typed is wrong (bad input, exit 2); anything else (no permission, disk full, I/O) is a problem found
_BAD_PATH = {errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.EINVAL, errno.ELOOP}


def _error(message: str) -> None:
    sys.stderr.write(f"error: {printable(message)}\n")
