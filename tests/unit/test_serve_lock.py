"""serve_lock: one server per home, held by a real flock between real processes (no root needed; the scenario with
two `bastion serve` processes is tests/e2e/test_e2e_serve_lock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.service.control import AlreadyRunning, serve_lock
from bastion.errors import BastionError

TAKE_LOCK = "import sys; from pathlib import Path; from bastion.service.control import serve_lock\n" \
            "with serve_lock(Path(sys.argv[1])):\n    print('locked', flush=True); sys.stdin.read()\n"


def other_process_takes(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", TAKE_LOCK, str(home)], input="", capture_output=True, text=True,
                          timeout=30)


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with serve_lock(tmp_path):
        assert (tmp_path / "serve.lock").read_text() == f"{os.getpid()}\n"
        refused = other_process_takes(tmp_path)
        assert refused.returncode != 0 and f"already running (pid {os.getpid()})" in refused.stderr
        with pytest.raises(AlreadyRunning):  # another open of the file, even in the same process
            with serve_lock(tmp_path):
                pass
    assert (tmp_path / "serve.lock").read_text() == ""  # a clean stop leaves no pid
    assert other_process_takes(tmp_path).returncode == 0


def test_a_killed_holder_leaves_nothing_that_blocks(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", TAKE_LOCK, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(AlreadyRunning, match=f"already running \\(pid {holder.pid}\\)"):
            with serve_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert (tmp_path / "serve.lock").read_text() == f"{holder.pid}\n"  # stale content, but no lock
    with serve_lock(tmp_path):
        assert (tmp_path / "serve.lock").read_text() == f"{os.getpid()}\n"


def test_a_link_planted_at_the_lock_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "serve.lock").symlink_to(victim)
    with pytest.raises(BastionError, match="cannot open the serve lock"):
        with serve_lock(tmp_path):
            pass
    assert victim.read_text() == "precious\n"
