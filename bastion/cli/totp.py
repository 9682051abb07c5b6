"""`bastion user totp …`: enrol a user for one-time codes (the second factor, #21), or remove their secret."""

from __future__ import annotations

import io

import typer

from ..policy.totp import provisioning_uri
from .common import config_of, open_store

app = typer.Typer(help="One-time codes after the key (TOTP): enrol a user, or reset them.", no_args_is_help=True)


@app.command("enroll")
def enroll(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="An existing user."),
    force: bool = typer.Option(False, "--force", help="Replace the secret of a user already enrolled."),
    qr: bool = typer.Option(True, "--qr/--no-qr", help="Draw the QR code (default) or print the URI only."),
) -> None:
    """Make a new TOTP secret for a user and print it as an otpauth:// URI and a QR code for an authenticator
    app. Users whose policy says `require_totp = true` then log in with their key and a "Verification code:".
    The secret is shown only now and is kept in the database (never in the audit log or the log).

    Example: bastion user totp enroll alice
    """
    import pyotp  # here, not at the top: the CLI should not pay for it on every command

    secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends
    uri = provisioning_uri(secret, name, config_of(ctx).public_name)
    with open_store(ctx) as store:
        store.totp_enroll(name, secret, force=force)
    typer.echo(f"{name}: enrolled for one-time codes; scan the QR code with an authenticator app, or enter the URI:")
    typer.echo(uri)
    if qr:
        typer.echo(_qr_code(uri), nl=False)
    typer.echo(f"This secret is shown only now; `bastion user totp enroll {name} --force` makes a new one.")


def _qr_code(text: str) -> str:
    """`text` as a QR code drawn with block characters (segno: made locally, nothing fetched), two cells of quiet
    zone; empty when the terminal cannot show them."""
    import segno

    out = io.StringIO()
    segno.make(text, error="m").terminal(out=out, compact=True, border=2)
    drawing = out.getvalue()
    try:
        drawing.encode(typer.get_text_stream("stdout").encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return "(this terminal cannot draw the QR code; enter the URI instead)\n"
    return drawing


@app.command("reset")
def reset(ctx: typer.Context, name: str = typer.Argument(..., help="An enrolled user.")) -> None:
    """Remove a user's TOTP secret (a lost phone): a user whose policy requires a code cannot log in until
    enrolled again.

    Example: bastion user totp reset alice
    """
    with open_store(ctx) as store:
        store.totp_reset(name)
    typer.echo(f"{name}: TOTP secret removed; enrol again with `bastion user totp enroll {name}`")
