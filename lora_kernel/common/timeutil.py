"""The one time format of records, ledger entries and kernel events: ISO 8601 in UTC.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
from __future__ import annotations

import datetime as dt


def parse_time(value: str | dt.datetime | int | float) -> dt.datetime:
    """An aware UTC datetime from an ISO string (``Z`` or an offset; a bare date is midnight),
    a datetime (naive means UTC) or epoch seconds. ``ValueError`` if it is none of these."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    if not isinstance(value, dt.datetime):
        raise ValueError(f"not a time: {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def iso_time(value: str | dt.datetime | int | float | None = None) -> str:
    """``value`` (anything :func:`parse_time` takes; None for now) as ``YYYY-MM-DDTHH:MM:SS…Z``."""
    when = dt.datetime.now(dt.UTC) if value is None else parse_time(value)
    return when.isoformat().replace("+00:00", "Z")


def utc_now() -> dt.datetime:
    """The current time, aware, in UTC."""
    return dt.datetime.now(dt.UTC)
