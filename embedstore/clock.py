"""The one clock: timezone-aware UTC now, as a datetime (table rows) or an ISO string (JSON, manifest)."""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    """The current time in UTC (timezone-aware): what timestamp columns store."""
    return dt.datetime.now(dt.timezone.utc)


def now_iso(timespec: str = "seconds") -> str:
    """The current UTC time as an ISO 8601 string (manifest entries, JSON sidecars)."""
    return now().isoformat(timespec=timespec)
