"""A node's in-memory copy of a PostgreSQL store (#22, store/cached.py) against a real PostgreSQL: every kind of
write tells the node (NOTIFY at commit, none for a write rolled back), the node reads its copy without the
database, an outage is lost → grace over → back, TOTP codes are used once also while the database is down."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bastion.errors import StoreError
from bastion.service.metrics import Metrics
from bastion.policy.file import parse_policy
from bastion.store.cached import CachedStore
from bastion.store.copy import copy_store, counts
from bastion.store.sqlite import Store, parse_public_keys
from testbed.pg_store import pg_store_url, pg_url, postgres  # noqa: F401 (fixtures)


def store_gauges(metrics: Metrics) -> dict[str, float]:
    """The store reachability series of one scrape (#22 part 4)."""
    text = metrics.exposition().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("bastion_store_")}


def key_line(tmp_path, name: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", tmp_path / name], check=True)
    return (tmp_path / f"{name}.pub").read_text().strip()


def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout}s"
        time.sleep(0.02)
    return value


class Node:
    """A CachedStore as the server runs it, recording what it reports."""

    def __init__(self, url: str, grace: float = 300.0):
        self.changes: list[int] = []
        self.outages: list[tuple[str, str]] = []
        self.cached = CachedStore(Store(url), url, grace, on_change=self.changes.append,
                                  on_outage=lambda state, detail: self.outages.append((state, detail)))
        self.cached.start()

    def close(self) -> None:
        self.cached.close()


@pytest.fixture
def node(pg_store_url):  # noqa: F811
    node = Node(pg_store_url)
    yield node
    node.close()


def test_every_write_reaches_the_node_and_a_rolled_back_one_does_not(node, pg_store_url, tmp_path):  # noqa: F811
    admin = Store(pg_store_url)
    try:
        seen = node.cached.version_held

        def changed() -> int:
            nonlocal seen
            version = wait_for(lambda: node.cached.version_held if node.cached.version_held > seen else 0)
            seen = version
            return version

        alice = parse_public_keys(key_line(tmp_path, "alice"))
        admin.add_user("alice", alice)
        changed()
        assert [k.fingerprint for k in node.cached.user_keys("alice")] == [alice[0].fingerprint]
        admin.import_keys({"bob": parse_public_keys(key_line(tmp_path, "bob"))})
        changed()
        admin.apply_policy(parse_policy('[groups.ops]\nallow = ["10.0.0.0/8:22"]\n[users.alice]\ngroups = ["ops"]\n'
                                        '[revoked]\nkey_ids = ["old@x"]\n'))
        changed()
        _, policy = node.cached.load_policy()
        assert policy.users["alice"].groups == ("ops",) and policy.revoked.key_ids
        admin.totp_enroll("alice", "JBSWY3DPEHPK3PXP")
        changed()
        assert node.cached.totp_secret("alice") == ("JBSWY3DPEHPK3PXP", None)
        admin.totp_reset("alice")
        changed()
        assert node.cached.totp_secret("alice") is None
        admin.remove_key("alice", alice[0].fingerprint)
        changed()
        assert node.cached.user_keys("alice") == []
        admin.remove_user("bob")
        version = changed()
        assert node.changes[-1] == version and node.cached.user_keys("bob") == []
        # a write that fails changes nothing and tells nobody
        notes = node.cached.notifications
        with pytest.raises(StoreError):
            admin.apply_policy(parse_policy('[users.alice]\ngroups = ["nosuch"]\n'))
        time.sleep(0.5)
        assert node.cached.notifications == notes and node.cached.version_held == version
    finally:
        admin.close()


def test_reads_come_from_memory(node, postgres):  # noqa: F811
    """With the database gone the copy still answers at once (the login path never waits for it)."""
    postgres.stop()
    try:
        started = time.monotonic()
        for _ in range(1000):
            node.cached.user_keys("alice")
            node.cached.load_policy()
            node.cached.policy_version()
        assert time.monotonic() - started < 0.5
    finally:
        postgres.start()


def test_an_outage_is_lost_then_grace_over_then_back(pg_store_url, postgres, tmp_path):  # noqa: F811
    admin = Store(pg_store_url)
    admin.add_user("alice", parse_public_keys(key_line(tmp_path, "alice")))
    admin.totp_enroll("alice", "JBSWY3DPEHPK3PXP")
    admin.close()
    node = Node(pg_store_url, grace=2.0)
    metrics = Metrics()
    metrics.watch_store(node.cached)
    try:
        assert node.cached.login_refusal() is None and node.cached.healthy()
        assert store_gauges(metrics) == {"bastion_store_reachable": 1, "bastion_store_unreachable_seconds": 0}
        postgres.stop()
        wait_for(lambda: node.outages)
        assert store_gauges(metrics)["bastion_store_reachable"] == 0
        assert node.outages[0][0] == "lost" and "serving on the policy held" in node.outages[0][1]
        assert node.cached.login_refusal() is None  # within the grace
        assert len(node.cached.user_keys("alice")) == 1
        # TOTP during the outage: each step once, on this node
        assert node.cached.totp_accept("alice", 1000) is True
        assert node.cached.totp_accept("alice", 1000) is False
        assert node.cached.totp_secret("alice") == ("JBSWY3DPEHPK3PXP", 1000)
        wait_for(lambda: len(node.outages) >= 2, timeout=6)
        assert node.outages[1][0] == "expired" and "refusing new logins" in node.outages[1][1]
        assert store_gauges(metrics)["bastion_store_unreachable_seconds"] >= 2.0  # past the grace
        refusal = node.cached.login_refusal()
        assert refusal is not None and "store_outage_grace" in refusal
        assert node.cached.totp_accept("alice", 1001) is False  # fail closed
        postgres.start()
        wait_for(lambda: len(node.outages) >= 3, timeout=15)
        assert node.outages[2][0] == "restored" and node.cached.login_refusal() is None
        assert [state for state, _ in node.outages] == ["lost", "expired", "restored"]
        assert store_gauges(metrics) == {"bastion_store_reachable": 1, "bastion_store_unreachable_seconds": 0}
        # back on the database: a step is used once across nodes
        assert node.cached.totp_accept("alice", 1002) is True
        other = Store(pg_store_url)
        try:
            assert other.totp_accept("alice", 1002) is False
        finally:
            other.close()
    finally:
        if not postgres.running():
            postgres.start()
        node.close()


