"""What --help, -h, --version and shell completion show, through the real `bastion` process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.main

from bastion.cli.main import app, main
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def bastion(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bastion", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, "COLUMNS": "100", "BASTION_HOME": "/nonexistent", **env})


def in_process(*args: str) -> tuple[int, str]:
    """`bastion ARGS` through the real entry point in this process (a process each for ~40 commands is slow)."""
    with CliRunner().isolation(env={"COLUMNS": "100", "BASTION_HOME": "/nonexistent"}) as (out, _err, _):
        saved, sys.argv = sys.argv, ["bastion", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        finally:
            sys.argv = saved
        return code, out.getvalue().decode()


def command_paths() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        found.append(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.mark.parametrize("command", ["channels", "sessions", "follow"])
def test_target_examples_survive_in_help(command: str) -> None:
    proc = bastion("audit", command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"[\s│]+", " ", proc.stdout)  # the help wraps inside a box: join it up again
    assert "[fd00::/64]:22" in text and "HOST|CIDR[:PORT]" in text, proc.stdout


def test_every_help_is_free_of_type_placeholders_and_h_is_help() -> None:
    for path in command_paths():
        code, long = in_process(*path, "--help")
        assert code == 0, path
        for placeholder in ("<bool>", "<str>", "<list[", "<int", "<path>", "<Path>"):
            assert placeholder not in long, (path, placeholder, long)
        assert in_process(*path, "-h") == (0, long), path
    assert len(command_paths()) > 20
    assert bastion("audit", "prune", "-h").stdout == bastion("audit", "prune", "--help").stdout


def test_placeholders_are_named_after_the_value() -> None:
    text = bastion("user", "add", "--help").stdout
    assert re.search(r"--key\s+KEY\b", text) and re.search(r"\bNAME\b", text), text


def test_version() -> None:
    proc = bastion("--version")
    assert proc.returncode == 0 and proc.stdout == f"bastion {version('bastion')}\n", proc


def test_shell_completion_is_available() -> None:
    help_text = bastion("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    script = bastion("--show-completion", "bash", _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    assert script.returncode == 0 and "_bastion_completion" in script.stdout, script
    completed = bastion(_BASTION_COMPLETE="complete_bash", COMP_WORDS="bastion audit ve", COMP_CWORD="2")
    assert completed.returncode == 0 and completed.stdout.split() == ["verify"], completed
