"""Limits before authentication, the way OpenSSH's sshd has them: MaxStartups-style random early drop of
unauthenticated connections, and per-source penalties (PerSourcePenalties) for sources that keep failing;
sources in an exempt list (PerSourcePenaltyExemptList: a NAT, a monitoring host) are spared both.

Pure bookkeeping: the caller passes the time (monotonic seconds) and the random draw, so tests need no
clock or luck. Memory is bounded: at most `max_sources` sources are remembered, oldest evicted first.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StartupLimit:
    """"start:rate:full": past `start` unauthenticated connections, drop new ones with probability `rate`%,
    rising linearly to 100% at `full`."""

    start: int = 10
    rate: int = 30
    full: int = 100

    @classmethod
    def parse(cls, text: str) -> "StartupLimit":
        parts = text.split(":")
        try:
            if len(parts) == 1:
                start = full = int(parts[0])
                rate = 100
            elif len(parts) == 3:
                start, rate, full = (int(p) for p in parts)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{text!r} must be START:RATE:FULL like 10:30:100, or one number") from None
        if not (1 <= start <= full and 1 <= rate <= 100):
            raise ValueError(f"{text!r} needs 1 <= START <= FULL and RATE between 1 and 100")
        return cls(start, rate, full)

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"

    def should_drop(self, unauthenticated: int, draw: float) -> bool:
        """`unauthenticated` counts connections already waiting; `draw` is uniform in [0, 1)."""
        if unauthenticated < self.start:
            return False
        if unauthenticated >= self.full:
            return True
        span = self.full - self.start
        probability = (self.rate + (100 - self.rate) * (unauthenticated - self.start) / span) / 100
        return draw < probability


def source_of(address: str) -> str:
    """The unit a penalty applies to: the IPv4 address, or the IPv6 /64 (one host usually owns a /64)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def is_exempt(address: str, exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether the source is inside the `penalty_exempt` networks: never penalized, never dropped by the
    startup limit. Many users behind one NAT share an address, so one user's failures must not lock out all."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in exempt)


@dataclass(slots=True)
class _Record:
    failures: int = 0
    penalties: int = 0
    until: float = 0.0


class SourcePenalties:
    """Connections that end without authenticating count as failures; `threshold` of them in a row get the
    source refused for `base` seconds, doubling with each further penalty up to `maximum`."""

    def __init__(self, threshold: int = 5, base: float = 30.0, maximum: float = 3600.0, max_sources: int = 65536):
        self.threshold = threshold
        self.base = base
        self.maximum = maximum
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Record] = OrderedDict()

    def refused_until(self, address: str, now: float) -> float | None:
        """When the source's penalty ends, or None if it may connect now."""
        record = self._sources.get(source_of(address))
        if record is not None and record.until > now:
            return record.until
        return None

    def failed(self, address: str, now: float) -> float | None:
        """Count one failed connection; returns the penalty's length when this failure starts one."""
        key = source_of(address)
        record = self._sources.pop(key, None) or _Record()
        self._sources[key] = record  # most recently seen last
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        if record.until > now:
            # Connections accepted just before the penalty keep failing during it; they must not stack
            # further penalties, or one burst behind a NAT would lock the source out for the maximum.
            return None
        record.failures += 1
        if record.failures < self.threshold:
            return None
        record.failures = 0
        length = min(self.maximum, self.base * 2**record.penalties)
        record.penalties += 1
        record.until = now + length
        return length

    def succeeded(self, address: str) -> None:
        """A login from the source clears its failure count (not its penalty history)."""
        record = self._sources.get(source_of(address))
        if record is not None:
            record.failures = 0
