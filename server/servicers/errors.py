"""Turns exceptions into rich gRPC statuses at the servicer boundary, for unary and streaming handlers alike."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tuneforge.server.errors import ApiError, failed_precondition, is_disk_full, to_status
from tuneforge.server.job_states import IllegalTransition

log = logging.getLogger(__name__)
T = TypeVar("T")


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, IllegalTransition):
        return failed_precondition("ILLEGAL_STATE", str(exc), state=exc.current.value)
    if is_disk_full(exc):
        log.error("the server's disk is full: %s", exc)
        return ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "STORAGE_FULL", "the server's disk is full; retry once space is freed"
        )
    log.exception("unexpected error in a handler")
    return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error; the server log has the details")


def unary(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Unary handlers: any domain error aborts the call with its status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the servicer boundary
            await context.abort_with_status(to_status(_as_api_error(exc)))
            raise  # unreachable: abort raises

    return wrapper


def streaming(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Server-streaming handlers (async generators): the same mapping, even after some messages went out."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[T]:
        try:
            async for item in handler(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # the servicer boundary
            await context.abort_with_status(to_status(_as_api_error(exc)))

    return wrapper
