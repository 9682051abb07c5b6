"""Several nodes on one PostgreSQL store (#22 part 2), with a real throwaway PostgreSQL (testbed/postgres.py), real
`bastion serve` processes on loopback and the real OpenSSH client: the CLI on the shared store, `store copy` from a
single node's SQLite home, revocation through LISTEN/NOTIFY across three nodes (measured), and an outage of the
database (`pg_ctl stop`): logins go on within store_outage_grace, are refused after it, and work again once it is
back. Skipped with the reason without root or without PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from testbed.pg_store import pg_store_url, pg_url, postgres  # noqa: F401 (fixtures)
from tests.integration.test_serve_loopback import bastion, start_serve

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client")


@pytest.fixture
def echo_server():
    """An echo server on 127.0.0.2 that serves many connections at once (one live tunnel per node)."""
    server = socket.create_server(("127.0.0.2", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def keygen(path: Path, comment: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment or path.name, "-f", path],
                   check=True)
    return path


def make_home(path: Path, store: str = "", grace: str = "5m") -> Path:
    assert bastion(path, "init", "--listen", "127.0.0.1:0").returncode == 0
    config = path / "config.toml"
    text = config.read_text().replace('internal_networks = [', 'internal_networks = ["127.0.0.0/8", ')
    text = re.sub(r'(?m)^store = ".*"$', f'store = "{store}"', text)
    text = re.sub(r'(?m)^store_outage_grace = ".*"$', f'store_outage_grace = "{grace}"', text)
    config.write_text(text)
    return path


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: {result.stdout}{result.stderr}"
    return result


class Node:
    """One `bastion serve` on its own home, sharing the store; its OpenSSH command line for alice."""

    def __init__(self, home: Path, key: Path, tmp: Path):
        self.home = home
        self.proc, self.port = start_serve(home)
        known = tmp / f"known_{home.name}"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")
        self.base = [SSH, "-F", "/dev/null", "-p", str(self.port), "-i", str(key), "-o", "BatchMode=yes",
                     "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=10"]

    def echo(self, port: int, user: str = "alice") -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, "-W", f"127.0.0.2:{port}", f"{user}@127.0.0.1"], input=b"hello\n",
                              capture_output=True, timeout=30)

    def tunnel(self, port: int) -> subprocess.Popen:
        """A live `ssh -W` that has carried one line (so it is open end to end)."""
        proc = subprocess.Popen([*self.base, "-W", f"127.0.0.2:{port}", "alice@127.0.0.1"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line == b"ping\n", proc.stderr.read1(4096) if proc.poll() is not None else line
        return proc

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def grant(tmp: Path, echo_port: int, allowed: bool, name: str = "grant.toml") -> Path:
    path = tmp / name
    path.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_port}"]\n' if allowed else
                    '[users.alice]\nallow = []\n')
    return path


def test_the_cli_on_a_postgresql_store(pg_url, tmp_path):  # noqa: F811
    """Every store command works on the shared store; the schema is migrated only when asked; the URL's
    password is never shown."""
    home = make_home(tmp_path / "home", store=pg_url)
    unmigrated = bastion(home, "user", "list")
    assert unmigrated.returncode != 0 and "bastion store migrate" in unmigrated.stderr
    assert "Traceback" not in unmigrated.stderr
    assert "store schema migrated from version 0 to 2" in ok(bastion(home, "store", "migrate")).stdout
    assert "up to date" in ok(bastion(home, "store", "migrate")).stdout
    key = keygen(tmp_path / "alice")
    ok(bastion(home, "user", "add", "alice", "--key", f"{key}.pub"))
    other = keygen(tmp_path / "bob")
    imported = tmp_path / "authorized_keys"
    imported.write_text(f'from="10.0.0.0/8" {Path(f"{other}.pub").read_text()}')
    ok(bastion(home, "user", "import", "--user", "bob", str(imported)))
    policy = tmp_path / "policy.toml"
    policy.write_text('[groups.ops]\nallow = ["10.1.0.0/16:22"]\n[users.alice]\ngroups = ["ops"]\n'
                      '[revoked]\nkey_ids = ["old@bastion"]\n')
    dry = ok(bastion(home, "policy", "apply", "--dry-run", str(policy)))
    assert "+ alice: open 10.1.0.0/16:22 via group ops" in dry.stdout and "nothing changed" in dry.stdout
    assert json.loads(ok(bastion(home, "policy", "show", "--json")).stdout)["groups"] == {}
    ok(bastion(home, "policy", "apply", str(policy)))
    shown = json.loads(ok(bastion(home, "policy", "show", "--json")).stdout)
    assert shown["groups"]["ops"]["allow"] == ["10.1.0.0/16:22"]
    access = ok(bastion(home, "access", "alice"))
    assert "10.1.0.0/16" in access.stdout and "group ops" in access.stdout
    users = {u["name"]: u for u in json.loads(ok(bastion(home, "user", "list", "--json")).stdout)}
    assert set(users) == {"alice", "bob"} and users["bob"]["keys"][0]["source"] == "import"
    assert "from=" in json.dumps(users["bob"]["keys"][0]["options"])
    # nothing in the home's SQLite file: the store is elsewhere
    local = ok(subprocess.run(["sqlite3", str(home / "bastion.db"), "SELECT count(*) FROM users"],
                              capture_output=True, text=True)) if shutil.which("sqlite3") else None
    if local is not None:
        assert local.stdout.strip() == "0"
    # a password in the URL is never printed
    secret_url = pg_url.replace("postgres@", "postgres:s3cret@")
    shown_url = bastion(home, "store", "migrate", "--url", secret_url)
    assert "s3cret" not in shown_url.stdout + shown_url.stderr


def test_store_copy_then_a_node_on_postgresql_accepts_the_same_logins(pg_url, echo_server, tmp_path):  # noqa: F811
    """A populated single-node home (users, keys with options, groups, CAs, revoked list, TOTP, a policy
    version) copied into PostgreSQL; a node on it lets the same users through; a second copy is refused."""
    home = make_home(tmp_path / "single")
    key = keygen(tmp_path / "alice")
    ok(bastion(home, "user", "add", "alice", "--key", f"{key}.pub"))
    carol = keygen(tmp_path / "carol")
    lines = tmp_path / "carol_keys"
    lines.write_text(f'permitopen="127.0.0.2:{echo_server}" {Path(f"{carol}.pub").read_text()}')
    ok(bastion(home, "user", "import", "--user", "carol", str(lines)))
    ca = keygen(tmp_path / "ca")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[groups.echo]\nallow = ["127.0.0.2:{echo_server}"]\n'
                      '[users.alice]\ngroups = ["echo"]\n[users.carol]\ngroups = ["echo"]\n'
                      f'[cas.corp]\nkey = "{Path(f"{ca}.pub").read_text().strip()}"\n'
                      '[revoked]\nkey_ids = ["stolen@bastion"]\n')
    ok(bastion(home, "policy", "apply", str(policy)))
    ok(bastion(home, "user", "totp", "enroll", "carol", "--no-qr"))
    before = json.loads(ok(bastion(home, "policy", "show", "--json")).stdout)
    users_before = json.loads(ok(bastion(home, "user", "list", "--json")).stdout)

    copied = ok(bastion(home, "store", "copy", "--to", pg_url))
    assert "2 users" in copied.stdout and "1 cas" in copied.stdout and "1 totp" in copied.stdout
    again = bastion(home, "store", "copy", "--to", pg_url)
    assert again.returncode != 0 and "not empty" in again.stderr and "--force" in again.stderr
    ok(bastion(home, "store", "copy", "--to", pg_url, "--force"))

    fleet = make_home(tmp_path / "node1", store=pg_url)
    assert json.loads(ok(bastion(fleet, "policy", "show", "--json")).stdout) == before
    users_after = json.loads(ok(bastion(fleet, "user", "list", "--json")).stdout)
    assert [(u["name"], u["keys"]) for u in users_after] == [(u["name"], u["keys"]) for u in users_before]
    node = Node(fleet, key, tmp_path)
    try:
        assert node.echo(echo_server).stdout == b"hello\n"
    finally:
        node.stop()


def _restore(url: str, tmp: Path, echo_port: int, nodes: list[Node]) -> None:
    """The grant back, through the library (not measured, so no CLI start-up to wait for)."""
    from bastion.policy.file import parse_policy
    from bastion.store.sqlite import Store

    store = Store(url)
    try:
        store.apply_policy(parse_policy(grant(tmp, echo_port, True).read_text()))
    finally:
        store.close()
    deadline = time.monotonic() + 10
    for node in nodes:  # every node has the grant again before the next round
        while node.echo(echo_port).stdout != b"hello\n":
            assert time.monotonic() < deadline, "a node did not take the grant back"
            time.sleep(0.05)


def test_a_revocation_closes_live_tunnels_on_three_nodes_within_a_second(pg_store_url, echo_server,  # noqa: F811
                                                                         tmp_path):
    """Three nodes share the store; a live `ssh -W` on each; `policy apply` by the CLI removes the grant; every
    tunnel closes. Repeated (BASTION_REVOKE_ROUNDS, default 20): p50/p99 from the commit (seen by a LISTEN of
    the test's own) and from the CLI's start, printed and written to $BASTION_MEASURE_DIR if set."""
    import psycopg

    rounds = int(os.environ.get("BASTION_REVOKE_ROUNDS", "20"))
    key = keygen(tmp_path / "alice")
    homes = [make_home(tmp_path / f"node{i}", store=pg_store_url) for i in range(3)]
    admin = homes[0]
    ok(bastion(admin, "user", "add", "alice", "--key", f"{key}.pub"))
    ok(bastion(admin, "policy", "apply", str(grant(tmp_path, echo_server, True))))
    nodes = [Node(home, key, tmp_path) for home in homes]
    listener = psycopg.connect(pg_store_url, autocommit=True)
    listener.execute("LISTEN bastion_changes")
    from_commit: list[float] = []
    from_cli: list[float] = []
    try:
        for _ in range(rounds):
            tunnels = [node.tunnel(echo_server) for node in nodes]
            list(listener.notifies(timeout=0.05))  # drained
            closed: list[float] = []
            lock = threading.Lock()

            def watch(proc: subprocess.Popen) -> None:
                proc.wait(timeout=30)
                with lock:
                    closed.append(time.monotonic())

            watchers = [threading.Thread(target=watch, args=(t,)) for t in tunnels]
            for w in watchers:
                w.start()
            started = time.monotonic()
            cli = subprocess.Popen([os.sys.executable, "-m", "bastion", "--home", str(admin), "policy", "apply",
                                    str(grant(tmp_path, echo_server, False, "revoke.toml"))],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            committed = None
            for _note in listener.notifies(timeout=30, stop_after=1):
                committed = time.monotonic()
            assert committed is not None, "no NOTIFY seen"
            assert cli.wait(timeout=60) == 0, cli.stderr.read()
            for w in watchers:
                w.join(timeout=30)
            assert len(closed) == 3, "a tunnel stayed open"
            from_commit += [t - committed for t in closed]
            from_cli += [t - started for t in closed]
            _restore(pg_store_url, tmp_path, echo_server, nodes)
    finally:
        listener.close()
        for node in nodes:
            node.stop()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    report = {"rounds": rounds, "tunnels": len(from_commit),
              "from_commit_p50_ms": round(statistics.median(from_commit) * 1000, 1),
              "from_commit_p99_ms": round(pct(from_commit, 0.99) * 1000, 1),
              "from_commit_max_ms": round(max(from_commit) * 1000, 1),
              "from_cli_start_p50_ms": round(statistics.median(from_cli) * 1000, 1),
              "from_cli_start_p99_ms": round(pct(from_cli, 0.99) * 1000, 1)}
    print("revocation across 3 nodes:", json.dumps(report))
    if os.environ.get("BASTION_MEASURE_DIR"):
        Path(os.environ["BASTION_MEASURE_DIR"], "revocation.json").write_text(json.dumps(report) + "\n")
    assert pct(from_commit, 0.99) < 1.0, report


def test_an_outage_serves_within_the_grace_then_fails_closed_then_recovers(postgres, pg_store_url,  # noqa: F811
                                                                           echo_server, tmp_path):
    """`pg_ctl stop`: logins go on from the node's copy within store_outage_grace; after it they are refused with
    the reason; after `pg_ctl start` they work again. Each transition is one audit row and one log line."""
    grace = 4
    key = keygen(tmp_path / "alice")
    home = make_home(tmp_path / "node", store=pg_store_url, grace=f"{grace}s")
    ok(bastion(home, "user", "add", "alice", "--key", f"{key}.pub"))
    ok(bastion(home, "policy", "apply", str(grant(tmp_path, echo_server, True))))
    node = Node(home, key, tmp_path)
    try:
        assert node.echo(echo_server).stdout == b"hello\n"
        postgres.stop()
        stopped = time.monotonic()
        within = node.echo(echo_server)  # from the node's copy: keys and policy in memory
        assert within.stdout == b"hello\n", within.stderr
        assert time.monotonic() - stopped < grace, "the login during the grace took too long to tell"
        time.sleep(max(0.0, grace + 1.5 - (time.monotonic() - stopped)))
        refused = node.echo(echo_server)
        assert refused.returncode != 0 and refused.stdout == b""
        assert b"user store has been unreachable" in refused.stderr, refused.stderr
        postgres.start()
        deadline = time.monotonic() + 15
        while (back := node.echo(echo_server)).stdout != b"hello\n":
            assert time.monotonic() < deadline, back.stderr
            time.sleep(0.2)
    finally:
        if not postgres.running():
            postgres.start()
        node.stop()
    rows = json.loads(ok(bastion(home, "audit", "auth", "--json")).stdout)
    store_rows = [r for r in rows if r.get("method") == "store"]
    reasons = " | ".join(r["reason"] for r in store_rows)
    assert "unreachable" in reasons and "refusing new logins" in reasons and "reachable again" in reasons, rows
    assert any(r["user"] == "alice" and "user store has been unreachable" in r["reason"] for r in rows)
