# This file adapts functions from asyncssh 2.24.1 (connection.py),
# Copyright (c) 2013-2026 by Ron Frederick <ronf@timeheart.net> and others,
# and is made available under the same terms as asyncssh:
# SPDX-License-Identifier: EPL-2.0 OR GPL-2.0-or-later
"""The fast path's keepalive timer: not cancelled and re-created on every read (asyncssh's way, a timer handle
per read at bulk rate). A read notes the time, and the timer, when it fires, re-arms itself for the rest of
the interval if anything arrived meanwhile: silence is still counted from the last read."""

from __future__ import annotations


def _reset_keepalive_timer(self) -> None:
    if self._auth_complete:
        if self._keepalive_timer:
            self._keepalive_seen = self._loop.time()
        else:
            self._set_keepalive_timer()


def _keepalive_timer_callback(self) -> None:
    seen, self._keepalive_seen = self._keepalive_seen, 0.0
    if seen:
        remaining = seen + self._keepalive_interval - self._loop.time()
        if remaining > 0:  # the peer spoke since the timer was set: silence has lasted less than the interval
            self._keepalive_timer = self._loop.call_later(remaining, self._keepalive_timer_callback)
            return
    _keepalive_timer_callback._bastion_original(self)
