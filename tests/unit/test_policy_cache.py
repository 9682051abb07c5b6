"""PolicyCache under concurrent reloads (issue #18, item 19): loads run in worker threads; a slow load of an older
version must never install its policy over a newer one, nor report it as the change."""

from __future__ import annotations

import asyncio
import threading

from bastion.gateway.context import PolicyCache
from bastion.store.sqlite import Store


class SlowFirstLoad(Store):
    """A real store whose first policy load reads the store at once but is slow to return (a busy thread)."""

    def __init__(self, path):
        super().__init__(path)
        self.first_read = threading.Event()
        self.release = threading.Event()
        self._loads = 0

    def load_policy(self):
        self._loads += 1
        result = super().load_policy()
        if self._loads == 1:
            self.first_read.set()
            self.release.wait(10)
        return result


def test_a_slow_older_load_never_replaces_a_newer_policy(tmp_path):
    store = SlowFirstLoad(tmp_path / "bastion.db")
    store.add_user("alice", [])
    changes = []
    cache = PolicyCache(store, on_change=changes.append)

    async def scenario() -> None:
        # 1. a reload starts and reads the policy with alice only; its thread is then slow
        older = asyncio.ensure_future(cache.current())
        await asyncio.to_thread(store.first_read.wait, 10)
        # 2. bob is added (a newer version), and a second reload starts
        store.add_user("bob", [])
        newer = asyncio.ensure_future(cache.current())
        await asyncio.sleep(0.3)
        # 3. the slow, older load finishes last
        store.release.set()
        await asyncio.gather(older, newer)

    try:
        asyncio.run(scenario())
        assert set(cache.latest.users) == {"alice", "bob"}
        assert changes and set(changes[-1].users) == {"alice", "bob"}
    finally:
        store.close()
