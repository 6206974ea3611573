"""Domain errors and their one mapping to `google.rpc.Status` (exactly one ErrorInfo, plus BadRequest for fields)."""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "tuneforge.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path (`job.spec.hyperparameters.epochs`) and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """A quota a request would break: whose (`tenants/team-a`) and which limit, in words."""

    subject: str
    description: str


@dataclass
class ApiError(Exception):
    """An error the API reports as is: a status code, an UPPER_SNAKE reason and a message for a person."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)
    quota: QuotaViolation | None = None
    """For RESOURCE_EXHAUSTED by a quota: which limit (sent as a google.rpc.QuotaFailure)."""

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT from a file write, or SQLite's own 'database or disk is full'."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def invalid_argument(violations: list[FieldViolation], reason: str = "INVALID_ARGUMENT") -> ApiError:
    """INVALID_ARGUMENT naming every bad field."""
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, reason, f"invalid request: {summary}", violations=violations)


def not_found(name: str) -> ApiError:
    kind = name.split("/", 1)[0].rstrip("s").upper() or "RESOURCE"
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{kind}_NOT_FOUND", f"{name} does not exist", {"name": name})


def quota_exceeded(tenant: str, limit: str, value: int, message: str) -> ApiError:
    """RESOURCE_EXHAUSTED naming the tenant's quota that the request would break."""
    return ApiError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
        message,
        {"tenant": tenant, "limit": limit, "value": str(value)},
        quota=QuotaViolation(f"tenants/{tenant}", f"{limit} = {value}: {message}"),
    )


def failed_precondition(reason: str, message: str, **metadata: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, dict(metadata))


def to_status(error: ApiError) -> grpc.Status:
    """The rich status carried in the call's trailers (read with `rpc_status.from_call`)."""
    details = []
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    if error.quota is not None:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=error.quota.subject, description=error.quota.description
                )
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        details.append(packed)
    code: int = error.code.value[0]
    message = status_pb2.Status(code=code, message=error.message, details=details)
    return rpc_status.to_status(message)
