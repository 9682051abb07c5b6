"""Scenario: the admin runs `bastion ssh-config alice`, alice's real OpenSSH client uses the output verbatim
(`ssh -F FILE root@10.99.0.2`), and reaches the target sshd through the bastion with the bastion's host key
pinned from the start: no trust-on-first-use."""

from __future__ import annotations

import pytest

from testbed import GW_ADDR, LAN_ADDR, LAN_ADDR2, SSH, SSH_PORT

pytestmark = pytest.mark.netns


def test_generated_config_jumps_to_the_target_with_the_bastion_key_pinned(testbed, bastion, keys, tmp_path):
    client = tmp_path / "alice"
    client.mkdir()
    pin_file = client / "known_hosts_bastion"

    # 1. the admin makes alice's config and the pin lines
    config_text = bastion.cli("ssh-config", "alice", "--host", GW_ADDR, "--identity-file", str(keys["alice"].path),
                              "--known-hosts-file", str(pin_file)).stdout.decode()
    pins = bastion.cli_in_process("ssh-config", "alice", "--host", GW_ADDR, "--known-hosts")  # same CLI, no new process
    host_keys = {" ".join(key.split()[:2]) for key in bastion.host_public_keys()}
    assert {line.split(" ", 1)[1] for line in pins.splitlines()} == host_keys
    assert all(f"#      {line}\n" in config_text for line in pins.splitlines())  # the same lines, in the config
    assert f"Match host 10.99.0.*,!{GW_ADDR}\n    ProxyJump bastion\n" in config_text

    # 2. alice saves both as they are; the target's own host key is hers to know, as always
    config = client / "ssh_config"
    config.write_text(config_text)
    pin_file.write_text(pins)
    target_known_hosts = client / "known_hosts_targets"
    assert testbed.target_host_key is not None and testbed.target_client_key is not None
    target_known_hosts.write_text(f"{LAN_ADDR} {' '.join(testbed.target_host_key.public.split()[:2])}\n")

    def ssh(target: str, *command: str):
        # -i and -o reach only the outer ssh (to the target); the jump's inner ssh reads just the config file
        return testbed.run(testbed.gw, [SSH, "-F", config, "-i", testbed.target_client_key.path,
                                        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                                        "-o", f"UserKnownHostsFile={target_known_hosts}",
                                        "-o", "GlobalKnownHostsFile=/dev/null", target, *command], timeout=20)

    # 3. ssh -F config root@10.99.0.2: through the bastion to the real sshd
    result = ssh(f"root@{LAN_ADDR}", "echo hi")
    assert (result.returncode, result.stdout) == (0, b"hi\n"), result.stderr.decode(errors="replace")
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel close")
    [channel] = channels
    assert (channel["user"], channel["target_ip"], channel["target_port"], channel["decision"]) == \
        ("alice", LAN_ADDR, SSH_PORT, "allow"), channel
    [login] = [r for r in bastion.audit("auth") if r["result"] == "success"]
    assert login["key_fingerprint"] == keys["alice"].fingerprint  # the IdentityFile the config named

    # 4. a denied host in a granted range is routed to the bastion too, which says why not
    result = ssh(f"root@{LAN_ADDR2}", "echo hi")
    assert result.returncode != 0
    assert f"administratively prohibited: {LAN_ADDR2}:22 is denied by policy" in result.stderr.decode()

    # 5. no trust-on-first-use: without the pin lines the jump fails, and nothing is learned silently
    pin_file.write_text("")
    result = ssh(f"root@{LAN_ADDR}", "echo hi")
    assert result.returncode != 0 and b"Host key verification failed" in result.stderr, result.stderr
    assert pin_file.read_text() == ""
