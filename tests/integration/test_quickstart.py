"""`bastion quickstart` on an empty home: one command makes everything, serves on loopback, and the commands it
prints work as printed with the real OpenSSH client (host key pinned, no prompt). Loopback only: the demo's
targets are on 127.0.0.1 and its bastion listens there."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli.main import app
from bastion.config import Config
from bastion.errors import BastionError
from bastion.ops.quickstart import MARKER, demo_user_name
from bastion.service.home import initialize

ROOT = Path(__file__).resolve().parents[2]
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
needs_openssh = pytest.mark.skipif(SSH is None or SSH_KEYGEN is None,
                                   reason="needs the OpenSSH client and ssh-keygen (Debian: openssh-client)")


def user_env(home: Path) -> dict[str, str]:
    """A user whose HOME is `home`: no BASTION_* or XDG_* settings, no agent, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BASTION_", "XDG_", "SSH_AUTH_SOCK", "SSH_AGENT_PID")) and "proxy" not in k.lower()}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    return env


class Quickstart:
    """`bastion quickstart` running in the background; its output collected line by line."""

    def __init__(self, env: dict[str, str], *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", "quickstart", *args], env=env, cwd=env["HOME"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "bastion.service" in line and "listening on" in line:  # the server's log line, not the hint
                self.listening.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_listening(self, timeout: float = 20) -> None:
        if not self.listening.wait(timeout):
            raise AssertionError(f"quickstart did not say 'listening on' within {timeout}s:\n{self.output}")

    def printed_command(self, comment: str) -> str:
        """The command printed on the line after `# comment`."""
        lines = self.output.splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() == f"# {comment}":
                return lines[i + 1].strip()
        raise AssertionError(f"no '# {comment}' in the quickstart output:\n{self.output}")

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def empty_home() -> Iterator[Path]:
    """A user's home with nothing but an ed25519 key pair. Under a short /tmp path, not tmp_path: the server's
    control socket lives in the bastion home, and a UNIX socket path may not exceed 107 bytes."""
    base = Path(tempfile.mkdtemp(prefix="bqs-"))
    try:
        yield _make_user_home(base / "user")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _make_user_home(home: Path) -> Path:
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", home / ".ssh" / "id_ed25519"],
                   check=True, timeout=10)
    return home


@needs_openssh
def test_quickstart_on_an_empty_home_serves_and_its_printed_commands_work(empty_home):
    env = user_env(empty_home)
    quickstart = Quickstart(env, "--listen", "127.0.0.1:0")  # port 0: it picks a free port and says which
    try:
        # 1. everything is made and it serves
        quickstart.wait_listening()
        demo = empty_home / ".local" / "state" / "bastion-quickstart"
        assert stat.S_IMODE(demo.stat().st_mode) == 0o700
        config = (demo / "config.toml").read_text()
        assert config.startswith(MARKER) and 'internal_networks = ["127.0.0.1/32"]' in config
        assert f"a demo bastion in {demo}" in quickstart.output

        # 2. the printed tunnel command, run as printed: the echo service answers through the bastion
        command = quickstart.printed_command("a tunnel to the demo echo service (what ProxyJump does)")
        assert re.fullmatch(r"echo hello \| ssh -F \S+ -W 127\.0\.0\.1:\d+ bastion", command), command
        result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=20)
        assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr + quickstart.output

        # 3. the printed refusal is refused, with the reason in the user's own client
        command = quickstart.printed_command("refused: outside the demo's only internal network, whatever the "
                                             "policy says")
        result = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=20,
                                stdin=subprocess.DEVNULL)
        assert result.returncode != 0
        assert "administratively prohibited: 169.254.169.254 is not in an internal network" in result.stderr

        # 4. SIGTERM stops it cleanly
        assert quickstart.stop() == 0, quickstart.output
    finally:
        quickstart.kill()

    # 5. run again on the same home: it reuses everything and serves again
    again = Quickstart(env, "--listen", "127.0.0.1:0")
    try:
        again.wait_listening()
        assert "Traceback" not in again.output
        assert again.stop() == 0, again.output
    finally:
        again.kill()


def cli(*args: str, home: Path):
    return CliRunner().invoke(app, list(args), env={**{k: None for k in os.environ if k.startswith("BASTION_")},
                                                    "HOME": str(home), "XDG_STATE_HOME": None})


def test_quickstart_refuses_what_would_not_be_a_safe_demo(tmp_path):
    key = tmp_path / "me.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz me@laptop\n")

    # a home quickstart did not make (a real server's) is never rewritten
    server = tmp_path / "server"
    initialize(Config(home=server, listen="127.0.0.1:2222"))
    before = (server / "config.toml").read_text()
    result = cli("--home", str(server), "quickstart", "--key", str(key), home=tmp_path)
    assert isinstance(result.exception, BastionError) and "quickstart did not make" in str(result.exception)
    assert (server / "config.toml").read_text() == before

    # listening beyond loopback is refused before anything is written
    result = cli("--home", str(tmp_path / "demo"), "quickstart", "--key", str(key), "--listen", "0.0.0.0:2222",
                 home=tmp_path)
    assert isinstance(result.exception, BastionError) and "loopback only" in str(result.exception)
    assert not (tmp_path / "demo").exists()

    # no key: say how to make one
    result = cli("--home", str(tmp_path / "demo"), "quickstart", home=tmp_path)
    assert isinstance(result.exception, BastionError) and "ssh-keygen -t ed25519" in str(result.exception)


@pytest.mark.parametrize("login, name", [("alice", "alice"), ("Alice.Smith", "alice.smith"), ("1234", "demo"),
                                         ("", "demo")])
def test_demo_user_name(login, name):
    assert demo_user_name(login) == name
