"""The config's `revoked_keys` files (#21): read at start, re-read when one changes (a stat of each, at most once a
second, in a worker thread) and on SIGHUP. What was read is the context's `revoked_keys` (policy/revocation.py),
which logins consult; after a change, live sessions are re-checked, so a session whose key or certificate a new
KRL revokes ends within about a second.

A file that cannot be read or parsed makes the whole set a failure: every key and certificate login is refused
(as sshd does when RevokedKeys cannot be read) with one error line per change, until it reads again. Live sessions
are not ended for an unreadable file, only for what a readable one revokes.

Write a KRL in place of the old one atomically (`ssh-keygen -k -f new.krl … && mv new.krl revoked.krl`): a
half-written file read mid-write refuses logins until the next look, a second later.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Awaitable, Callable

from ..gateway.context import ServerContext
from ..policy.krl import KrlError
from ..policy.revocation import RevokedKeyFiles, parse_revoked_keys

log = logging.getLogger("bastion.service")

_MAX_BYTES = 64 * 1024 * 1024  # a KRL this large is not one anybody meant to write
Signature = tuple

INTERVAL_SECONDS = 1.0


def _signature(paths: tuple[str, ...]) -> Signature:
    """What a look sees of the files: their identity, size and times, or the error; a change means re-read."""
    seen = []
    for path in paths:
        try:
            facts = os.stat(path)
            seen.append((path, facts.st_dev, facts.st_ino, facts.st_size, facts.st_mtime_ns, facts.st_ctime_ns))
        except OSError as exc:
            seen.append((path, exc.errno))
    return tuple(seen)


def read_files(paths: tuple[str, ...]) -> RevokedKeyFiles:
    """Read and parse every file; the first that fails makes the whole set a failure (fail closed)."""
    lists = []
    for path in paths:
        try:
            with open(path, "rb") as file:
                data = file.read(_MAX_BYTES + 1)
        except OSError as exc:
            return RevokedKeyFiles(failure=f"{path}: cannot read: {exc.strerror or exc}")
        if len(data) > _MAX_BYTES:
            return RevokedKeyFiles(failure=f"{path}: larger than {_MAX_BYTES // (1024 * 1024)} MiB")
        try:
            lists.append((path, parse_revoked_keys(data)))
        except KrlError as exc:
            return RevokedKeyFiles(failure=f"{path}: {exc}")
    return RevokedKeyFiles(lists=tuple(lists))


class RevokedKeysWatcher:
    """Keeps `context.revoked_keys` equal to the files of `context.config.revoked_keys`."""

    def __init__(self, context: ServerContext, changed: Callable[[str], Awaitable[object]]):
        self.context = context
        self._changed = changed
        self._seen: Signature | None = None
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """The first read, before the server listens (blocking is fine then)."""
        paths = self.context.config.revoked_keys
        self._seen = _signature(paths)
        self._install(read_files(paths), initial=True)

    def start(self) -> None:
        if self._task is None:  # also with no files: a SIGHUP may name some
            self._task = asyncio.ensure_future(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_SECONDS)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive anything a file system does
                log.exception("checking revoked_keys failed")

    async def check(self, force: bool = False) -> bool:
        """Look at the files (one stat each, off the event loop); re-read them if they changed or `force`.
        Returns whether they were re-read."""
        async with self._lock:
            paths = self.context.config.revoked_keys
            if not paths and not self.context.revoked_keys.lists and self.context.revoked_keys.failure is None \
                    and not force:
                return False
            seen = await asyncio.to_thread(_signature, paths)
            if seen == self._seen and not force:
                return False
            self._seen = seen  # taken before reading: a write during the read shows at the next look
            files = await asyncio.to_thread(read_files, paths)
            self._install(files)
        await self._changed("revoked keys changed")
        return True

    def _install(self, files: RevokedKeyFiles, initial: bool = False) -> None:
        before = self.context.revoked_keys
        self.context.revoked_keys = files
        if files.failure is not None:
            if files.failure != before.failure:
                log.error("revoked_keys %s; refusing every key and certificate login until it can be read",
                          files.failure)
            return
        if before.failure is not None and not initial:
            log.warning("revoked_keys readable again; key and certificate logins allowed")
        for path, revocations in files.lists:
            log.info("revoked_keys %s: %s", path, revocations.describe())
