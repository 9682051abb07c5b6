"""The time, in one place: aware UTC now, and the fixed-width text form the audit log and the CLI store and show."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Fixed-width UTC ISO 8601 with milliseconds and 'Z', so text order is time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def human(moment: datetime | str) -> str:
    """The one form a person reads a time in, whatever form it was stored in: UTC to the second with 'Z',
    e.g. 2026-12-01T23:23:23Z (a time without a zone is taken as UTC)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
