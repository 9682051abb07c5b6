"""Scenarios: targets the bastion must refuse before dialing, and targets it dials but cannot reach.

The namespace has no default route, so a refusal that "leaks" into a connect attempt to a public address shows
up as `connect failed: Network is unreachable` instead of `administratively prohibited`: the test fails, and
no packet leaves the machine.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from testbed import CLOSED_PORT, ECHO_PORT, GW_ADDR, LAN_ADDR, LAN_ADDR2, SSH_PORT

pytestmark = pytest.mark.netns

NOT_INTERNAL = "not in an internal network"


@dataclass(frozen=True)
class Refusal:
    host: str
    port: int
    why: str  # what the case is about, for the failure message
    reason_contains: str | None = None  # client-visible reason must contain this (None: any reason)


REFUSALS = [
    Refusal("169.254.169.254", 80, "cloud metadata address", NOT_INTERNAL),
    Refusal("meta.evil.test", 80, "name granted by policy, resolves to the metadata address", NOT_INTERNAL),
    Refusal("mixed.evil.test", 80, "name resolves to one internal and one metadata address", NOT_INTERNAL),
    # loopback may be refused as "not internal" or as "the bastion's own address": both are true
    Refusal("loop.evil.test", ECHO_PORT, "name granted by policy, resolves to loopback"),
    Refusal("127.0.0.1", ECHO_PORT, "loopback"),
    Refusal("127.1", ECHO_PORT, "loopback in short inet_aton form"),
    Refusal("0x7f000001", ECHO_PORT, "loopback in hex inet_aton form"),
    Refusal("::ffff:127.0.0.1", ECHO_PORT, "loopback as IPv4-mapped IPv6"),
    Refusal("8.8.8.8", 53, "public address (no route: must never be attempted)", NOT_INTERNAL),
    Refusal("pub.evil.test", 80, "name granted by policy, resolves to a public address", NOT_INTERNAL),
    Refusal(GW_ADDR, SSH_PORT, "the bastion's own address (granted by the group's 10.99.0.0/24:22)"),
    Refusal(LAN_ADDR2, SSH_PORT, "denied address (granted by the group, denied for the user)"),
    Refusal(LAN_ADDR, 2222, "port not granted"),
    Refusal("nosuch.corp.internal", 8080, "granted by name but does not resolve"),
]


def spec(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def test_refused_targets_are_prohibited_before_dialing_and_audited(bastion, ssh):
    # 1. one `ssh -W host:port bastion` per case, a few at a time
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(REFUSALS, pool.map(lambda case: ssh.stdio_forward(case.host, case.port), REFUSALS)))

    # 2. every case printed by the client as an administrative refusal with a reason
    problems: list[str] = []
    client_reasons: dict[Refusal, str] = {}
    for case, result in results.items():
        stderr = result.stderr.decode(errors="replace")
        marker = "open failed: administratively prohibited: "
        if result.returncode == 0 or marker not in stderr:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): exit {result.returncode}, "
                            f"stderr {stderr.strip()!r}, expected {marker!r}<reason>")
            continue
        reason = stderr.split(marker, 1)[1].splitlines()[0].strip()
        client_reasons[case] = reason
        if not reason:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): empty reason")
        elif case.reason_contains and case.reason_contains not in reason:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): reason {reason!r} lacks "
                            f"{case.reason_contains!r}")

    # 3. every case audited as a denied channel with a reason, and never dialed
    try:
        rows = bastion.wait_audit("channels", lambda rows: len(rows) >= len(REFUSALS), "a row per case", timeout=5)
    except AssertionError:
        rows = bastion.audit("channels")  # report per case below, together with the client-side problems
    for case in REFUSALS:
        matching = [r for r in rows if r["target_host"] == case.host and r["target_port"] == case.port]
        if len(matching) != 1:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): expected one audit row with "
                            f"target_host={case.host!r}, got {len(matching)}")
            continue
        row = matching[0]
        if row["decision"] != "deny" or not row["reason"]:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): audit row {json.dumps(row)}")
        if row["bytes_up"] or row["bytes_down"]:
            problems.append(f"{spec(case.host, case.port)} ({case.why}): bytes moved on a refused channel")

    assert not problems, "refusals that did not behave:\n  " + "\n  ".join(problems)


def test_closed_port_reports_connect_failed(bastion, ssh):
    # 1. granted, internal, nobody listening: the bastion dials, gets a RST, and says so
    result = ssh.stdio_forward(LAN_ADDR, CLOSED_PORT)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert "open failed: connect failed: " in stderr, stderr
    assert stderr.split("connect failed: ", 1)[1].strip(), "connect failed without a reason"

    # 2. audited with the reason; the decision itself was allow (the policy granted it)
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 1, "one channel row")
    row = rows[0]
    assert (row["target_ip"], row["target_port"]) == (LAN_ADDR, CLOSED_PORT), row
    assert row["reason"], row
    assert row["closed_at"], row


def test_unreachable_host_fails_within_connect_timeout(bastion, ssh):
    # 10.99.0.200 is granted (10.99.0.0/24:22) but nobody answers ARP; connect_timeout is 2 s
    started = time.monotonic()
    result = ssh.stdio_forward("10.99.0.200", SSH_PORT, timeout=20)
    elapsed = time.monotonic() - started
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0
    assert "open failed: connect failed: " in stderr, stderr
    assert elapsed < 2 + 5, f"took {elapsed:.1f}s with connect_timeout = 2"
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 1, "one channel row")
    assert rows[0]["reason"], rows
