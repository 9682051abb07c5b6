"""`bastion ca …`: the home's own user CA (#21), for teams with no CA of their own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..clock import utc_now
from ..safe_files import FileExists, is_stdout, write_new
from .common import config_of, notify_server, open_store

app = typer.Typer(help="The bastion's own user CA: make it once, then sign short-lived user certificates.",
                  no_args_is_help=True)


@app.command("init")
def init(ctx: typer.Context) -> None:
    """Make the CA key in the home (user_ca_key, Ed25519, mode 0600; never replaces one) and print its public key
    and fingerprint. The server trusts it at once as the CA `home` (require_known_user = true: certificates log in
    users of the policy), with no policy file to edit; `policy show` and `doctor` show it. To change its settings,
    declare [cas.home] with the same key in a policy file (the lines are printed). With a PostgreSQL `store` the
    public key and the serials go into the store, so every node trusts it; the private key stays in this home
    (the one to sign on), and a fleet has one home CA.

    Example: bastion ca init
    """
    from ..ops.ca import ca_policy_lines, init_ca

    line, fingerprint, fleet = init_ca(config_of(ctx))
    typer.echo(line)
    typer.echo(f"fingerprint {fingerprint}")
    if fleet:
        typer.echo(fleet)
    typer.echo("trusted as CA home (require_known_user = true); to change its settings, add to a policy file:")
    typer.echo(ca_policy_lines(line), nl=False)
    notify_server(ctx, "home CA created")


@app.command("sign")
def sign(
    ctx: typer.Context,
    user: str = typer.Argument(..., help="The login user the certificate is for (a principal)."),
    key: Path = typer.Option(..., "--key", help="The user's OpenSSH public key, e.g. id_ed25519.pub."),
    valid: str = typer.Option(..., "--valid", help="How long it is valid: 30m, 8h, 2d (at most ca_max_validity)."),
    principal: Optional[List[str]] = typer.Option(
        None, "--principal", help="A principal instead of USER; repeatable (a group, where the CA has "
                                  "principals_as_groups = true)."),
    source_address: Optional[List[str]] = typer.Option(
        None, "--source-address", help="Only from this address or CIDR; repeatable or comma separated."),
    serial: Optional[int] = typer.Option(None, "--serial", help="Serial number (default: one above the last issued)."),
    output: str = typer.Option("-", "-o", "--output",
                               help="Write the certificate to this new file (e.g. id_ed25519-cert.pub); - prints it."),
) -> None:
    """Sign a user's public key as an OpenSSH user certificate (extension permit-port-forwarding only; key id
    "USER@bastion serial N", shown in the audit). The user saves it beside the key as id_ed25519-cert.pub (ssh
    offers it by itself) or uses -o CertificateFile=…; `bastion ssh-config` says how. A summary goes to stderr.

    Example: bastion ca sign alice --key alice.pub --valid 8h -o alice-cert.pub
    """
    from ..ops.ca import sign as sign_key

    principals = tuple(principal or ())
    if principals and user not in principals:
        principals = (user, *principals)  # a certificate always names its login user
    if not is_stdout(output) and os.path.lexists(output):  # before a serial is used up; write_new checks again
        raise FileExists(f"{output} already exists; bastion never overwrites a file, choose a new name")
    issued = sign_key(config_of(ctx), user, key, valid, utc_now(), principals, tuple(source_address or ()), serial)
    if is_stdout(output):
        typer.echo(issued.certificate, nl=False)
    else:
        write_new(Path(output), issued.certificate.encode(), 0o644)
    typer.echo(issued.describe(), err=True)
    _warn_unknown(ctx, user)


def _warn_unknown(ctx: typer.Context, user: str) -> None:
    """The home CA logs in users of the policy only (unless [cas.home] says otherwise): say so before signing."""
    if not config_of(ctx).database.exists():
        return
    with open_store(ctx) as store:
        _, policy = store.load_policy()
    home = policy.cas.get("home")
    if user not in policy.users and (home is None or home.require_known_user):
        typer.echo(f"warning: {user} is not a user of the policy; the home CA logs in known users only "
                   f"(add [users.{user}] to a policy file)", err=True)
