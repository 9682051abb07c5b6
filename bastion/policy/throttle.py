"""How often a repeated refusal gets an audit row of its own: the first at once, then at most one per key every
`interval` seconds, carrying how many were left out in between. For refusals that a misconfigured load balancer
or a scanner can repeat per connection, so that they cannot flood the audit log.

Pure bookkeeping, as limits.py: the caller passes the time (monotonic seconds); at most `max_keys` keys are
remembered, the least recently seen forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict


class RowThrottle:
    def __init__(self, interval: float = 60.0, max_keys: int = 4096):
        self.interval = interval
        self.max_keys = max_keys
        self._keys: OrderedDict[object, tuple[float, int]] = OrderedDict()  # key -> (last row at, left out since)

    def admit(self, key: object, now: float) -> int | None:
        """None: leave this one out of the audit (it is counted). Otherwise write a row, which should say that
        the returned number of the same were left out since the last one."""
        last = self._keys.pop(key, None)
        if last is not None and now - last[0] < self.interval:
            self._keys[key] = (last[0], last[1] + 1)
            return None
        self._keys[key] = (now, 0)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return last[1] if last is not None else 0
