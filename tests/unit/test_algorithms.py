"""What the server offers and which user keys are strong enough (bastion/transport/algorithms.py), on real ssh-keygen keys.

The negotiation itself is measured against sshd with ssh-audit in tests/integration/test_algorithms_loopback.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest

from bastion.transport import algorithms
from bastion.config import Config, load_config, render_config
from bastion.errors import ConfigError, StoreError
from bastion.policy.file import PolicyFileError, parse_policy
from bastion.store.sqlite import parse_public_keys

STRONG = [("ed25519", None), ("ecdsa", None), ("rsa", 2048), ("rsa", 3072)]
WEAK = [("rsa", 1024, "RSA keys need at least 2048 bits; this one has 1024"), ("dsa", None, "DSA keys are refused")]


def keygen(directory: Path, kind: str, bits: int | None, comment: str = "someone@laptop") -> tuple[str, str]:
    """A public key line made by ssh-keygen, and its fingerprint as ssh-keygen prints it."""
    path = directory / f"id_{kind}_{bits}"
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)] + (["-b", str(bits)] if bits else [])
    made = subprocess.run(args, capture_output=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"this ssh-keygen makes no {kind} keys: {made.stderr.decode().strip()}")
    listing = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"], capture_output=True, text=True,
                             timeout=10, check=True)
    return Path(f"{path}.pub").read_text().strip(), listing.stdout.split()[1]


@pytest.mark.parametrize("kind, bits", STRONG)
def test_strong_keys_pass(tmp_path, kind, bits):
    line, _ = keygen(tmp_path, kind, bits)
    key = asyncssh.import_public_key(line)
    assert algorithms.weak_key_reason(key) is None
    assert algorithms.weak_key_reason(key.public_data) is None  # the same rule on the wire encoding


@pytest.mark.parametrize("kind, bits, why", WEAK)
def test_weak_keys_are_named_with_the_reason(tmp_path, kind, bits, why):
    line, fingerprint = keygen(tmp_path, kind, bits, "old@laptop")
    key = asyncssh.import_public_key(line)
    assert why in algorithms.weak_key_reason(key)
    assert algorithms.weak_key_reason(key.public_data) == algorithms.weak_key_reason(key)
    assert algorithms.describe_key(key.public_data, "old@laptop") == f"{line.split()[0]} {fingerprint} (old@laptop)"
    # user add / policy apply read keys here
    with pytest.raises(StoreError) as refused:
        parse_public_keys("# alice's keys\n" + line, "keys.pub")
    assert str(refused.value).startswith(f"keys.pub:2: {line.split()[0]} {fingerprint} (old@laptop): {why}")


def test_a_policy_file_refuses_a_short_rsa_key_naming_it(tmp_path):
    line, fingerprint = keygen(tmp_path, "rsa", 1024, "old@laptop")
    text = f'[users.alice]\ngroups = []\nkeys = ["{line}"]\n'
    with pytest.raises(PolicyFileError) as refused:
        parse_policy(text, "team.toml")
    message = str(refused.value)
    assert message.startswith("team.toml:3: users.alice.keys: key 1: ssh-rsa ")
    assert fingerprint in message and "(old@laptop)" in message and "at least 2048 bits" in message
    assert "\n" not in message
    strong, _ = keygen(tmp_path, "rsa", 2048)
    assert parse_policy(f'[users.alice]\nkeys = ["{strong}"]\n').users["alice"].keys == (strong,)


def test_host_keys_sign_without_sha1():
    rsa, ed25519 = asyncssh.generate_private_key("ssh-rsa", key_size=2048), asyncssh.generate_private_key("ssh-ed25519")
    pairs = algorithms.host_key_pairs([ed25519, rsa])
    assert [pair.host_key_algorithms for pair in pairs] == [(b"ssh-ed25519",), (b"rsa-sha2-256", b"rsa-sha2-512")]
    assert b"ssh-rsa" not in pairs[1].sig_algorithms
    with pytest.raises(ConfigError, match="cannot sign"):
        algorithms.host_key_pairs([asyncssh.generate_private_key("ecdsa-sha2-nistp256")])


def test_a_weak_host_key_is_refused_naming_its_file(tmp_path):
    line, fingerprint = keygen(tmp_path, "rsa", 1024)
    key = asyncssh.read_private_key(tmp_path / "id_rsa_1024")
    with pytest.raises(ConfigError) as refused:
        algorithms.host_key_pairs([key])
    assert str(refused.value).startswith(f"{tmp_path / 'id_rsa_1024'}: host key ssh-rsa {fingerprint}: RSA keys need")


def test_server_options_offer_nothing_weaker_than_openssh():
    options = algorithms.server_options(compression=False)
    offered = [name for names in options.values() for name in names]
    for weak in ("sha1", "ssh-rsa", "ssh-dss", "group14", "group15", "group17", "group-exchange", "nistp256-sha256",
                 "ecdh-sha2", "1.3.132.0.10", "@ssh.com", "umac-64", "cbc", "arcfour", "zlib"):
        assert not [name for name in offered if weak in name and name != "rsa-sha2-256"], weak
    # the benchmarks' ciphers, which the fast path speeds up, stay
    assert {"aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"} <= set(options["encryption_algs"])
    assert options["compression_algs"] == ["none"]
    assert algorithms.server_options(compression=True)["compression_algs"] == ["none", "zlib@openssh.com"]
    asyncssh.SSHServerConnectionOptions(server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                        **options)  # asyncssh takes every name


def test_compression_is_a_config_flag(tmp_path):
    assert load_config(tmp_path, environ={}).compression is False
    assert load_config(tmp_path, environ={"BASTION_COMPRESSION": "yes"}).compression is True
    (tmp_path / "config.toml").write_text("compression = true\n")
    assert load_config(tmp_path, environ={}).compression is True
    config = Config(home=tmp_path, compression=True)
    (tmp_path / "config.toml").write_text(render_config(config))
    assert load_config(tmp_path, environ={}) == config
    (tmp_path / "config.toml").write_text('compression = "maybe"\n')
    with pytest.raises(ConfigError, match="compression must be true or false"):
        load_config(tmp_path, environ={})
