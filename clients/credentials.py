"""How the client proves who it is and checks whom it talks to: TLS (server CA, optional client certificate for
mutual TLS) and a bearer token sent with every call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "TUNEFORGE_TOKEN"


@dataclass(frozen=True)
class Credentials:
    """All optional: without a CA the channel is plaintext (loopback, or a proxy's job)."""

    token: str | None = None
    """Sent as `authorization: Bearer TOKEN`; the tenant comes from it."""
    tls_ca: Path | None = None
    """PEM CA that signed the server's certificate; set it (or tls=True) to speak TLS."""
    tls_cert: Path | None = None
    """PEM client certificate for mutual TLS (with tls_key)."""
    tls_key: Path | None = None
    tls: bool = False
    """TLS with the system's trusted CAs (when tls_ca is not given)."""

    @property
    def secure(self) -> bool:
        return self.tls or self.tls_ca is not None

    @classmethod
    def from_environment(cls, **given: Any) -> Credentials:
        """Explicit values, with the token falling back to $TUNEFORGE_TOKEN."""
        token = given.pop("token", None) or os.environ.get(TOKEN_ENV) or None
        return cls(token=token, **given)


_CLIENT_INTERCEPTORS: tuple[Any, ...] = (
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
)  # grpcio ships no stubs: the bases are untyped


class _BearerToken(*_CLIENT_INTERCEPTORS):  # type: ignore[misc]
    """Adds the bearer token to every call's metadata (works over plaintext loopback as well as TLS)."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


def open_channel(target: str, credentials: Credentials, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    if credentials.secure:

        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=read(credentials.tls_ca),
            private_key=read(credentials.tls_key),
            certificate_chain=read(credentials.tls_cert),
        )
        channel = grpc.secure_channel(target, channel_credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if credentials.token:
        return grpc.intercept_channel(channel, _BearerToken(credentials.token))
    return channel
