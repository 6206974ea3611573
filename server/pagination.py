"""Page sizes and opaque page tokens, as AIP-158 describes them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from tuneforge.server.errors import FieldViolation, invalid_argument

M = TypeVar("M", bound=Message)
MAX_PAGE_SIZE = 1000
PAGE_BUDGET_BYTES = 3 << 20
"""A list response's size: under the 4 MiB message limit whatever its rows hold (a page ends early instead)."""


@dataclass(frozen=True)
class Page:
    """A validated page request: how many, after which cursor."""

    size: int
    cursor: int | None


def _fingerprint(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def parse_page(page_size: int, page_token: str, query: str = "", default_size: int = 50) -> Page:
    """Validates page_size (0 -> default, clamped to 1000, negative rejected) and decodes the token.

    `query` describes the filter; a token made for another filter is rejected rather than silently misapplied.
    """
    if page_size < 0:
        raise invalid_argument([FieldViolation("page_size", f"must not be negative, got {page_size}")])
    size = min(page_size or default_size, MAX_PAGE_SIZE)
    if not page_token:
        return Page(size, None)
    try:
        payload = json.loads(base64.urlsafe_b64decode(page_token.encode()))
        cursor = int(payload["c"])
        fingerprint = str(payload["q"])
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid_argument([FieldViolation("page_token", "not a token this server issued")]) from exc
    if fingerprint != _fingerprint(query):
        raise invalid_argument([FieldViolation("page_token", "was issued for a different filter")])
    return Page(size, cursor)


def fit_page(messages: Sequence[M], cursors: Sequence[int], next_cursor: int | None) -> tuple[Sequence[M], int | None]:
    """The page's messages that fit one response, and the cursor to go on from: the next page's as the store gave
    it, or, when the page ended early, the cursor of the last message kept (`cursors` holds one per message)."""
    shown = fitting(messages)
    if shown < len(messages):
        return messages[:shown], cursors[shown - 1]
    return messages, next_cursor


def fitting(messages: Sequence[Message], budget_bytes: int = PAGE_BUDGET_BYTES) -> int:
    """How many of the messages, from the first, fit in one response (always at least one)."""
    total = 0
    for count, message in enumerate(messages):
        total += message.ByteSize() + 16  # the field's tag and length
        if count and total > budget_bytes:
            return count
    return len(messages)


def make_token(cursor: int | None, query: str = "") -> str:
    """The next_page_token for a cursor; empty when there is no next page."""
    if cursor is None:
        return ""
    payload = json.dumps({"c": cursor, "q": _fingerprint(query)}).encode()
    return base64.urlsafe_b64encode(payload).decode()
