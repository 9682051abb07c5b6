"""A node's copy of a shared PostgreSQL store (#22): what the gateway reads (AccessStore) held in memory, kept
current by LISTEN/NOTIFY, and how long it may be trusted when the database cannot be reached.

- Everything the login path and the policy read — the policy and its version, every user's keys, TOTP secrets —
  is one `Snapshot` read in one transaction. A login, a channel open, a re-check never wait for the database:
  they read memory. (The keys are cached rather than read per login with a short timeout, so that logins
  during an outage work exactly as before it, and a slow database never slows a login.)
- A listener thread holds its own connection with `LISTEN bastion_changes`. Every write to the store does
  `NOTIFY bastion_changes, '<new version>'` in its transaction (dialect.py), so when one arrives the thread
  reads a new snapshot and calls `on_change(version)`: the server re-checks its live sessions (revocation).
  After a reconnection it reads a snapshot too: whatever changed meanwhile is caught up.
- The thread pings the database every second; a failure starts an outage. For `grace` seconds the node serves
  on the snapshot it holds; after that `login_refusal()` says why new logins are refused (fail closed). Each
  transition — lost, grace over, back — is reported once through `on_outage(state, detail)` (audited and logged
  by the server). It reconnects with a backoff (0.2 s doubling to 2 s).
- TOTP: a code is marked used in the database (one UPDATE, so no two nodes accept it). During an outage it is
  marked used in this node's memory only: a code could be used once more on another node in the same 30 s
  window. That is the cost of logging in at all during the grace (README).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from ..errors import StoreError
from ..policy.model import Policy
from .dialect import CHANNEL, connect, first_line, redact
from .interface import PublicKey
from .sqlite import Snapshot, Store

log = logging.getLogger("bastion.store")

PING_SECONDS = 1.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 2.0


class CachedStore:
    """AccessStore over a PostgreSQL `Store`: reads from memory; writes of the login path (TOTP steps) go through."""

    def __init__(self, store: Store, url: str, grace_seconds: float, *,
                 on_change: Callable[[int], None] | None = None,
                 on_outage: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._url = url
        self.grace_seconds = grace_seconds
        self.on_change = on_change
        self.on_outage = on_outage
        self._clock = clock
        self._snapshot: Snapshot | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self.lost_at: float | None = None  # clock() when the database was last found unreachable; None: reachable
        self.lost_why = ""
        self._expired_told = False
        self._local_steps: dict[str, int] = {}  # TOTP steps accepted during an outage (this node only)
        self.notifications = 0  # how many NOTIFYs arrived (tests, metrics)

    # ---- the thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read the first snapshot (a node that never had one cannot serve: StoreError) and start listening."""
        self.reload()
        self._thread = threading.Thread(target=self._listen_forever, name="bastion-store-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()  # the thread notices within PING_SECONDS
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._store.close()

    def reload(self) -> int:
        """Read a new snapshot; report it when its version is new. Thread-safe (reloads take turns)."""
        with self._reload_lock:
            before = self._snapshot.version if self._snapshot is not None else None
            try:
                snapshot = self._store.snapshot()
            except StoreError:  # its connection died with the database; the next one is made afresh
                snapshot = self._store.snapshot()
            self._snapshot = snapshot
        if before is not None and snapshot.version != before and self.on_change is not None:
            self.on_change(snapshot.version)
        return snapshot.version

    def _listen_forever(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                self._conn = connect(self._url, timeout=3.0)
                self._conn.execute(f"LISTEN {CHANNEL}")
                self.reload()  # what changed while we were not listening
                self._reachable()
                backoff = BACKOFF_FIRST
                self._serve(self._conn)
            except Exception as exc:  # noqa: BLE001 - psycopg's errors, StoreError, a cancelled wait: an outage
                if self._stop.is_set():
                    break
                self._unreachable(first_line(exc))
                waited = 0.0
                while waited < backoff and not self._stop.wait(min(0.25, backoff - waited)):
                    waited += 0.25
                    self.check_grace()  # the end of the grace is reported as it happens
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                conn, self._conn = self._conn, None
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass

    def _serve(self, conn: Any) -> None:
        """Wait for notifications; read a snapshot when one names a version newer than ours; ping meanwhile."""
        last_ping = self._clock()
        while not self._stop.is_set():
            newest = None
            for note in conn.notifies(timeout=PING_SECONDS, stop_after=1):
                self.notifications += 1
                try:
                    newest = max(newest or 0, int(note.payload))
                except ValueError:
                    newest = max(newest or 0, 1 << 62)  # not a version: read anyway
            held = self._snapshot.version if self._snapshot is not None else -1
            if newest is not None and newest != held:
                self.reload()
            if self._clock() - last_ping >= PING_SECONDS:
                conn.execute("SELECT 1")
                last_ping = self._clock()

    def _reachable(self) -> None:
        if self.lost_at is None:
            return
        down = self._clock() - self.lost_at
        self.lost_at, self.lost_why, self._expired_told = None, "", False
        self._local_steps.clear()
        self._tell("restored", f"store {redact(self._url)} reachable again after {down:.1f}s; logins served as usual")

    def _unreachable(self, why: str) -> None:
        now = self._clock()
        if self.lost_at is None:
            self.lost_at, self.lost_why = now, why
            self._tell("lost", f"store {redact(self._url)} unreachable ({why}); serving on the policy held "
                               f"(version {self.version_held}) for at most {self.grace_seconds:g}s")
        elif not self._expired_told and now - self.lost_at >= self.grace_seconds:
            self._expired_told = True
            self._tell("expired", f"store {redact(self._url)} unreachable for {now - self.lost_at:.0f}s "
                                  f"(store_outage_grace {self.grace_seconds:g}s): refusing new logins until it is back")

    def check_grace(self) -> None:
        """Report the end of the grace as it happens, even between reconnection attempts (called by the server
        every second or so; cheap)."""
        if self.lost_at is not None and not self._expired_told and \
                self._clock() - self.lost_at >= self.grace_seconds:
            self._unreachable(self.lost_why)

    def _tell(self, state: str, detail: str) -> None:
        (log.info if state == "restored" else log.error)("%s", detail)
        if self.on_outage is not None:
            try:
                self.on_outage(state, detail)
            except Exception:  # noqa: BLE001 - reporting must not stop the listener
                log.exception("reporting a store %s failed", state)

    # ---- AccessStore --------------------------------------------------------------------------

    @property
    def version_held(self) -> int:
        return self._snapshot.version if self._snapshot is not None else -1

    def _held(self) -> Snapshot:
        if self._snapshot is None:
            raise StoreError("the store was never read")
        return self._snapshot

    def user_keys(self, name: str) -> list[PublicKey]:
        return list(self._held().keys.get(name, ()))

    def policy_version(self) -> int:
        return self._held().version

    def load_policy(self) -> tuple[int, Policy]:
        snapshot = self._held()
        return snapshot.version, snapshot.policy

    def totp_secret(self, name: str) -> tuple[str, int | None] | None:
        held = self._held().totp.get(name)
        if held is None:
            return None
        secret, last = held
        steps = [step for step in (last, self._local_steps.get(name)) if step is not None]
        return secret, (max(steps) if steps else None)

    def totp_accept(self, name: str, step: int) -> bool:
        if self.lost_at is None:
            try:
                return self._store.totp_accept(name, step)
            except StoreError as exc:
                self._unreachable(first_line(exc))
        if self.login_refusal() is not None:
            return False
        held = self.totp_secret(name)
        last = held[1] if held is not None else None
        if held is None or (last is not None and last >= step):
            return False
        self._local_steps[name] = step
        return True

    def login_refusal(self) -> str | None:
        """Why new logins are refused: the store unreachable for longer than the grace; None while it is fine."""
        if self.lost_at is None:
            return None
        down = self._clock() - self.lost_at
        if down < self.grace_seconds:
            return None
        return (f"the bastion's user store has been unreachable for {down:.0f}s (longer than store_outage_grace "
                f"{self.grace_seconds:g}s); logins are refused until it is back")

    def healthy(self) -> bool:
        return self.lost_at is None

    def unreachable_seconds(self) -> float:
        """Seconds since the database was found unreachable; 0 while it is reachable (metrics)."""
        lost = self.lost_at
        return 0.0 if lost is None else max(0.0, self._clock() - lost)
