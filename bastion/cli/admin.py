"""`bastion doctor`, `ssh-config`, `quickstart` and `backup`: installing, checking and handing out a bastion.
Thin adapters over ops/ (doctor, ssh_config, quickstart, backup); `register(app)` adds them."""

from __future__ import annotations

import asyncio
import getpass
from pathlib import Path
from typing import Optional

import typer

from ..clock import utc_now
from ..config import Config
from ..errors import BastionError
from ..ops.backup import backup_database
from ..ops.ssh_config import ClientSetup, known_hosts_lines, render_ssh_config, split_public_name
from ..policy.netguard import TargetError, parse_host
from ..policy.signing import with_home_authority
from ..safe_files import is_stdout, new_file
from ..service.home import HomeAuthority, host_public_keys
from .common import config_of, configure_logging, home_of, human_bytes, open_store, print_json, progress_bar


def doctor(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """Check the install: print what is wrong and how to fix it.

    Checks config, home and host key permissions, the listen port, database health, the clock, and the
    policy (empty, users without keys, grants outside internal_networks). Exit 0 when nothing is a
    problem (warnings allowed), 1 otherwise.

    Example: bastion --home /var/lib/bastion doctor
    """
    from ..ops.doctor import PROBLEM, run_checks, summary  # imported here: only doctor pays for its checks

    findings = run_checks(home_of(ctx))
    if json:
        print_json([finding.as_dict() for finding in findings])
    else:
        for finding in findings:
            typer.echo(f"{finding.level.upper() if finding.level == PROBLEM else finding.level:<8} "
                       f"{finding.check:<9} {finding.message}")
            if finding.fix and finding.level != "ok":
                typer.echo(f"{'':<18} fix: {finding.fix}")
        typer.echo(summary(findings))
    if any(finding.level == PROBLEM for finding in findings):
        raise typer.Exit(1)


def ssh_config(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The user the config is for."),
    host: Optional[str] = typer.Option(None, "--host", help="The bastion's name or address as users reach it "
                                       "(default: public_name from config.toml)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="The port users reach it on (default: the listen port)."),
    identity_file: Optional[str] = typer.Option(None, "--identity-file",
                                                help="The user's private key, as a path on the user's machine."),
    known_hosts_file: Optional[str] = typer.Option(None, "--known-hosts-file",
                                                   help="Pin the bastion's keys in this file instead of "
                                                   "~/.ssh/known_hosts (a path on the user's machine)."),
    certificate_file: Optional[str] = typer.Option(
        None, "--certificate-file", help="The user's OpenSSH certificate (e.g. from `bastion ca sign`), as a path "
        "on the user's machine: CertificateFile, with its key beside it; no key need be stored at the bastion."),
    known_hosts: bool = typer.Option(False, "--known-hosts", help="Print only the known_hosts lines."),
    output: Path = typer.Option(Path("-"), "--output", "-o", help="Write to this new file (never over an existing "
                                "one, never through a link) instead of standard output (-)."),
) -> None:
    """Print a ready ~/.ssh/config block for user NAME, with the bastion's known_hosts lines.

    `Host bastion`, ProxyJump for every target NAME may reach on port 22, and the bastion's host keys as
    known_hosts lines, so the first connection needs no trust-on-first-use. A user who logs in with a
    certificate needs no key pinned: --certificate-file writes CertificateFile (its key is the same path
    without -cert.pub), and where the policy trusts a CA the config says how to use one.

    Example: bastion ssh-config alice --host bastion.example.com --identity-file ~/.ssh/id_ed25519 -o alice.conf
    """
    config = config_of(ctx)
    host, port = _public_address(config, host, port)
    host_keys = host_public_keys(config)
    if known_hosts:
        _hand_out("\n".join(known_hosts_lines(host, port, host_keys)) + "\n", output)
        return
    with open_store(ctx) as store:
        _, policy = store.load_policy()
        users = {user["name"] for user in store.list_users()}
    policy = with_home_authority(policy, HomeAuthority(config)())  # (#21) the home CA counts as a trusted CA
    if name not in users and name not in policy.users:
        raise BastionError(f"no user named {name!r}; add one with `bastion user add {name} --key FILE.pub`")
    setup = ClientSetup(user=name, host=host, port=port, identity_file=identity_file,
                        known_hosts_file=known_hosts_file, certificate_file=certificate_file)
    try:
        text = render_ssh_config(setup, policy, host_keys, utc_now())
    except ValueError as exc:
        raise BastionError(str(exc)) from None
    _hand_out(text, output)


def _hand_out(text: str, output: Path) -> None:
    """`text` on standard output, or as a new file (0644: a config to hand out, no secret in it)."""
    if is_stdout(output):
        typer.echo(text, nl=False)
        return
    with new_file(output, 0o644) as handle:
        handle.write(text)
    typer.echo(f"wrote {output}")


def _public_address(config: Config, host: str | None, port: int | None) -> tuple[str, int]:
    named_port = None
    if host is None:
        if not config.public_name:
            raise BastionError("give --host NAME (how users reach the bastion), or set public_name in config.toml")
        host, named_port = split_public_name(config.public_name)
    try:
        parsed = parse_host(host)
    except TargetError as exc:
        raise BastionError(f"--host {host!r}: {exc.args[0].replace('target host', 'host')}") from None
    return str(parsed), port or named_port or config.listen_port


def quickstart(
    ctx: typer.Context,
    key: Optional[Path] = typer.Option(None, "--key", help="Your public key (default: ~/.ssh/id_ed25519.pub, "
                                       "then id_ecdsa.pub, id_rsa.pub)."),
    user: Optional[str] = typer.Option(None, "--user", help="The demo user's name (default: your login name)."),
    listen: Optional[str] = typer.Option(None, "--listen", help="Loopback HOST:PORT (default 127.0.0.1:2222; "
                                         "port 0 picks a free one)."),
) -> None:
    """Try bastion on this machine in one step: a loopback-only demo, served in the foreground.

    Makes a demo home (~/.local/state/bastion-quickstart unless --home is given), adds your public key,
    grants a loopback-only demo policy, prints what to try, and serves on 127.0.0.1:2222 until Ctrl-C.

    Example: bastion quickstart --key ~/.ssh/id_ed25519.pub
    """
    from ..ops.quickstart import next_steps, open_echo_socket, prepare, run_demo  # loads the server

    echo_socket = open_echo_socket()
    try:
        demo = prepare(home_of(ctx), listen, key, user, echo_socket.getsockname()[1])
    except BaseException:
        echo_socket.close()
        raise
    configure_logging(demo.config.log_level)
    typer.echo(next_steps(demo, getpass.getuser()))
    try:
        asyncio.run(run_demo(demo.config, echo_socket))
    except OSError as exc:  # the listen address taken, or the home unusable for the control socket
        raise BastionError(f"cannot start the demo server (listen {demo.config.listen}, home {demo.home}): "
                           f"{exc.strerror or exc}") from None


def backup(
    ctx: typer.Context,
    dest: Path = typer.Argument(..., help="A new file, a directory to put bastion-YYYYMMDDTHHMMSSZ.db in, or - "
                                          "for standard output."),
) -> None:
    """Back up the database (users, keys, policy, audit) while the server runs.

    Uses SQLite's online backup; the copy is written 0600, never over an existing file and never through a
    symbolic link. Host keys are not included; copy them once.

    Example: bastion backup /var/backups/bastion/    |    bastion backup - | ssh vault 'cat > bastion.db'
    """
    config = config_of(ctx)
    with progress_bar() as progress:  # a bar on a terminal (stderr); nothing when piped
        result = backup_database(config.database, dest, progress)
    where = "standard output" if is_stdout(dest) else result.path
    typer.echo(f"backed up {config.database} to {where} ({human_bytes(result.size)}, "
               f"{result.users} users, {result.audit_rows} audit rows)", err=is_stdout(dest))


def register(app: typer.Typer) -> None:
    """Add these commands to the top-level `bastion` app."""
    app.command("doctor")(doctor)
    app.command("ssh-config")(ssh_config)
    app.command("quickstart")(quickstart)
    app.command("backup")(backup)
