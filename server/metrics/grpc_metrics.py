"""gRPC server metrics for `grpc.aio`, under the names go-grpc-prometheus uses (py-grpc-prometheus has no aio).

`grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`, `grpc_server_handling_seconds` and the stream
message counters, labelled `grpc_type`, `grpc_service`, `grpc_method`. Every method of the given services starts
at zero, so rates and ratios exist before the first call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Histogram

from tuneforge.server.handler_wrapping import Behaviour, MethodKind, rewrap, split_method, status_name

HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0)


class GrpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpcio ships no stubs
    """An aio server interceptor counting calls, outcomes, latency and stream messages."""

    def __init__(self, registry: CollectorRegistry, services: Iterable[ServiceDescriptor] = ()):
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started", "Total number of RPCs started on the server.", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            labels,
            buckets=HANDLING_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received", "Total number of RPC stream messages received on the server.", labels,
            registry=registry,
        )  # fmt: skip
        self.sent = Counter(
            "grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", labels,
            registry=registry,
        )  # fmt: skip
        for service in services:
            for method in service.methods:
                kind = MethodKind(method.client_streaming, method.server_streaming).grpc_type
                values = (kind, service.full_name, method.name)
                self.started.labels(*values)
                self.handled.labels(*values, "OK")
                self.handling.labels(*values)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = split_method(handler_call_details.method)
        return rewrap(handler, lambda behaviour, kind: self._wrap(behaviour, kind, service, method))

    def _wrap(self, behaviour: Behaviour, kind: MethodKind, service: str, method: str) -> Behaviour:
        values = (kind.grpc_type, service, method)
        started, handling = self.started.labels(*values), self.handling.labels(*values)
        received, sent = self.received.labels(*values), self.sent.labels(*values)
        request_streaming = kind.request_streaming
        handled = self.handled

        def finish(context: Any, began: float, error: BaseException | None) -> None:
            handling.observe(time.perf_counter() - began)
            handled.labels(*values, status_name(context, error)).inc()

        def requests_in(request: Any) -> Any:
            if not request_streaming:
                received.inc()
                return request
            return _counting(request, received.inc)

        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                started.inc()
                began, error = time.perf_counter(), None
                try:
                    async for response in behaviour(requests_in(request), context):
                        sent.inc()
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, began, error)

            return streaming

        async def single(request: Any, context: Any) -> Any:
            started.inc()
            began, error = time.perf_counter(), None
            try:
                response = await behaviour(requests_in(request), context)
                if response is not None:
                    sent.inc()
                return response
            except BaseException as exc:
                error = exc
                raise
            finally:
                finish(context, began, error)

        return single


async def _counting(requests: AsyncIterator[Any], count: Callable[[], None]) -> AsyncIterator[Any]:
    async for request in requests:
        count()
        yield request
