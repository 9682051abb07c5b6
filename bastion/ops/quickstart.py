"""`bastion quickstart`: a working demo on one machine in one command, safe by construction.

It makes a demo home (default `~/.local/state/bastion-quickstart`), registers the invoking user's public
key, starts a tiny echo service on loopback as a target, grants exactly that service and this machine's
own sshd (127.0.0.1:22), writes a ready `ssh_config` and `known_hosts` into the home, prints the commands
to try, and serves in the foreground with `service.serve`.

Why it is safe: the bastion listens on loopback only (a non-loopback --listen is refused), and the only
internal network is 127.0.0.1/32, listed explicitly because the guard refuses loopback otherwise; so the
demo reaches nothing but two ports on this machine, which a local user could reach anyway. It refuses
to touch a home that it did not make, so it can never rewrite a real server's config or policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ipaddress
import os
import re
import shlex
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from ..clock import utc_now
from ..config import CONFIG_FILE, Config, load_config, render_config, split_listen
from ..errors import BastionError
from ..policy.model import Policy, UserPolicy, parse_target_rule
from ..policy.netguard import parse_networks
from ..safe_files import write_new
from ..service.home import host_public_keys, initialize
from ..service.lifecycle import serve
from ..store.sqlite import PublicKey, Store, parse_public_keys
from .ssh_config import ClientSetup, known_hosts_lines, render_ssh_config


DEFAULT_LISTEN = "127.0.0.1:2222"
DEMO_INTERNAL_NETWORKS = ("127.0.0.1/32",)
MARKER = "# bastion quickstart demo"
KEY_CANDIDATES = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")
SSH_CONFIG_FILE = "ssh_config"
KNOWN_HOSTS_FILE = "known_hosts"

CONFIG_HEADER = f"""\
{MARKER}, made by `bastion quickstart`. Never copy this file to a server: see
# "Install on a server" in the README. The demo listens on loopback only, and its only internal
# network is 127.0.0.1/32, listed explicitly (loopback is refused unless listed) so that the demo
# can reach the echo service it starts and this machine's own sshd, and nothing else.
"""


@dataclass(frozen=True, slots=True)
class Demo:
    """Everything the demo made, for the message that tells the user what to try."""

    config: Config
    user: str
    key: PublicKey
    key_file: Path
    echo_port: int
    ssh_config: Path

    @property
    def home(self) -> Path:
        return self.config.home


# ---- pure ------------------------------------------------------------------------------------------------


def default_home(environ: Mapping[str, str]) -> Path:
    state = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state) / "bastion-quickstart"


def demo_user_name(login: str) -> str:
    """The login name as a bastion user name (lowercase, safe characters), or "demo"."""
    name = re.sub(r"[^a-z0-9_.-]", "", login.lower())[:32]
    if not name or not re.match(r"[a-z_]", name):
        return "demo"
    return name


def check_loopback_listen(listen: str) -> None:
    host, _ = split_listen(listen)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise BastionError(f"quickstart listens on loopback only, not {host}; "
                           "for a server see `Install on a server` in the README")


def demo_policy(user: str, echo_port: int) -> Policy:
    """Exactly this machine's sshd and the demo echo service, for one user."""
    rule = parse_target_rule(f"127.0.0.1:22,{echo_port}")
    return Policy(users={user: UserPolicy(name=user, allow=(rule,))})


def next_steps(demo: Demo, login: str, bastion_command: str = "bastion") -> str:
    """What to try next, with this demo's paths and ports; `login` is the local account for ProxyJump."""
    home, cfg, user = demo.home, shlex.quote(str(demo.ssh_config)), demo.user
    host, port = demo.config.listen_host, demo.config.listen_port
    admin = f"{bastion_command} --home {shlex.quote(str(home))}"
    return f"""\
bastion quickstart: a demo bastion in {home}
  user    {user}, key {demo.key.fingerprint} ({demo.key_file})
  policy  {user} may reach 127.0.0.1:22 (this machine's sshd) and 127.0.0.1:{demo.echo_port} (a demo echo
          service started here); nothing else: the only internal network is 127.0.0.1/32
  serving {host}:{port}, loopback only, until Ctrl-C; {cfg} is a ready ssh config

Try, in another terminal, once it says "listening on":
  # what you may reach
  ssh -F {cfg} bastion
  # a tunnel to the demo echo service (what ProxyJump does)
  echo hello | ssh -F {cfg} -W 127.0.0.1:{demo.echo_port} bastion
  # ProxyJump to this machine's own sshd, if one runs
  ssh -F {cfg} -J bastion {login}@127.0.0.1
  # refused: outside the demo's only internal network, whatever the policy says
  ssh -F {cfg} -W 169.254.169.254:80 bastion
  # every login and tunnel, allowed or refused; and the config you would hand a user
  {admin} audit channels
  {admin} ssh-config {user} --host {host} --port {port}
"""


