"""`policy apply` as declared state (#20 items 1 and 3), through the real CLI on a real home: the files are the
whole policy, the plan is printed before anything changes (and alone with --dry-run), keys are never lost to
a policy file, names defined twice are an error, and the live tunnels a change would close are named."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub")


def policy_of(home: Path) -> dict:
    return json.loads(bastion(home, "policy", "show", "--json").stdout)


def test_the_files_are_the_whole_policy_and_the_plan_says_what_is_removed(home, tmp_path):
    assert bastion(home, "user", "add", "bob", "--key", str(keygen(tmp_path / "bob", "bob@x"))).returncode == 0
    first = write(tmp_path / "first.toml", '[groups.legacy]\nallow = ["10.9.0.0/16:22"]\n'
                  '[users.alice]\ngroups = ["legacy"]\nallow = ["10.1.2.3:22"]\n'
                  '[users.bob]\nallow = ["10.5.5.5:443"]\n')
    applied = bastion(home, "policy", "apply", str(first))
    assert applied.returncode == 0, applied.stderr
    assert "  + alice: open 10.9.0.0/16:22 via group legacy" in applied.stdout
    assert "  + bob: open 10.5.5.5:443 via user bob" in applied.stdout
    second = write(tmp_path / "second.toml", '[users.alice]\nallow = ["10.1.2.3:22", "10.1.2.4:22"]\n')
    before = policy_of(home)
    dry = bastion(home, "policy", "apply", "--dry-run", str(second))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "access granted:",
        "  + alice: open 10.1.2.4:22 via user alice",
        "access removed:",
        "  - alice: open 10.9.0.0/16:22 via group legacy",
        "  - bob: open 10.5.5.5:443 via user bob",
        "groups: - legacy",
        f"dry run: nothing changed ({second})",
    ]
    assert policy_of(home) == before
    assert bastion(home, "policy", "apply", str(second)).returncode == 0
    after = policy_of(home)
    assert after["groups"] == {} and after["users"]["bob"]["allow"] == []
    users = {u["name"]: u for u in json.loads(bastion(home, "user", "list", "--json").stdout)}
    assert [k["comment"] for k in users["bob"]["keys"]] == ["bob@x"]  # grants gone, keys kept
    again = bastion(home, "policy", "apply", str(second))
    assert again.stdout.splitlines()[0] == "no change in access"


def test_several_files_and_a_directory_and_a_name_defined_twice(home, tmp_path):
    directory = tmp_path / "policy.d"
    directory.mkdir()
    write(directory / "10-groups.toml", '[groups.ops]\nallow = ["10.20.0.0/16:22"]\n')
    write(directory / "20-users.toml", '[users.alice]\ngroups = ["ops"]\n')
    result = bastion(home, "policy", "apply", str(directory))
    assert result.returncode == 0, result.stderr
    assert f"applied 2 files: 1 users, 1 groups" in result.stdout
    assert policy_of(home)["users"]["alice"]["groups"] == ["ops"]
    twice = write(tmp_path / "twice.toml", '[groups.ops]\nallow = ["10.0.0.0/8:22"]\n')
    refused = bastion(home, "policy", "apply", str(directory), str(twice))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{twice}: groups.ops is already defined in {directory / '10-groups.toml'}" in refused.stderr
    assert policy_of(home)["groups"]["ops"]["allow"] == ["10.20.0.0/16:22"]  # nothing changed


def test_exit_codes_applied_refused_usage(home, tmp_path):
    broken = write(tmp_path / "broken.toml", '[users.alice]\nallow = ["10.1.2.3:99999"]\n')
    refused = bastion(home, "policy", "apply", str(broken))
    assert refused.returncode == 1 and "broken.toml:2" in refused.stderr
    unknown_group = write(tmp_path / "ghost.toml", '[users.alice]\ngroups = ["ghosts"]\n')
    assert bastion(home, "policy", "apply", str(unknown_group)).returncode == 1
    missing = bastion(home, "policy", "apply", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert bastion(home, "policy", "apply", "--no-such-flag", str(broken)).returncode == 2
    assert bastion(home, "policy", "apply", str(write(tmp_path / "ok.toml", ""))).returncode == 0


def test_a_key_from_a_policy_file_goes_with_it_and_one_added_by_hand_stays(home, tmp_path):
    by_hand = keygen(tmp_path / "hand", "alice@hand")
    from_file = keygen(tmp_path / "file", "alice@file")
    assert bastion(home, "user", "add", "alice", "--key", str(by_hand)).returncode == 0
    with_keys = write(tmp_path / "keys.toml", f'[users.alice]\nkeys = ["{from_file.read_text().strip()}", '
                                               f'"{by_hand.read_text().strip()}"]\n')
    added = bastion(home, "policy", "apply", str(with_keys))
    assert added.returncode == 0 and "  + alice: key ssh-ed25519" in added.stdout and "alice@file" in added.stdout
    without = write(tmp_path / "nokeys.toml", '[users.alice]\nallow = ["10.1.2.3:22"]\n')
    dry = bastion(home, "policy", "apply", "--dry-run", str(without))
    removed = [line for line in dry.stdout.splitlines() if ": key " in line]
    assert len(removed) == 1 and removed[0].startswith("  - alice: key ssh-ed25519")
    assert "(a policy file added it; none lists it now)" in removed[0]
    assert bastion(home, "policy", "apply", str(without)).returncode == 0
    users = json.loads(bastion(home, "user", "list", "--json").stdout)
    assert [k["comment"] for k in users[0]["keys"]] == ["alice@hand"]


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_the_plan_names_the_live_tunnel_a_change_would_close(home, echo_server, tmp_path):
    key = tmp_path / "alice"
    assert bastion(home, "user", "add", "alice", "--key", str(keygen(key, "alice@x"))).returncode == 0
    grant = write(tmp_path / "grant.toml", f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(home, "policy", "apply", str(grant)).returncode == 0
    proc, port = start_serve(home)
    tunnel = None
    try:
        known = tmp_path / "known_hosts"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        tunnel = subprocess.Popen(
            [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes", "-o",
             "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-W", f"127.0.0.2:{echo_server}",
             "alice@127.0.0.1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tunnel.stdin.write(b"ping\n")
        tunnel.stdin.flush()
        assert tunnel.stdout.readline() == b"ping\n"
        revoke = write(tmp_path / "revoke.toml", "[users.alice]\n")
        dry = bastion(home, "policy", "apply", "--dry-run", str(revoke))
        lines = [line for line in dry.stdout.splitlines() if "would close" in line]
        assert len(lines) == 1 and lines[0].startswith(f"  - alice: tunnel to 127.0.0.2:{echo_server} (session ")
        assert "alice may not reach" in lines[0]
        assert bastion(home, "policy", "apply", str(revoke)).returncode == 0
        assert tunnel.wait(timeout=15) is not None  # the running server closed it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # its row is closed once the server has written it
            again = bastion(home, "policy", "apply", "--dry-run", str(revoke))
            if "would close" not in again.stdout:
                break
            time.sleep(0.2)
        assert "would close" not in again.stdout
    finally:
        if tunnel is not None and tunnel.poll() is None:
            tunnel.kill()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
