"""Page sizes and tokens follow AIP-158."""

from __future__ import annotations

import pytest

from tuneforge.server.errors import ApiError
from tuneforge.server.pagination import MAX_PAGE_SIZE, make_token, parse_page


def test_sizes_default_clamp_and_reject_negative() -> None:
    assert parse_page(0, "").size == 50
    assert parse_page(5000, "").size == MAX_PAGE_SIZE
    with pytest.raises(ApiError) as raised:
        parse_page(-1, "")
    assert raised.value.violations[0].field == "page_size"


def test_tokens_round_trip_and_are_bound_to_their_filter() -> None:
    token = make_token(42, "RUNNING")
    assert parse_page(10, token, "RUNNING").cursor == 42
    assert make_token(None) == ""
    with pytest.raises(ApiError, match="different filter"):
        parse_page(10, token, "QUEUED")
    with pytest.raises(ApiError, match="not a token"):
        parse_page(10, "garbage!")
