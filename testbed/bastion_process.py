"""The bastion under test: one home directory, set up with the real CLI in gw, and at most one running
`bastion serve` there, whose output is kept for the failure report."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.keys import Key
from testbed.namespaces import GW_ADDR, LAN_ADDR, LAN_ADDR2, Testbed
from testbed.processes import TestbedError, clean_env, wait_until
from testbed.targets import CLOSE_FIRST_PORT, CLOSED_PORT, ECHO_PORT, HTTP_PORT, SSH_PORT

# The standard grants for alice. Some grants are there on purpose so that the refusal must come from the
# address checks and not from the policy: the group grants 10.99.0.0/24:22, which includes the bastion's own
# 10.99.0.1:22 and the denied 10.99.0.3:22; alice's name grants cover *.evil.test (names that resolve to
# metadata, loopback and public addresses) and nosuch.corp.internal (a name that does not resolve).
DEFAULT_POLICY = f"""\
[groups.ops]
allow = ["10.99.0.0/24:22", "*.corp.internal:8080"]

[users.alice]
groups = ["ops"]
allow = ["{LAN_ADDR}:{ECHO_PORT},{HTTP_PORT},{CLOSE_FIRST_PORT},{CLOSED_PORT}", "db.corp.internal:{ECHO_PORT}", "*.evil.test:80,{ECHO_PORT}"]
deny = ["{LAN_ADDR2}"]
"""


class Bastion:
    """One bastion home directory and (at most) one running `bastion serve` in the gw namespace."""

    __test__ = False

    def __init__(self, testbed: Testbed, home: Path, listen: str = f"{GW_ADDR}:{SSH_PORT}") -> None:
        self.testbed = testbed
        self.home = home
        self.listen = listen
        self.host, port = listen.rsplit(":", 1)
        self.port = int(port)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_lines: list[str] = []
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.log_path = home.parent / f"{home.name}-serve.log"

    # CLI

    def cli(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 30.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """`bastion --home HOME ARGS...` inside gw (so names resolve through the testbed's hosts file)."""
        argv = [sys.executable, "-m", "bastion", "--home", self.home, *args]
        result = self.testbed.run(self.testbed.gw, argv, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise TestbedError(
                f"bastion {' '.join(map(str, args))} exited {result.returncode}\n"
                f"stdout: {result.stdout.decode(errors='replace')}\nstderr: {result.stderr.decode(errors='replace')}"
            )
        return result

    def init(self, **config: Any) -> None:
        """`bastion init`, then set top-level config keys (e.g. connect_timeout=2)."""
        self.cli("init", "--listen", self.listen)
        if config:
            self.set_config(**config)

    def set_config(self, **config: Any) -> None:
        """Rewrite top-level keys of config.toml, keeping everything else `init` wrote."""
        path = self.home / "config.toml"
        lines = path.read_text().splitlines()
        first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
        top, rest = lines[:first_table], lines[first_table:]
        for key, value in config.items():
            rendered = f"{key} = {_toml_value(value)}"
            for i, line in enumerate(top):
                if line.split("=", 1)[0].strip() == key and "=" in line:
                    top[i] = rendered
                    break
            else:
                top.append(rendered)
        path.write_text("\n".join(top + rest) + "\n")

    def add_user(self, name: str, *keys: Key) -> None:
        args: list[str | os.PathLike[str]] = ["user", "add", name]
        for key in keys:
            args += ["--key", key.pub_path]
        self.cli(*args)

    def apply_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        path = self.home.parent / f"policy-{secrets.token_hex(3)}.toml"
        path.write_text(text)
        return self.cli("policy", "apply", path, check=check)

    def policy_check(self, user: str, host: str, port: int) -> subprocess.CompletedProcess[bytes]:
        return self.cli("policy", "check", user, host, str(port), check=False)

    def audit(self, kind: str, user: str | None = None, since: str | None = None,
              in_process: bool = True) -> list[dict[str, Any]]:
        """`bastion audit KIND --json` parsed.

        In-process by default: the same CLI code, but without a new interpreter (importing the CLI takes about
        half a second, and tests poll the audit while waiting for rows). `in_process=False` runs the real
        command in gw, as an operator would.
        """
        args = ["audit", kind, "--json"]
        if user:
            args += ["--user", user]
        if since:
            args += ["--since", since]
        out = self.cli_in_process(*args) if in_process else self.cli(*args).stdout.decode()
        rows = json.loads(out)
        if not isinstance(rows, list):
            raise TestbedError(f"bastion audit {kind} --json did not print a JSON array: {out[:200]!r}")
        return rows

    def cli_in_process(self, *args: str) -> str:
        """Run the bastion CLI's typer app in this process; returns stdout, raises on a non-zero exit."""
        from typer.testing import CliRunner

        from bastion.cli.main import app

        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BASTION_")}
        result = CliRunner().invoke(app, ["--home", str(self.home), *args], env=env)
        if result.exit_code != 0:
            raise TestbedError(f"bastion {' '.join(args)} exited {result.exit_code}: {result.output}",
                               ) from result.exception
        return result.stdout

    def wait_audit(self, kind: str, predicate: Callable[[list[dict[str, Any]]], bool], what: str,
                   timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll `audit KIND` until `predicate(rows)` holds (the audit writer may lag the client by a little)."""
        last: list[list[dict[str, Any]]] = [[]]

        def check() -> list[dict[str, Any]] | None:
            last[0] = self.audit(kind)
            return last[0] if predicate(last[0]) else None

        try:
            return wait_until(check, timeout, what, interval=0.1) or []
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last `audit {kind}` rows:\n{json.dumps(last[0], indent=1)}") from None

    def host_public_keys(self) -> list[str]:
        """The bastion's host public keys as written by `init` (`*host*key*.pub` in its home)."""
        return [p.read_text().strip() for p in sorted(self.home.glob("*host*key*.pub"))]

    # the server process

    def start(self, timeout: float = 10.0, env: dict[str, str] | None = None) -> None:
        """`bastion serve` in gw (`env`: extra variables, e.g. BASTION_FAST_PATH=false); returns once it
        printed "listening on"."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._ready.clear()
        with self._log_lock:
            self._log_lines.append(f"----- bastion serve started {time.strftime('%H:%M:%S')} -----\n")
        self.proc = self.testbed.popen(
            self.testbed.gw,
            [sys.executable, "-m", "bastion", "--home", self.home, "serve", "--listen", self.listen],
            # the transport switch is the one BASTION_* variable passed on: .ci/run's second run sets it false
            env=clean_env({k: v for k, v in os.environ.items() if k == "BASTION_FAST_PATH"} | (env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise TestbedError(f"bastion serve exited {self.proc.returncode} before listening:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TestbedError(f"bastion serve did not print 'listening on' within {timeout}s:\n{self.log()}")

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                with self._log_lock:
                    self._log_lines.append(line)
                if "listening on" in line:
                    self._ready.set()

    def log(self) -> str:
        with self._log_lock:
            return "".join(self._log_lines)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait for the exit code."""
        self.send_signal(sig)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader:
            self._reader.join(5)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")
