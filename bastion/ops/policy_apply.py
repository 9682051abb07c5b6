"""What a policy apply would do to live sessions: the sessions that would end and the tunnels and listeners
that would close, read from the audit log's open rows and decided with the new policy exactly as the
running gateway will decide them when it re-checks."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..audit.query import open_reader
from ..policy.certificates import certificate_session_refusal
from ..policy.decide import evaluate, evaluate_listen, login_refusal
from ..policy.model import AccessRequest, ListenRequest
from ..policy.netguard import NetGuard, TargetError, parse_host
from ..policy.revocation import revoked_by_policy
from ..store.sqlite import PolicyPlan


@dataclass(frozen=True)
class LiveLoss:
    session_id: str
    user: str
    what: str  # "session", "tunnel to 10.1.2.3:22", "listener on 127.0.0.1:8080"
    reason: str


def live_losses(database: Path, plan: PolicyPlan, guard: NetGuard, now: datetime) -> list[LiveLoss]:
    """Live sessions, tunnels and listeners that the planned policy would end; [] when the log has none open."""
    if not database.exists():
        return []
    keys_after: dict[str, set[str]] = {}
    conn = open_reader(database)
    try:
        removed = {(user, key.fingerprint) for user, key in plan.keys_removed}
        stored = conn.execute("SELECT user, fingerprint FROM user_keys").fetchall()
        for user, fingerprint in stored:
            if (user, fingerprint) not in removed:
                keys_after.setdefault(user, set()).add(fingerprint)
        sessions = conn.execute("SELECT id, user, key_fingerprint, cert_ca, cert_serial, cert_key_id FROM sessions "
                                "WHERE ended_at IS NULL").fetchall()
        channels = conn.execute(
            "SELECT c.session_id, c.user, c.target_host, c.target_ip, c.target_port FROM channels c "
            "JOIN sessions s ON s.id = c.session_id AND s.ended_at IS NULL "
            "WHERE c.closed_at IS NULL AND c.decision = 'allow' AND c.kind = 'direct-tcpip'").fetchall()
        listeners = conn.execute(
            "SELECT l.session_id, l.user, l.listen_host, l.listen_port FROM listeners l "
            "JOIN sessions s ON s.id = l.session_id AND s.ended_at IS NULL "
            "WHERE l.closed_at IS NULL AND l.decision = 'allow'").fetchall()
    finally:
        conn.close()
    losses: list[LiveLoss] = []
    ending: set[str] = set()
    stored_keys = {(user, fingerprint) for user, fingerprint in stored}
    for session_id, user, fingerprint, ca, serial, key_id in sessions:
        if ca is not None:  # a certificate login (#21): its CA, and the policy's [revoked] list
            reason = certificate_session_refusal(plan.target, ca, user, now) or revoked_by_policy(
                plan.target, fingerprint, ca, int(serial) if serial is not None else None, key_id)
        elif (user, fingerprint) not in stored_keys:
            continue  # no stored key and no certificate columns: a certificate login from before migration 7
        else:
            reason = login_refusal(plan.target, user, fingerprint, frozenset(keys_after.get(user, ())), now) \
                or revoked_by_policy(plan.target, fingerprint)
        if reason is not None:
            ending.add(session_id)
            losses.append(LiveLoss(session_id, user, "session", reason))
    for session_id, user, host, ip, port in channels:
        if session_id in ending or ip is None:
            continue
        try:
            request = AccessRequest(user=user, host=parse_host(host), addresses=(ipaddress.ip_address(ip),),
                                    port=port, now=now)
        except (TargetError, ValueError):
            continue
        decision = evaluate(plan.target, guard, request)
        if not decision.allowed:
            losses.append(LiveLoss(session_id, user, f"tunnel to {host}:{port}", decision.reason))
    for session_id, user, host, port in listeners:
        if session_id in ending:
            continue
        decision = evaluate_listen(plan.target, ListenRequest(user=user, bind=ipaddress.ip_address(host), port=port,
                                                              now=now))
        if not decision.allowed:
            losses.append(LiveLoss(session_id, user, f"listener on {host}:{port}", decision.reason))
    return losses