def test_copy_moves_everything_and_refuses_a_store_in_use(pg_store_url, tmp_path):  # noqa: F811
    single = Store(tmp_path / "bastion.db")
    shared = Store(pg_store_url)
    try:
        single.add_user("alice", parse_public_keys(f'from="10.0.0.0/8" {key_line(tmp_path, "alice")}'))
        single.import_keys({"bob": parse_public_keys(key_line(tmp_path, "bob"))})
        single.apply_policy(parse_policy(
            '[groups.ops]\nallow = ["10.0.0.0/8:22"]\n[users.alice]\ngroups = ["ops"]\n'
            f'[cas.corp]\nkey = "{key_line(tmp_path, "ca")}"\n'
            '[revoked]\nkey_ids = ["z@x", "a@x"]\nfingerprints = ["SHA256:' + "A" * 43 + '"]\n'))
        single.totp_enroll("alice", "JBSWY3DPEHPK3PXP")
        assert single.totp_accept("alice", 77)
        copied = copy_store(single, shared)
        assert copied["users"] == 2 and copied["user_keys"] == 2 and copied["cas"] == 1 and copied["revoked"] == 3
        assert copied["policy_version"] == single.policy_version()
        assert shared.load_policy() == single.load_policy()
        assert shared.list_users() == single.list_users()
        assert shared.totp_secret("alice") == ("JBSWY3DPEHPK3PXP", 77)
        assert shared.snapshot() == single.snapshot()
        with pytest.raises(StoreError, match="not empty"):
            copy_store(single, shared)
        again = copy_store(single, shared, force=True)
        assert again["policy_version"] == copied["policy_version"] + 1  # never lower: every node sees a change
        assert counts(shared) == counts(single)
        # and back: PostgreSQL into an empty SQLite file
        back = Store(tmp_path / "back.db")
        copy_store(shared, back)
        assert back.load_policy()[1] == single.load_policy()[1]
        back.close()
    finally:
        single.close()
        shared.close()


def test_an_unmigrated_store_says_what_to_run(pg_url):  # noqa: F811
    with pytest.raises(StoreError, match="bastion store migrate"):
        Store(pg_url)
    with pytest.raises(StoreError) as raised:
        Store(pg_url.replace("postgres@", "postgres:hunter2@").replace("/t_", "/nosuch_t_"))
    assert "hunter2" not in str(raised.value) and "***" in str(raised.value)


def test_concurrent_writers_on_two_connections_keep_versions_distinct(pg_store_url, tmp_path):  # noqa: F811
    """Two CLIs at once: every write gets its own version (the UPDATE … RETURNING serializes them)."""
    stores = [Store(pg_store_url) for _ in range(2)]
    keys = [parse_public_keys(key_line(tmp_path, f"u{i}")) for i in range(2)]
    try:
        def write(i: int) -> None:
            for n in range(10):
                stores[i].add_user(f"u{i}x{n}", keys[i])

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert stores[0].policy_version() == 20
    finally:
        for store in stores:
            store.close()


def test_the_postgresql_schema_has_every_store_table_and_column_of_sqlite(pg_store_url, tmp_path):  # noqa: F811
    """A migration that adds a store table or column to SQLite (schema.py) needs its PostgreSQL twin
    (pg_schema.py), or the shared SQL breaks on one backend: this names what is missing."""
    from bastion.audit.chain import AUDIT_TABLES, CHAIN_TABLE

    local = Store(tmp_path / "bastion.db")
    shared = Store(pg_store_url)
    try:
        tables = [row[0] for row in local._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if row[0] not in (*AUDIT_TABLES, CHAIN_TABLE) and not row[0].startswith("sqlite_")]
        missing = []
        for table in tables:
            want = {row[1] for row in local._db.execute(f"PRAGMA table_info({table})")}
            have = {row[0] for row in shared._db.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "AND table_schema = current_schema()", [table]).fetchall()}
            missing += [f"{table}.{column}" for column in sorted(want - have)]
        assert not missing, f"add to bastion/store/pg_schema.py: {missing}"
        assert set(tables) >= {"meta", "users", "user_keys", "groups", "cas", "totp", "revoked"}
    finally:
        local.close()
        shared.close()


def test_a_node_with_metrics_exports_store_reachability_only_on_postgresql(pg_store_url, tmp_path):  # noqa: F811
    """The server wires its store copy into its metrics (#22 part 4); the embedded SQLite store has no such series."""
    from bastion.config import load_config
    from bastion.service.lifecycle import Gateway

    for store, expected in ((pg_store_url, {"bastion_store_reachable": 1, "bastion_store_unreachable_seconds": 0}),
                            (None, {})):
        config = load_config(home=tmp_path / ("pg" if store else "sqlite"), environ={},
                             overrides={"store": store, "metrics_listen": "127.0.0.1:0"})
        config.home.mkdir()
        gateway = Gateway(config)
        try:
            assert gateway.metrics is not None and store_gauges(gateway.metrics) == expected
        finally:
            gateway.audit.stop()
            gateway.store.close()
