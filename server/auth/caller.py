"""Who is calling: the authenticated tenant and role, set by the auth interceptor for the length of one call.

The tenant always comes from the credentials (a bearer token or a client certificate), never from the request.
Without an access file authentication is off and every caller is an admin of the default tenant (a server that
only listens on loopback, for one team).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from tuneforge.server.records import DEFAULT_TENANT


class Role(StrEnum):
    USER = "user"
    """Sees and changes only its own tenant's files, jobs and sweeps."""
    ADMIN = "admin"
    """Also sees every tenant's (lists show all); creates in its own tenant."""


@dataclass(frozen=True)
class Caller:
    tenant: str
    role: Role
    subject: str
    """Which credential: a token's name or a certificate's common name (for the audit log)."""

    def sees(self, tenant: str) -> bool:
        return self.role is Role.ADMIN or tenant == self.tenant

    @property
    def scope(self) -> str | None:
        """The tenant lists are limited to; None for an admin (every tenant)."""
        return None if self.role is Role.ADMIN else self.tenant


LOCAL_ADMIN = Caller(DEFAULT_TENANT, Role.ADMIN, "anonymous (authentication off)")
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("tuneforge_caller", default=LOCAL_ADMIN)


def current_caller() -> Caller:
    return _CALLER.get()


@contextlib.contextmanager
def calling_as(caller: Caller) -> Iterator[None]:
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # a stream the caller reset is closed from another context
            _CALLER.reset(token)
