"""Every file the CLI writes (audit export, backup, ssh-config -o, quickstart's files) is created without following a
link planted at its name or at its temporary name, and never over an existing file; `-` is standard output.

The attacker's move in each case: a symbolic link, in a directory the admin writes to, from the name the command
will write to a file the attacker wants clobbered (the victim). The victim must come out unchanged."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bastion import safe_files
from bastion.cli.main import main
from bastion.config import Config
from bastion.errors import BastionError
from bastion.ops.quickstart import prepare
from bastion.safe_files import FileExists, new_file, write_new
from bastion.service.home import initialize
from bastion.store.sqlite import Store, parse_public_keys

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINENcl9aqFLzSvX7n9cWleGiAZplTIboPtLtlNjcQGAz alice@example"
VICTIM_TEXT = "root:x:0:0:the victim's own content\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An initialized home with a user, a policy and some audit events."""
    home = tmp_path_factory.mktemp("safe-files") / "home"
    initialize(Config(home=home, listen="127.0.0.1:2222"))
    store = Store(home / "bastion.db")
    store.add_user("alice", parse_public_keys(KEY))
    store.close()
    return home


@pytest.fixture
def victim(tmp_path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text(VICTIM_TEXT)
    return victim


@pytest.fixture
def bastion(capfdbinary, monkeypatch):
    """`bastion --home HOME ARGS...` through the installed entry point (`main`, where errors become exit codes),
    in this process: the output is captured at the file descriptors, so binary standard output is too."""
    monkeypatch.delenv("BASTION_HOME", raising=False)

    def run(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
        capfdbinary.readouterr()
        monkeypatch.setattr(sys, "argv", ["bastion", "--home", str(home), *args])
        with pytest.raises(SystemExit) as exited:
            main()
        out, err = capfdbinary.readouterr()
        return subprocess.CompletedProcess(sys.argv, exited.value.code or 0, out, err)

    return run


def assert_refused(result: subprocess.CompletedProcess[bytes], *words: str) -> None:
    error = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, error, result.stdout[:300])
    assert len(error.splitlines()) == 1 and error.startswith("error: ") and "Traceback" not in error, error
    for word in words:
        assert word in error


# ---- the shared helper ---------------------------------------------------------------------------------


def test_new_file_never_follows_a_link_at_its_temporary_name(tmp_path, victim, monkeypatch):
    """The temporary name is random; if someone still got a link there first, creation skips to another name."""
    planted = tmp_path / ".out.planted.part"
    planted.symlink_to(victim)
    names = itertools.chain([planted.name], (f".out.{n}.part" for n in itertools.count()))
    monkeypatch.setattr(safe_files, "temporary_name", lambda name: next(names))
    write_new(tmp_path / "out", b"new content\n")
    assert (tmp_path / "out").read_bytes() == b"new content\n" and victim.read_text() == VICTIM_TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.planted.part", "out", "victim"]  # no leftovers


def test_new_file_publishes_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with new_file(tmp_path / "out") as handle:
            handle.write("half a file")
            raise RuntimeError("the export failed half way")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("replace", [False, True])
def test_new_file_refuses_a_link_at_its_name_even_a_dangling_one(tmp_path, victim, replace):
    for target in (victim, tmp_path / "nothing-there"):
        link = tmp_path / "out"
        link.symlink_to(target)
        with pytest.raises(FileExists, match="symbolic link"):
            write_new(link, b"new", replace=replace)
        assert victim.read_text() == VICTIM_TEXT and not (tmp_path / "nothing-there").exists()
        link.unlink()


# ---- audit export ---------------------------------------------------------------------------------------


def test_audit_export_never_follows_links_never_overwrites_and_dash_is_stdout(home, tmp_path, victim, bastion):
    dest = tmp_path / "audit.jsonl"
    # 1. the reported attack: a link at DEST.part (the old temporary name); the export goes to DEST, the victim
    #    is untouched
    Path(f"{dest}.part").symlink_to(victim)
    done = bastion(home, "audit", "export", str(dest))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == VICTIM_TEXT
    assert json.loads(dest.read_text().splitlines()[0])["format"] == "bastion-audit-export"
    assert dest.stat().st_mode & 0o777 == 0o600
    # 2. DEST exists: refused, unchanged
    before = dest.read_bytes()
    assert_refused(bastion(home, "audit", "export", str(dest)), "already exists")
    assert dest.read_bytes() == before
    # 3. DEST is a link to the victim: refused, the victim unchanged
    link = tmp_path / "link.jsonl"
    link.symlink_to(victim)
    assert_refused(bastion(home, "audit", "export", str(link)), "symbolic link")
    assert victim.read_text() == VICTIM_TEXT
    # 4. `-`: the export alone on standard output, the summary on standard error
    streamed = bastion(home, "audit", "export", "-")
    assert streamed.returncode == 0 and streamed.stdout == before.replace(
        before.splitlines()[0], streamed.stdout.splitlines()[0])  # only exported_at differs
    assert streamed.stderr.decode().startswith("exported ") and "standard output" in streamed.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.part", "link.jsonl", "victim"]


# ---- backup ---------------------------------------------------------------------------------------------


def test_backup_never_follows_links_never_overwrites_and_dash_is_stdout(home, tmp_path, victim, bastion):
    # 1. DEST is a link to the victim, or to a directory: refused
    link = tmp_path / "b.db"
    link.symlink_to(victim)
    assert_refused(bastion(home, "backup", str(link)), "already exists")
    assert victim.read_text() == VICTIM_TEXT
    backups = tmp_path / "backups"
    backups.mkdir()
    (tmp_path / "backups-link").symlink_to(backups)
    assert_refused(bastion(home, "backup", str(tmp_path / "backups-link")), "already exists")
    assert list(backups.iterdir()) == []
    # 2. a new DEST is written (by SQLite in a private directory, then linked); an existing one is refused
    dest = tmp_path / "new.db"
    done = bastion(home, "backup", str(dest))
    assert done.returncode == 0, done.stderr
    assert dest.stat().st_mode & 0o777 == 0o600
    before = dest.read_bytes()
    assert_refused(bastion(home, "backup", str(dest)), "already exists")
    assert dest.read_bytes() == before
    # 3. `-`: the database on standard output, a database that opens
    streamed = bastion(home, "backup", "-")
    assert streamed.returncode == 0 and streamed.stdout.startswith(b"SQLite format 3\0"), streamed.stderr
    restored = tmp_path / "restored.db"
    restored.write_bytes(streamed.stdout)
    conn = sqlite3.connect(restored)
    assert conn.execute("SELECT name FROM users").fetchall() == [("alice",)]
    conn.close()
    assert "standard output" in streamed.stderr.decode()
    assert not [p for p in home.iterdir() if p.name.startswith(".backup-")]  # the staging directory is gone


# ---- ssh-config -o --------------------------------------------------------------------------------------


def test_ssh_config_output_never_follows_links_never_overwrites_and_dash_is_stdout(home, tmp_path, victim, bastion):
    args = ("ssh-config", "alice", "--host", "bastion.example.com")
    link = tmp_path / "alice.conf"
    link.symlink_to(victim)
    assert_refused(bastion(home, *args, "-o", str(link)), "symbolic link")
    assert victim.read_text() == VICTIM_TEXT
    link.unlink()
    done = bastion(home, *args, "-o", str(link))
    assert done.returncode == 0 and done.stdout.decode() == f"wrote {link}\n", done.stderr
    assert link.read_text().startswith("# OpenSSH client configuration for alice")
    assert_refused(bastion(home, *args, "--known-hosts", "-o", str(link)), "already exists")
    assert link.read_text().startswith("# OpenSSH client configuration for alice")
    assert bastion(home, *args, "-o", "-").stdout.decode().startswith("# OpenSSH client configuration for alice")


# ---- quickstart -----------------------------------------------------------------------------------------


def test_quickstart_rewrites_its_own_files_but_never_through_a_link(tmp_path, victim):
    key = tmp_path / "me.pub"
    key.write_text(KEY + "\n")
    demo_home = tmp_path / "demo"
    first = prepare(demo_home, "127.0.0.1:2222", key, "me", 7, environ={"HOME": str(tmp_path)})
    # a second run rewrites the demo's own files (the echo port changed)
    prepare(demo_home, "127.0.0.1:2222", key, "me", 8, environ={"HOME": str(tmp_path)})
    assert "127.0.0.1:22,8" in first.ssh_config.read_text()
    # a link planted at either name is not written through: the run stops with an error
    for name in ("ssh_config", "known_hosts"):
        planted = demo_home / name
        planted.unlink()
        planted.symlink_to(victim)
        with pytest.raises(BastionError, match="symbolic link"):
            prepare(demo_home, "127.0.0.1:2222", key, "me", 9, environ={"HOME": str(tmp_path)})
        assert victim.read_text() == VICTIM_TEXT and planted.is_symlink()
        planted.unlink()
        prepare(demo_home, "127.0.0.1:2222", key, "me", 9, environ={"HOME": str(tmp_path)})
    assert not [p for p in demo_home.iterdir() if p.name.endswith(".part")]
    assert os.path.getsize(demo_home / "known_hosts") > 0
