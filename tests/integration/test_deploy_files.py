"""deploy/: the systemd unit passes `systemd-analyze verify` and keeps its promises (unprivileged, only
CAP_NET_BIND_SERVICE, sandboxed, SIGHUP reload); the container files are lint-checked (Docker itself is not
needed); and the install commands have help with an example and a place in the README."""

from __future__ import annotations

import re
from dataclasses import fields
import shutil
import subprocess
import sys
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli.main import app
from bastion.config import Config, load_config
from bastion.policy.netguard import DEFAULT_INTERNAL_NETWORKS
from bastion.ops.policy_files import load_policy_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "bastion.service"
INSTALLED_BASTION = "/opt/bastion/bin/bastion"  # where the README's install guide puts the CLI


def unit_settings(text: str) -> dict[str, list[str]]:
    """'Key=value' lines of a unit file (comments and section headers dropped), every value of each key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# ---- the systemd unit ------------------------------------------------------------------------------------


def test_unit_runs_unprivileged_with_only_the_bind_capability_and_a_sandbox():
    unit = unit_settings(UNIT.read_text())
    assert unit["User"] == ["bastion"] and unit["Group"] == ["bastion"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["StateDirectory"] == ["bastion"] and unit["StateDirectoryMode"] == ["0700"]
    assert "BASTION_HOME=/var/lib/bastion" in unit["Environment"]  # the StateDirectory
    assert unit["ExecStart"] == [f"{INSTALLED_BASTION} serve"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # readiness is the server's own READY=1 (service/sd_notify.py), also from a worker of `serve --workers`
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["all"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "RestrictSUIDSGID": "yes",
                       "RestrictNamespaces": "yes", "SystemCallArchitectures": "native", "UMask": "0077"}.items():
        assert unit.get(key) == [value], key
    assert unit["SystemCallFilter"][0] == "@system-service"
    families = unit["RestrictAddressFamilies"][0].split()
    assert set(families) == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd); the unit was not verified")
    # verify checks that ExecStart exists: point it at this checkout's entry point instead of /opt/bastion
    entry_point = Path(sys.executable).parent / "bastion"
    if not entry_point.exists():
        pytest.skip(f"no bastion entry point at {entry_point} to stand in for {INSTALLED_BASTION}")
    unit = tmp_path / "bastion.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BASTION, str(entry_point)))
    result = subprocess.run([tool, "verify", unit], capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0): any message about our unit fails the test.
    about_unit = [line for line in result.stderr.splitlines() if "bastion.service" in line]
    assert result.returncode == 0 and not about_unit, result.stderr


# ---- the container files (lint level) --------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                             if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in joined.splitlines()) if line]


@pytest.mark.parametrize("name, context", [("Dockerfile", ROOT), ("target.Dockerfile", DEPLOY)])
def test_dockerfiles_pin_bases_copy_existing_files_and_end_non_root(name, context):
    instructions = dockerfile_instructions(DEPLOY / name)
    kinds = [kind for kind, _ in instructions]
    assert kinds.count("CMD") == 1 and "HEALTHCHECK" in kinds
    for kind, args in instructions:
        if kind == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag for {image}"
        if kind in ("COPY", "ADD") and "--from=" not in args:
            *sources, _ = [word for word in args.split() if not word.startswith("--")]
            for source in sources:
                assert (context / source).exists(), f"{name}: COPY source {source} is not in {context}"
    final_stage = kinds[len(kinds) - 1 - kinds[::-1].index("FROM"):]
    if name == "Dockerfile":
        assert "USER" in final_stage, "the bastion image must not run as root"
        user = dict(instructions[len(kinds) - len(final_stage):])["USER"].split(":")[0]
        assert user not in ("root", "0")
        assert final_stage.index("USER") < final_stage.index("CMD")


def test_dockerfile_port_listen_and_ignore_file_agree():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    env = " ".join(args for kind, args in instructions if kind == "ENV")
    port = re.search(r"BASTION_LISTEN=0\.0\.0\.0:(\d+)", env).group(1)
    assert ("EXPOSE", port) in instructions
    assert f'"127.0.0.1:{port}:{port}"' in (DEPLOY / "compose.yaml").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything out, then the few sources back in
    for needed in ("!pyproject.toml", "!README.md", "!bastion/", "!deploy/docker-entrypoint.sh"):
        assert needed in ignore


def test_entrypoint_is_valid_posix_shell():
    script = DEPLOY / "docker-entrypoint.sh"
    assert script.stat().st_mode & 0o111, "the entry point must be executable"
    result = subprocess.run(["sh", "-n", script], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-s", "sh", script], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout


def test_target_sshd_settings_are_accepted_by_sshd(tmp_path):
    sshd, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh-keygen")
    if not Path(sshd).exists() or keygen is None:
        pytest.skip("needs sshd and ssh-keygen (Debian: openssh-server) to check the demo target's settings")
    dockerfile = (DEPLOY / "target.Dockerfile").read_text()
    block = re.search(r"printf '%s\\n' \\\n(.*?)> /etc/ssh/sshd_config.d/demo.conf", dockerfile, re.S).group(1)
    settings = re.findall(r"'([^']+)'", block)
    assert "PasswordAuthentication no" in settings
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "host_key"], check=True, timeout=10)
    config = tmp_path / "sshd_config"
    config.write_text(f"HostKey {tmp_path / 'host_key'}\n" + "\n".join(settings) + "\n")
    result = subprocess.run([sshd, "-t", "-f", config], capture_output=True, text=True, timeout=10)
    if "privilege separation directory" in result.stderr:
        pytest.skip(f"sshd -t needs /run/sshd here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


def test_compose_builds_from_existing_files_and_grants_only_the_private_target():
    compose = (DEPLOY / "compose.yaml").read_text()
    for context, dockerfile in re.findall(r"context: (\S+)\n\s+dockerfile: (\S+)", compose):
        assert (DEPLOY / context / dockerfile).is_file(), (context, dockerfile)
    for source in re.findall(r"source: (\./\S+)", compose):
        assert (DEPLOY / source).is_file(), source
    subnet = ip_network(re.search(r"subnet: (\S+)", compose).group(1))
    target = ip_address(re.search(r"ipv4_address: (\S+)", compose).group(1))
    assert target in subnet and any(subnet.subnet_of(n) for n in DEFAULT_INTERNAL_NETWORKS if n.version == 4)
    assert re.search(r"private:\n\s+internal: true", compose), "the target network must have no way out"

    policy = load_policy_file(DEPLOY / "compose-policy.toml")
    assert [rule.text for rule in policy.users["demo"].allow] == [f"{target}:22"]
    try:
        import yaml  # optional: a full parse when PyYAML happens to be installed
    except ImportError:
        return
    services = yaml.safe_load(compose)["services"]
    assert set(services) == {"bastion", "target"}


def test_compose_fleet_sets_only_known_keys_mounts_existing_files_and_haproxy_sends_proxy_v2(tmp_path):
    """compose-fleet.yaml (#22) is not run in CI (no Docker engine): its config keys are bastion's and load, its
    files exist, HAProxy sends PROXY v2 to both nodes, and only HAProxy's address may send the headers."""
    compose = (DEPLOY / "compose-fleet.yaml").read_text()
    header = compose.split("\nname:", 1)[0]
    for words in ("Not run in CI", "docker compose -f deploy/compose-fleet.yaml up", "bastion store migrate",
                  "bastion user add", "bastion policy apply", "ssh -J demo@127.0.0.1:2222"):
        assert words in header, words
    # every BASTION_<KEY> is a Config key, and each value loads as bastion's own parser takes it
    settings = re.findall(r"^\s+BASTION_([A-Z_]+): (\S+)$", compose, re.M)
    assert {name for name, _ in settings} >= {"STORE", "AUDIT_SHIP_TO", "PROXY_PROTOCOL_FROM", "NODE_ID"}
    known = {field.name for field in fields(Config)}
    for name, value in settings:
        assert name.lower() in known, f"BASTION_{name} is not a bastion config key"
        load_config(home=tmp_path, environ={f"BASTION_{name}": value.strip('"')})
    assert sorted(value for name, value in settings if name == "NODE_ID") == ["node1", "node2"]
    # files it builds from and mounts
    for context, dockerfile in re.findall(r"context: (\S+)\n\s+dockerfile: (\S+)", compose):
        assert (DEPLOY / context / dockerfile).is_file(), (context, dockerfile)
    sources = re.findall(r"source: (\./\S+)", compose)
    assert sources and all((DEPLOY / source).is_file() for source in sources), sources
    declared = compose.split("\nvolumes:\n", 1)[1]
    for volume in re.findall(r"^\s+- ([a-z0-9-]+):/", compose, re.M):
        assert f"\n  {volume}:" in "\n" + declared, f"volume {volume} is not declared"
    # HAProxy: its config, PROXY v2 to each node, and its fixed address is the nodes' proxy_protocol_from
    haproxy_cfg = re.search(r"source: \./(\S+)\n\s+target: /usr/local/etc/haproxy/haproxy.cfg", compose).group(1)
    servers = [line.split() for line in (DEPLOY / haproxy_cfg).read_text().splitlines()
               if line.strip().startswith("server ")]
    assert len(servers) == 2 and all("send-proxy-v2" in server for server in servers)
    addresses = dict(re.findall(r"\n  (\w+):\n(?:(?!\n  \w).)*?ipv4_address: (\S+)", compose, re.S))
    assert sorted(server[2] for server in servers) == [f"{addresses['node1']}:2222", f"{addresses['node2']}:2222"]
    balancers = load_config(home=tmp_path, environ={"BASTION_PROXY_PROTOCOL_FROM": dict(settings)[
        "PROXY_PROTOCOL_FROM"]}).proxy_protocol_from
    assert [str(network) for network in balancers] == [f"{addresses['haproxy']}/32"]
    assert addresses["target"] == "10.89.0.10"  # what compose-policy.toml grants
    tool = shutil.which("haproxy")
    if tool is not None:
        check = subprocess.run([tool, "-c", "-f", DEPLOY / haproxy_cfg], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr


# ---- help and docs for the install commands --------------------------------------------------------------


@pytest.mark.parametrize("command", ["doctor", "ssh-config", "quickstart", "backup"])
def test_install_commands_have_help_with_an_example_and_readme_docs(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"BASTION_HOME": None})
    assert result.exit_code == 0 and "Example: bastion" in result.stdout, result.output
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install on a server", 1)[1]
    assert f"bastion {command}" in section
