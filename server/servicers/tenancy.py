"""What the caller may see: another tenant's resource is NOT_FOUND, exactly as one that does not exist, so names
and existence do not leak across tenants."""

from __future__ import annotations

from typing import Protocol, TypeVar

from tuneforge.server.auth.caller import current_caller
from tuneforge.server.errors import FieldViolation, invalid_argument, not_found


class Owned(Protocol):
    @property
    def tenant(self) -> str: ...


R = TypeVar("R", bound=Owned)


def visible(record: R | None, name: str) -> R:
    """The record if the caller may see it; NOT_FOUND (the same as for a missing one) otherwise."""
    if record is None or not current_caller().sees(record.tenant):
        raise not_found(name)
    return record


REQUEST_ID_RULE = "must be a UUID (at most 64 of [A-Za-z0-9_-])"


def request_id_ok(request_id: str) -> bool:
    """Idempotency keys are UUIDs or similar: short and plain, so they key an index and a log line safely."""
    return 1 <= len(request_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in request_id)


def check_request_id(request_id: str) -> None:
    if not request_id_ok(request_id):
        raise invalid_argument([FieldViolation("request_id", REQUEST_ID_RULE)])


def scoped_request_id(request_id: str) -> str | None:
    """Idempotency keys are per tenant: another tenant's key never returns (or blocks) this tenant's create."""
    return f"{current_caller().tenant}:{request_id}" if request_id else None
