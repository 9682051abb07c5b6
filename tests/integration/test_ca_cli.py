"""`bastion ca init`, `bastion ca sign` and `user import` of cert-authority lines (#21), through the real CLI; the
certificates it signs are checked with the real `ssh-keygen -L` and used by the real OpenSSH client."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.test_serve_loopback import bastion, home  # noqa: F401 (fixtures)


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub").read_text().strip()


def test_import_of_a_cert_authority_line_is_refused_with_the_policy_lines_to_add(home, tmp_path):
    ca_line = keygen(tmp_path / "ca", "ca@corp")
    user_line = keygen(tmp_path / "alice", "alice@laptop")
    keys = tmp_path / "home" / "alice" / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text(f'cert-authority,principals="alice" {ca_line}\n{user_line}\n')

    refused = bastion(home, "user", "import", str(keys))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and f"{keys}:1: a cert-authority line trusts a CA" in refused.stderr
    assert bastion(home, "user", "list", "--json").stdout.strip() == "[]"  # nothing imported, not even alice's key
    added = bastion(home, "user", "add", "alice", "--key", str(keys))  # the same refusal for `user add`
    assert added.returncode == 2 and "cert-authority" in added.stderr

    policy = tmp_path / "ca.toml"
    policy.write_text(refused.stdout)  # the printed lines are a policy file as they stand
    applied = bastion(home, "policy", "apply", str(policy))
    assert applied.returncode == 0, applied.stderr
    assert "+ CA corp trusted for user certificates" in applied.stdout
    shown = bastion(home, "policy", "show").stdout
    assert "[cas.corp]" in shown and ca_line.split()[1] in shown
