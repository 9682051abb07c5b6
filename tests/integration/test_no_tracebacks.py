"""Every command, walked with hostile arguments and damaged homes: exit 0, 1 or 2, never a traceback, and bad
input (exit 2) is one line. The commands come from the typer app itself, so a new command is walked without
anyone adding it here.

In-process through `bastion.cli.main.main` (the real edge: exceptions become exit codes there) for the bulk,
and a few real `python -m bastion` subprocesses for what only a process shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from bastion.cli.main import app, main

# They run a server (serve, quickstart: never walked) or follow the log forever once the filters are valid
# (audit follow: walked only against the damaged homes, where it must stop at once).
RUNS_FOREVER = {("serve",), ("quickstart",), ("audit", "follow")}
HOSTILE = ["", "99999999d", str(10**30), "-1", "-99999999999999999999", "0", "a\x00b", "\x1b[2J\nforged line",
           "x" * 5000, "/nonexistent/dir/file", "-", "70000", "SHA256:garbage", "[::1", "*", "..", "{dir}"]
ROOT = Path(__file__).resolve().parents[2]


def commands() -> list[tuple[tuple[str, ...], object]]:
    found = []

    def walk(command: object, path: tuple[str, ...]) -> None:
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + (name,))
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), ())
    return found


def run(args: list[str]) -> tuple[int, str, str]:
    """`bastion ARGS` through the real entry point, in this process; a traceback ends up in stderr."""
    escaped = ""
    with CliRunner().isolation(input="") as (out, err, _):
        saved = sys.argv
        sys.argv = ["bastion", *args]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what the edge let through: exactly what must never happen
            escaped = traceback.format_exc()
            code = -1
        finally:
            sys.argv = saved
        return code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace") + escaped


def check(args: list[str], code: int, out: str, err: str) -> None:
    shown = (f"bastion {[a[:80] for a in args]!r} -> exit {code}\nstdout: {out[:1500]}\n"
             f"stderr: {err[:300]}...{err[-1500:]}")
    assert code in (0, 1, 2), shown
    assert "Traceback" not in out + err, shown
    if code == 2 and err.strip():
        assert len(err.strip().splitlines()) == 1, shown


def invocations(path: tuple[str, ...], command: object, value: str, fresh: int) -> list[list[str]]:
    """One invocation per parameter that takes a value: that parameter hostile, every other required one benign."""
    params = [p for p in command.params if not getattr(p, "is_flag", False)]
    result = []
    for hostile in params:
        args = list(path)
        for param in params:
            chosen = value if param is hostile else f"benign{fresh}" if param.required else None
            if chosen is None:
                continue
            if param.param_type_name == "argument":
                args.append(chosen)
            else:
                args += [param.opts[0], chosen]
        result.append(args)
    return result


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # a relative path among the hostile arguments lands here, never elsewhere
    monkeypatch.delenv("BASTION_HOME", raising=False)
    fresh = tmp_path / "fresh"
    assert run(["--home", str(fresh), "init", "--listen", "127.0.0.1:2222"])[0] == 0
    garbage = tmp_path / "garbage"
    assert run(["--home", str(garbage), "init", "--listen", "127.0.0.1:2222"])[0] == 0
    for leftover in garbage.glob("bastion.db-*"):
        leftover.unlink()
    (garbage / "bastion.db").write_bytes(os.urandom(4096) * 4)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    return {"fresh": fresh, "garbage": garbage, "a-file": a_file, "missing": tmp_path / "missing"}


def test_every_command_with_hostile_arguments_and_damaged_homes(homes: dict[str, Path], tmp_path: Path) -> None:
    walked = commands()
    assert {("audit", "auth"), ("user", "add"), ("doctor",)} <= {path for path, _ in walked}
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()
    count = 0
    fresh = 0
    for path, command in walked:
        if path in RUNS_FOREVER:
            continue
        for template in HOSTILE:
            value = template.replace("{dir}", str(a_dir))
            fresh += 1
            for args in invocations(path, command, value, fresh):
                full = ["--home", str(homes["fresh"]), *args]
                check(full, *run(full))
                count += 1
    damaged = 0
    for name, home in homes.items():
        if name == "fresh":
            continue
        # follow first: once `init` has made the missing home, following it would never end
        for path, command in sorted(walked, key=lambda found: found[0] != ("audit", "follow")):
            args = ["--home", str(home), *path]
            for param in command.params:
                if param.required:
                    args += [f"benign-{damaged}"] if param.param_type_name == "argument" else [param.opts[0], "1d"]
            if path in RUNS_FOREVER and path != ("audit", "follow"):
                continue  # serve and quickstart create what is missing and then serve: never in a test walk
            check(args, *run(args))
            damaged += 1
    for value in HOSTILE:  # the global option too
        if value in ("", "-"):
            continue  # "" means the default home, /var/lib/bastion: not this test's to touch
        args = ["--home", value.replace("{dir}", str(a_dir)), "user", "list"]
        check(args, *run(args))
        count += 1
    print(f"walked {len(walked)} commands: {count} hostile invocations on a fresh home, {damaged} on damaged homes")
    assert count > 500 and damaged >= 3 * (len(walked) - len(RUNS_FOREVER))


@pytest.mark.parametrize("args", [
    ["audit", "auth", "--since", "99999999d"],
    ["audit", "verify", "--head", "garbage"],
    ["audit", "verify", "--head", f"{10**30}:{'0' * 64}"],
    ["audit", "prune", "--older-than", "99999999d"],
    ["nosuch"],
])
def test_bad_input_is_one_line_and_exit_2_from_a_real_process(homes: dict[str, Path], args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bastion", "--home", str(homes["fresh"]), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("args", [["audit", "auth"], ["audit", "verify"], ["audit", "stats"], ["audit", "show", "x"]])
def test_a_damaged_database_is_a_problem_found(homes: dict[str, Path], args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "bastion", "--home", str(homes["garbage"]), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"error: {homes['garbage'] / 'bastion.db'}: file is not a database (run `bastion doctor`)\n"
