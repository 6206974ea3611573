"""Text a caller can fill (a label, a file name, a library's error) is cut before it is stored, so one job's
failure message or log line can never make its job unreadable: every event, record and list page stays well under
the gRPC message limit."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 4096
"""An error message or log line as stored (up to 16 KiB of UTF-8)."""
MAX_REASON_CHARS = 64


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The text, or its first `limit` characters with a marker saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit:,} more characters cut]"