# ---- I/O -------------------------------------------------------------------------------------------------


def find_public_key(ssh_dir: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    for name in KEY_CANDIDATES:
        if (ssh_dir / name).is_file():
            return ssh_dir / name
    raise BastionError(f"no public key in {ssh_dir} ({', '.join(KEY_CANDIDATES)}); make one with "
                       "`ssh-keygen -t ed25519` or pass --key FILE.pub")


def free_port(host: str) -> int:
    """A port free on `host` right now, for --listen HOST:0 (the ssh config needs the number up front)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def prepare(home: Path | None, listen: str | None, key_file: Path | None, user: str | None,
            echo_port: int, environ: Mapping[str, str] | None = None) -> Demo:
    """Make (or reuse) the demo home and write its config, user, policy, ssh_config and known_hosts."""
    environ = os.environ if environ is None else environ
    home = (home or default_home(environ)).absolute()  # the printed commands work from any directory
    _check_demo_home(home)
    if listen is not None:
        check_loopback_listen(listen)
    key_path = find_public_key(Path(environ.get("HOME") or Path.home()) / ".ssh", key_file)
    try:
        key_text = key_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BastionError(f"{key_path}: cannot read the public key: {exc.strerror}") from None
    keys = parse_public_keys(key_text, str(key_path))

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    config_path = home / CONFIG_FILE
    if not config_path.exists():
        # The file keeps the default; a --listen applies to this run only, like any flag.
        demo = Config(home=home, listen=DEFAULT_LISTEN,
                      internal_networks=parse_networks(DEMO_INTERNAL_NETWORKS), shutdown_grace_seconds=2)
        write_new(config_path, (CONFIG_HEADER + render_config(demo)).encode())
    config = load_config(home, overrides={"listen": listen}, environ=environ)
    check_loopback_listen(config.listen)
    if config.listen_port == 0:
        config = replace(config, listen=f"{config.listen_host}:{free_port(config.listen_host)}")
    initialize(config)

    name = user or demo_user_name(getpass.getuser())
    store = Store(config.database)
    try:
        store.add_user(name, keys)
        store.apply_policy(demo_policy(name, echo_port))
        _, policy = store.load_policy()
    finally:
        store.close()

    host_keys = host_public_keys(config)
    known_hosts = home / KNOWN_HOSTS_FILE
    # The demo's own files, rewritten on every run (the port may change): replaced by rename, never written
    # through a link someone planted at the name (safe_files).
    known_hosts_text = "\n".join(known_hosts_lines(config.listen_host, config.listen_port, host_keys)) + "\n"
    write_new(known_hosts, known_hosts_text.encode(), 0o644, replace=True)
    private_key = key_path.with_suffix("") if key_path.suffix == ".pub" else None
    setup = ClientSetup(
        user=name,
        host=config.listen_host,
        port=config.listen_port,
        identity_file=str(private_key.resolve()) if private_key and private_key.is_file() else None,
        known_hosts_file=str(known_hosts.resolve()),
    )
    ssh_config = home / SSH_CONFIG_FILE
    ssh_config_text = render_ssh_config(setup, policy, host_keys, utc_now(), "`bastion quickstart`")
    write_new(ssh_config, ssh_config_text.encode(), 0o644, replace=True)
    return Demo(config=config, user=name, key=keys[0], key_file=key_path, echo_port=echo_port,
                ssh_config=ssh_config)


def _check_demo_home(home: Path) -> None:
    """Only an empty or missing directory, or one quickstart made, may become a demo home."""
    if not home.exists():
        return
    if not home.is_dir():
        raise BastionError(f"{home} is not a directory")
    config_path = home / CONFIG_FILE
    if config_path.exists():
        try:
            first = config_path.read_text(encoding="utf-8").splitlines()[:1]
        except OSError as exc:
            raise BastionError(f"{config_path}: cannot read: {exc.strerror}") from None
        if first and first[0].startswith(MARKER):
            return
    elif not any(home.iterdir()):
        return
    raise BastionError(f"{home} holds a bastion that quickstart did not make; quickstart only sets up a demo. "
                       "Give it an empty directory with --home, or use `bastion init` for a server.")


def open_echo_socket(host: str = "127.0.0.1") -> socket.socket:
    """The demo target's listening socket, bound before the policy is written so its port is known."""
    sock = socket.create_server((host, 0))
    sock.setblocking(False)
    return sock


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send back every byte until the peer half-closes, then close (the client-closes-first order)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def run_demo(config: Config, echo_socket: socket.socket) -> None:
    """The echo target and the gateway in one event loop, until SIGTERM or Ctrl-C."""
    echo = await asyncio.start_server(_echo, sock=echo_socket)
    try:
        await serve(config, drain_seconds=config.shutdown_grace_seconds)
    finally:
        echo.close()
        with contextlib.suppress(asyncio.TimeoutError):  # open echo connections need not finish
            await asyncio.wait_for(echo.wait_closed(), 1)
