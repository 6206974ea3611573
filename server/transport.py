"""How the server listens: TLS (or mutual TLS) from PEM files, plaintext only on loopback unless asked for."""

from __future__ import annotations

import ipaddress

import grpc

from tuneforge.server.settings import ServerSettings, SettingsError


class TransportError(SettingsError):
    """The transport settings cannot be used; the message says what to change."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials, or None for plaintext (refused off loopback unless allow_plaintext)."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise TransportError("--tls-cert and --tls-key go together")
    if settings.tls_cert is None or settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise TransportError("--tls-client-ca needs --tls-cert and --tls-key")
        if not is_loopback(settings.host) and not settings.allow_plaintext:
            raise TransportError(
                f"refusing to serve plaintext on {settings.host}: give --tls-cert and --tls-key, or --allow-plaintext "
                "where a proxy or service mesh terminates TLS"
            )
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
