"""The session channel: `ssh alice@bastion` gets a short text about her access, then the session ends.
Commands and subsystems are refused; this host runs nothing for its users."""

from __future__ import annotations

import asyncio
import itertools

import asyncssh

from ..clock import utc_now
from ..policy.decide import evaluate
from ..policy.model import AccessRequest
from ..printable import printable
from .context import ChannelOwner


COMMAND_REFUSED = "bastion: this is a jump host; it runs no commands. Use it with ssh -J or -L/-D.\r\n"


class BannerSession(asyncssh.SSHServerSession[str]):
    """A shell prints the banner and exits 0; an exec prints why it is refused and exits 1."""

    def __init__(self, connection: ChannelOwner):
        self._connection = connection
        self._chan: asyncssh.SSHServerChannel[str] | None = None
        self._command: str | None = None
        self._task: asyncio.Task | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: tuple, term_modes: dict) -> bool:
        """Accept a pty so `ssh alice@bastion` shows no allocation error; nothing runs on it."""
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        """Accepted only to tell the user why it will not run (a bare refusal prints nothing useful)."""
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        """Return False: no sftp or other subsystem."""
        self._connection.log.info("refused subsystem %r", subsystem[:64])
        return False

    def session_started(self) -> None:
        assert self._chan is not None
        if self._command is not None:
            self._connection.log.info("refused command %r", self._command[:128])
            self._chan.write_stderr(COMMAND_REFUSED)
            self._chan.exit(1)
            return
        self._task = asyncio.ensure_future(self._greet())

    async def _greet(self) -> None:
        assert self._chan is not None
        if self._connection.session_committed is not None:
            await self._connection.session_committed  # the login may still be refused
        if self._connection.session_id is None:
            self._chan.exit(1)
            return
        try:
            policy = await self._connection.ctx.policy.current()
            text = banner_text(self._connection, policy)
        except Exception:  # the banner is a courtesy; a policy read error must not leave the session hanging
            self._connection.log.exception("cannot build banner")
            user = printable(self._connection.user)
            text = f"Hello {user}. This bastion forwards connections; it runs no commands.\n"
        self._chan.write(text.replace("\n", "\r\n"))
        self._chan.exit(0)

    def eof_received(self) -> bool:
        """Return True: stdin closing (ssh -n, </dev/null) must not end the session before the text is out."""
        return True

    def break_received(self, msec: int) -> bool:
        return False


def banner_text(connection: ChannelOwner, policy) -> str:
    user = connection.user
    here = connection.ctx.config.public_name or _local_address(connection)
    lines = [f"Hello {user}. This is bastion, an SSH jump host: it forwards connections, it runs no commands."]
    now = utc_now()
    extra = connection.extra_groups(policy)  # a certificate's principals as groups (#21)
    grants = [(origin, rule) for origin, rule in policy.grants_for(user, extra) if not rule.expired(now)]
    if grants:
        lines.append("You may reach:")
        lines += _rule_lines(grants)
        denials = [(origin, rule) for origin, rule in policy.denials_for(user, extra) if not rule.expired(now)]
        if denials:
            lines.append("Except:")
            lines += _rule_lines(denials)
        example = _example_target(policy, connection, grants)
        if example is not None:
            host, port = example
            lines.append("For example:")
            if port == 22:
                lines.append(f"  ssh -J {user}@{here} root@{host}")
            else:
                lines.append(f"  ssh -N -L {port}:{host}:{port} {user}@{here}")
    else:
        lines.append("You may not reach any target yet; ask your bastion admin for a grant.")
    listens = [(origin, rule) for origin, rule in policy.rules_for(user, "listen", extra) if not rule.expired(now)]
    if listens:
        lines.append("You may listen (ssh -R) on:")
        lines += _rule_lines(listens)
    user_policy = policy.users.get(user)
    if user_policy is not None and user_policy.expires is not None:
        lines.append(f"Your access expires at {user_policy.expires:%Y-%m-%d %H:%M}Z.")
    # the user name is the client's choice, and rule texts come from a policy file: nothing in them may reach
    # the user's terminal as a control sequence
    return "\n".join(printable(line) for line in lines) + "\n"


def _rule_lines(rules) -> list[str]:
    width = max(len(rule.text) for _, rule in rules)
    lines = []
    for origin, rule in rules:
        expiry = f", until {rule.expires:%Y-%m-%d %H:%M}Z" if rule.expires else ""
        lines.append(f"  {rule.text:<{width}}  ({origin}{expiry})")
    return lines


def _local_address(connection: ChannelOwner) -> str:
    assert connection.conn is not None
    sockname = connection.conn.get_extra_info("sockname") or ("bastion", 22)
    host, port = sockname[0], sockname[1]
    host = f"[{host}]" if ":" in host else host
    return host if port == 22 else f"{host}:{port}"


def _example_target(policy, connection: ChannelOwner, grants) -> tuple[str, int] | None:
    """A target the user may really reach now (checked with evaluate(), so never the bastion's own address
    or a denied host), preferring port 22; None if no granted address can be shown without DNS."""
    now = utc_now()
    candidates = []
    for _, rule in grants:
        if rule.network is None:
            continue
        port = 22 if 22 in rule.ports else rule.ports.ranges[0][0]
        hosts = [rule.network.network_address] if rule.network.num_addresses == 1 else rule.network.hosts()
        candidates += [(address, port) for address in itertools.islice(hosts, 16)]
    candidates.sort(key=lambda candidate: candidate[1] != 22)
    for address, port in candidates:
        request = AccessRequest(user=connection.user, host=address, addresses=(address,), port=port, now=now,
                                extra_groups=connection.extra_groups(policy))
        if evaluate(policy, connection.ctx.guard, request).allowed:
            return str(address), port
    return None
