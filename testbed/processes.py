"""Running the testbed's programs: a mandatory timeout, a clean environment, a process group to kill, a poll
with a deadline. Everything else in the package starts its processes through here."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

# the programs the testbed runs, by absolute path: a test must not pick up another ssh from PATH
SSH = "/usr/bin/ssh"
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

DEFAULT_TIMEOUT = 20.0

T = TypeVar("T")


class TestbedError(RuntimeError):
    """The testbed itself could not be set up or torn down (not a failure of the code under test)."""

    __test__ = False  # not a pytest test class


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for every child: no proxies, no SSH agent, no BASTION_* overrides from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("BASTION_", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "DISPLAY"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    check: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run with a mandatory timeout that also kills the child's process group (ProxyJump's
    inner ssh is a grandchild). stdin is /dev/null unless `input` is given."""
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(exc.cmd, timeout, out, err) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise TestbedError(
            f"command failed (exit {result.returncode}): {' '.join(map(str, proc.args))}\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
        )
    return result


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group we created for `proc` (start_new_session=True makes its pgid its pid).

    Only while `proc` is not yet reaped: until then its pid, and so the group id, cannot belong to anyone else.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
