"""Authentication, per-tenant stream limits and the audit log, for every call before it reaches a servicer.

A caller proves who it is with `authorization: Bearer TOKEN` (looked up by its SHA-256 in the access file) or, over
mutual TLS, with a client certificate whose common name the access file lists. The servicers then read the caller
from `current_caller()`. The health and reflection services stay open, so probes and grpcurl need no token.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tuneforge.server.auth.access import AccessConfig, AccessFile, TenantQuota
from tuneforge.server.auth.caller import LOCAL_ADMIN, Caller, calling_as
from tuneforge.server.errors import ApiError, quota_exceeded, to_status
from tuneforge.server.handler_wrapping import Behaviour, MethodKind, rewrap, split_method, status_name

audit_log = logging.getLogger("tuneforge.audit")
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
MUTATING = ("Create", "Delete", "Cancel", "Pause", "Resume", "Upload", "Update", "Export")
"""Methods whose names start so change something: each call is written to the audit log."""


def _unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def authenticate(config: AccessConfig, metadata: dict[str, str], auth_context: dict[str, list[bytes]]) -> Caller:
    """The caller named by a bearer token, else by a client certificate; ApiError(UNAUTHENTICATED) otherwise."""
    header = metadata.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthenticated("MALFORMED_CREDENTIALS", "the authorization header must be `Bearer TOKEN`")
        caller = config.caller_for_token(token.strip())
        if caller is None:
            raise _unauthenticated("INVALID_TOKEN", "the bearer token is not known to this server (or was revoked)")
        return caller
    for name in auth_context.get("x509_common_name", []):
        caller = config.certificates.get(name.decode(errors="replace"))
        if caller is not None:
            return caller
    raise _unauthenticated(
        "MISSING_CREDENTIALS",
        "send `authorization: Bearer TOKEN`, or a client certificate the server's access file names",
    )


@dataclass(frozen=True)
class CallLimits:
    """Calls in flight the API admits: in all, and (with an access file) per tenant, so one tenant can never take
    the capacity every other tenant needs. Health and reflection calls are never counted nor refused."""

    total: int = 1000
    per_tenant: int = 250


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no stubs
    """Turns credentials into a Caller for each call; without an access file every caller is the local admin.
    Admits each call within the call limits and its tenant's stream quota (server, client and bidi streams)."""

    def __init__(
        self, access: AccessFile | None, quotas: Callable[[str], TenantQuota], limits: CallLimits | None = None
    ):
        self._access = access
        self._quotas = quotas
        self._limits = limits or CallLimits()
        self._open_streams: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)
        self._total_calls = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = split_method(handler_call_details.method)
        if service in OPEN_SERVICES:
            return handler
        return rewrap(handler, lambda behaviour, kind: self._wrap(behaviour, kind, method))

    async def _admit(self, context: Any) -> Caller:
        if self._access is None:
            return LOCAL_ADMIN
        pairs = [(key.lower(), value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]
        metadata = dict(pairs)
        try:
            if sum(key == "authorization" for key, _ in pairs) > 1:
                raise _unauthenticated("MALFORMED_CREDENTIALS", "send one authorization header, not several")
            return authenticate(self._access.config, metadata, context.auth_context())
        except ApiError as error:
            await context.abort_with_status(to_status(error))
            raise  # unreachable: abort raises

    async def _open_stream(self, caller: Caller, context: Any) -> None:
        limit = self._quotas(caller.tenant).max_streams
        if self._open_streams[caller.tenant] >= limit:
            message = f"tenant {caller.tenant} already has {limit} open streams; close one first"
            await context.abort_with_status(to_status(quota_exceeded(caller.tenant, "max_streams", limit, message)))
        self._open_streams[caller.tenant] += 1

    def _close_stream(self, caller: Caller) -> None:
        self._open_streams[caller.tenant] -= 1
        if not self._open_streams[caller.tenant]:
            del self._open_streams[caller.tenant]

    async def _begin_call(self, caller: Caller, context: Any) -> None:
        """Counts the call in, or refuses it: the server's total first, then the tenant's share."""
        if self._total_calls >= self._limits.total:
            message = f"the server has {self._limits.total} calls in flight, its limit; retry with backoff"
            await context.abort_with_status(to_status(_busy("SERVER_BUSY", message, self._limits.total)))
        if self._access is not None and self._calls[caller.tenant] >= self._limits.per_tenant:
            message = (
                f"tenant {caller.tenant} has {self._limits.per_tenant} calls in flight, its share of the server; "
                "wait for some to finish"
            )
            await context.abort_with_status(to_status(_busy("TENANT_BUSY", message, self._limits.per_tenant)))
        self._total_calls += 1
        self._calls[caller.tenant] += 1

    def _end_call(self, caller: Caller) -> None:
        self._total_calls -= 1
        self._calls[caller.tenant] -= 1
        if not self._calls[caller.tenant]:
            del self._calls[caller.tenant]

    def _wrap(self, behaviour: Behaviour, kind: MethodKind, method: str) -> Behaviour:
        audited = method.startswith(MUTATING)

        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                caller = await self._admit(context)
                await self._begin_call(caller, context)
                began, error = time.perf_counter(), None
                try:
                    await self._open_stream(caller, context)
                    try:
                        with calling_as(caller):
                            async for response in behaviour(request, context):
                                yield response
                    finally:
                        self._close_stream(caller)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._end_call(caller)
                    if audited:  # ExportModel streams its file back, and writes one on the server
                        _audit(caller, method, _target(request, None), status_name(context, error), began)

            return streaming

        async def single(request: Any, context: Any) -> Any:
            caller = await self._admit(context)
            await self._begin_call(caller, context)
            began, response, error = time.perf_counter(), None, None
            try:
                if kind.request_streaming:  # an upload holds a call as long as a watch does
                    await self._open_stream(caller, context)
                try:
                    with calling_as(caller):
                        response = await behaviour(request, context)
                    return response
                finally:
                    if kind.request_streaming:
                        self._close_stream(caller)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end_call(caller)
                if audited:
                    _audit(caller, method, _target(request, response), status_name(context, error), began)

        return single


def _busy(reason: str, message: str, limit: int) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, {"limit": str(limit)})


def _target(request: Any, response: Any) -> str:
    """The resource a call acted on: the response's name for creations, else the request's."""
    for message in (response, request):
        name = getattr(message, "name", "")
        if isinstance(name, str) and name:
            return name
    return ""


def _audit(caller: Caller, method: str, target: str, code: str, began: float) -> None:
    fields = {
        "audit": True,
        "subject": caller.subject,
        "tenant": caller.tenant,
        "role": caller.role.value,
        "method": method,
        "target": target,
        "code": code,
        "duration_s": round(time.perf_counter() - began, 6),
    }
    audit_log.info(
        "audit: %s (%s, %s) %s %s -> %s", caller.subject, caller.tenant, caller.role.value, method, target, code,
        extra=fields,
    )  # fmt: skip
