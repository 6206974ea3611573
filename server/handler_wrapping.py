"""Rebuilding a gRPC method handler around its behaviour: what every `grpc.aio` server interceptor that needs the
call's context (its peer, its status) has to do, for the four kinds of method alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

Behaviour = Callable[..., Any]


@dataclass(frozen=True)
class MethodKind:
    request_streaming: bool
    response_streaming: bool

    @property
    def grpc_type(self) -> str:
        """As go-grpc-prometheus names it."""
        if self.request_streaming and self.response_streaming:
            return "bidi_stream"
        if self.request_streaming:
            return "client_stream"
        return "server_stream" if self.response_streaming else "unary"


def rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour, MethodKind], Behaviour]) -> Any:
    """The same handler with `wrap(behaviour, kind)` in place of its behaviour."""
    kind = MethodKind(handler.request_streaming, handler.response_streaming)
    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, kind), *serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, kind), *serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, kind), *serializers)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, kind), *serializers)


def split_method(full_method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def status_name(context: Any, error: BaseException | None) -> str:
    """The call's final status code name, from the context (set by abort) or the exception that ended it."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if error is not None and type(error).__name__ in ("CancelledError", "GeneratorExit"):
        return "CANCELLED"
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"
    return "OK"
