"""The revoked_keys watcher (#21, service/revoked_keys.py) on real files: read at start, re-read only when a file
changes (one stat each per look), a file that cannot be read or parsed fails closed with one error line per change
and a warning when it reads again, and every re-read asks for a re-check of live sessions."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from types import SimpleNamespace

from bastion.policy.krl import Credential
from bastion.policy.revocation import RevokedKeyFiles
from bastion.service.revoked_keys import RevokedKeysWatcher, read_files


def make_krl(path, tmp_path, *lines):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ca")], check=True) \
        if not (tmp_path / "ca").exists() else None
    spec = tmp_path / "spec"
    spec.write_text("".join(f"{line}\n" for line in lines))
    new = tmp_path / "new.krl"
    new.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(new), "-s", str(tmp_path / "ca.pub"), str(spec)], check=True)
    os.replace(new, path)


def test_read_files_fails_closed_on_the_first_bad_file(tmp_path):
    good, bad = tmp_path / "good.krl", tmp_path / "bad.krl"
    make_krl(good, tmp_path, "serial: 1")
    bad.write_bytes(b"SSHKRL\n\0\0\0\0\1")
    assert read_files((str(good),)).failure is None
    assert read_files((str(good), str(bad))).failure == f"{bad}: KRL header is truncated"
    assert read_files((str(tmp_path / "missing"),)).failure == f"{tmp_path / 'missing'}: cannot read: No such file " \
                                                                "or directory"
    assert read_files(()) == RevokedKeyFiles()


def test_the_watcher_rereads_on_change_only_and_fails_closed(tmp_path, caplog):
    path = tmp_path / "revoked.krl"
    make_krl(path, tmp_path, "serial: 7")
    context = SimpleNamespace(config=SimpleNamespace(revoked_keys=(str(path),)), revoked_keys=RevokedKeyFiles())
    rechecks = []

    async def changed(why):
        rechecks.append(why)

    async def scenario():
        watcher = RevokedKeysWatcher(context, changed)
        watcher.load()
        ca = (tmp_path / "ca.pub").read_text().split()[1]
        import base64
        credential = Credential(b"key", base64.b64decode(ca), 7, "x")
        assert context.revoked_keys.lists[0][1].revokes(credential) == "certificate serial 7 revoked"
        assert await watcher.check() is False and rechecks == []  # nothing changed: no read, no re-check
        make_krl(path, tmp_path, "serial: 8")
        assert await watcher.check() is True and rechecks == ["revoked keys changed"]
        assert context.revoked_keys.lists[0][1].revokes(credential) is None
        with caplog.at_level(logging.INFO, logger="bastion.service"):
            path.write_bytes(b"not a KRL \xff")
            assert await watcher.check() is True
            assert context.revoked_keys.failure is not None
            os.utime(path, ns=(1, 1))  # changed again, still bad: no second error line
            assert await watcher.check() is True
            make_krl(path, tmp_path, "serial: 7")
            assert await watcher.check() is True and context.revoked_keys.failure is None
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [f"revoked_keys {path}: neither a KRL nor a text file of public keys (not ASCII); refusing "
                          "every key and certificate login until it can be read"]
        assert any("readable again" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert len(rechecks) == 4
        context.config.revoked_keys = ()  # a SIGHUP that drops the file: nothing revoked any more
        assert await watcher.check(force=True) is True and context.revoked_keys == RevokedKeyFiles()

    asyncio.run(scenario())
