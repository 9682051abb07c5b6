"""Behind a real HAProxy (#22): two bastion nodes, each its own home (the same host keys, user and policy applied
to both), HAProxy in `mode tcp` with `send-proxy-v2 check` and `balance roundrobin` in front (deploy/haproxy.cfg), the real OpenSSH
client through it with `-W` to an echo target, every host in its own namespace on one bridge (testbed/fleet.py):

    client 10.98.0.50 --> haproxy 10.98.0.5:22 --PROXY v2--> node1 10.98.0.11:22 --> echo 10.98.0.100:7
                                               --PROXY v2--> node2 10.98.0.12:22 --^

1. HAProxy's health checks (a v2 LOCAL header, or a socket reset before the node accepted it) reach both nodes
and are never audited. 2. Logins land on both nodes and
each audits the client's own address, never the balancer's. 3. The same header sent straight to a node from the
client's address is forged: refused and audited as the client's."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from bastion.policy.proxy_header import v2_header
from testbed import Bastion, netns_connect, wait_until
from testbed.fleet import FLEET_NET, Fleet
from testbed.processes import SSH
from testbed.targets import _TCP_TARGETS

HAPROXY = shutil.which("haproxy") or next((p for p in ["/usr/sbin/haproxy"] if os.access(p, os.X_OK)), None)
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(HAPROXY is None,
                                 reason="needs HAProxy (Debian `haproxy`; .ci/run installs it)")]

BALANCER, NODES, CLIENT, TARGET = f"{FLEET_NET}.5", (f"{FLEET_NET}.11", f"{FLEET_NET}.12"), f"{FLEET_NET}.50", \
    f"{FLEET_NET}.100"
ECHO = 7

DEPLOY_CFG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"


def haproxy_cfg() -> str:
    """deploy/haproxy.cfg, the README's example, with the testbed's addresses and checks 300 ms apart."""
    text = DEPLOY_CFG.read_text()
    for example, ours in [("10.0.0.5:", f"{BALANCER}:"), ("10.0.0.11:", f"{NODES[0]}:"),
                          ("10.0.0.12:", f"{NODES[1]}:"), ("send-proxy-v2 check\n", "send-proxy-v2 check inter 300ms\n")]:
        assert example in text, f"deploy/haproxy.cfg no longer has {example!r}"
        text = text.replace(example, ours)
    return text


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path / "fleet").create() as fleet:
        for name, address in [("lb", BALANCER), ("node1", NODES[0]), ("node2", NODES[1]), ("client", CLIENT),
                              ("target", TARGET)]:
            fleet.add_host(name, address)
        yield fleet


def test_two_nodes_behind_haproxy_audit_the_clients_address(fleet, keys, tmp_path):
    started = time.monotonic()
    script = tmp_path / "tcp_targets.py"
    script.write_text(_TCP_TARGETS)
    fleet.start("echo", fleet.hosts["target"], [sys.executable, script, "echo", str(ECHO)], ECHO)

    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["{TARGET}:{ECHO}"]\n')
    nodes = []
    for n, address in enumerate(NODES, 1):
        node = Bastion(fleet.node(fleet.hosts[f"node{n}"]), tmp_path / f"node{n}", listen=f"{address}:22")
        node.cli_in_process("init", "--listen", node.listen)
        node.set_config(proxy_protocol_from=[f"{BALANCER}/32"], log_level="DEBUG", connect_timeout=2)
        if nodes:  # one server to its clients: every node answers with the same host keys
            for key in nodes[0].home.glob("ssh_host_*"):
                shutil.copy2(key, node.home / key.name)
        node.cli_in_process("user", "add", "alice", "--key", str(keys["alice"].pub_path))
        node.cli_in_process("policy", "apply", str(policy))
        nodes.append(node)
    try:
        for node in nodes:
            node.start()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_cfg())
        fleet.start("haproxy", fleet.hosts["lb"], [HAPROXY, "-db", "-f", cfg], 22)

        # 1. HAProxy's checks reach both nodes and are closed without SSH: a v2 LOCAL header, or (when HAProxy's
        # reset comes before the node accepts, as it often does on a busy machine) a socket without a peer
        wait_until(lambda: all("with no client (" in node.log() for node in nodes), 10,
                   "HAProxy's health checks on both nodes")

        # 2. logins through HAProxy, spread round robin, each audited with the client's address
        known = tmp_path / "known_hosts"
        host_key = " ".join((nodes[0].home / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known.write_text(f"{BALANCER} {host_key}\n{NODES[0]} {host_key}\n")

        def ssh(host: str, payload: bytes):
            return fleet.run(fleet.hosts["client"], [
                SSH, "-F", "/dev/null", "-i", keys["alice"].path, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "-W", f"{TARGET}:{ECHO}",
                f"alice@{host}"], input=payload, timeout=20)

        for n in range(4):
            result = ssh(BALANCER, b"hello %d\n" % n)
            assert result.stdout == b"hello %d\n" % n, result.stderr.decode(errors="replace")
        logins = [node.wait_audit("auth", lambda rows: any(r["result"] == "success" for r in rows),
                                  f"a login on {node.listen}") for node in nodes]
        per_node = [[(r["client_ip"], r["result"]) for r in rows] for rows in logins]
        assert per_node == [[(CLIENT, "success")] * 2] * 2, per_node
        for node in nodes:
            sessions = node.audit("sessions")
            assert {s["client_ip"] for s in sessions} == {CLIENT} and len(sessions) == 2
            assert f"logged in from {CLIENT}:" in node.log()

        # 3. a header sent straight to a node by anyone but the balancer is forged
        with netns_connect(fleet.hosts["client"], (NODES[0], 22), timeout=10) as sock:
            sock.sendall(v2_header((f"{FLEET_NET}.99", 1), (NODES[0], 22)) + b"SSH-2.0-Forger\r\n")
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        rows = nodes[0].wait_audit("auth", lambda rows: any("not in proxy_protocol_from" in r["reason"]
                                                              for r in rows), "the forged header's row")
        assert [(r["client_ip"], r["reason"]) for r in rows if r["result"] == "failure"] == [
            (CLIENT, f"PROXY header from {CLIENT}, which is not in proxy_protocol_from")]

        # health checks ran all along (300 ms apart): never an audit row, never a penalty for the balancer
        wait_until(lambda: all(node.log().count("with no client (") >= 4 for node in nodes), 10, "more health checks")
        for node in nodes:
            assert not [r for r in node.audit("auth") if r["client_ip"] == BALANCER]
            assert "Traceback" not in node.log()
        print(f"\n  HAProxy, 2 nodes, 4 logins and a forged header in {time.monotonic() - started:.1f}s; "
              f"health checks seen (v2 LOCAL, reset before accepted): "
              f"{[(node.log().count('(PROXY v2 LOCAL)'), node.log().count('(reset before')) for node in nodes]}")
    finally:
        for node in nodes:
            node.close()
