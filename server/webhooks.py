"""Webhooks: when a job ends (SUCCEEDED, FAILED, CANCELLED), a signed JSON POST to the job's and its tenant's URLs.

Each delivery carries `Tuneforge-Event-Id` (the same on every retry: receivers drop repeats), `Tuneforge-Event`
(`job.succeeded`...), and `Tuneforge-Signature: t=UNIX_TIME,v1=HEX`, the HMAC-SHA256 of `UNIX_TIME.BODY` under
the server's webhook secret, so a receiver checks both the sender and the freshness. A delivery that gets no 2xx
(an error status, a refused connection, a timeout) is retried with exponential backoff; 4xx other than 408 and 429
means the receiver refuses it, and it is not retried. A destination must resolve to public addresses only (Python's
`is_global`: not private, loopback, link-local, carrier-grade NAT or any other special range) unless the server
allows otherwise (`--webhook-allow-private`), so job specs cannot make the server call into its own network. The
delivery connects to the very address that was checked (no second lookup to rebind) and never follows a redirect.
Deliveries live in memory: a restart drops those still being retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from tuneforge.server import convert
from tuneforge.server.job_states import TERMINAL
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.records import EventRecord, JobRecord
from tuneforge.v1 import job_spec_pb2

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Tuneforge-Signature"
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WebhookSettings:
    secret: bytes
    allow_private: bool = False
    max_attempts: int = 8
    first_backoff_s: float = 1.0
    """Wait before the first retry; it doubles with each one (capped at 10 minutes)."""


def load_secret(path: Path) -> bytes:
    """The signing secret; made (random, 0600) at first start when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    secret = path.read_text().strip().encode()
    if len(secret) < 32:
        raise ValueError(f"{path} holds a webhook secret of {len(secret)} characters; use at least 32")
    return secret


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: bytes, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver does (and the tests): the signature matches and is recent."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", "")) and abs(time.time() - timestamp) <= tolerance_s


class DestinationRefused(Exception):
    """The URL resolves to an address webhooks may not call."""


def resolve_destination(host: str, port: int, allow_private: bool) -> str:
    """The one address a delivery connects to, checked: every address the name has must be global (public
    internet) unless private ones are allowed, so a name with one public and one internal answer is refused too.
    OSError (socket.gaierror) when the name does not resolve."""
    addresses = [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not addresses:
        raise OSError(f"{host} has no address")
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not ip.is_global or ip.is_multicast:
                raise DestinationRefused(f"{host} resolves to {ip}, which is not a public address")
    return str(addresses[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to by now (no DNS rebinding)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to the checked address, with the certificate verified for the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _post(url: str, body: bytes, headers: dict[str, str], allow_private: bool) -> int:
    """One attempt; the HTTP status (0 when no answer came). Redirects are never followed: a 3xx is the answer
    (and, not being 2xx, a failed delivery)."""
    parts = urllib.parse.urlsplit(url)
    host, secure = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    try:
        address = resolve_destination(host, port, allow_private)
    except OSError as exc:  # an unknown name is a failed delivery, retried like a refused connection
        log.info("webhook %s: %s does not resolve (%s)", url, host, exc)
        return 0
    kind = _PinnedHTTPSConnection if secure else _PinnedHTTPConnection
    connection = kind(host, port, address, TIMEOUT_S)
    path = parts.path or "/"
    try:
        connection.request("POST", f"{path}?{parts.query}" if parts.query else path, body=body, headers=headers)
        return int(connection.getresponse().status)
    except (OSError, http.client.HTTPException) as exc:
        log.info("webhook %s: no answer (%s)", url, exc)
        return 0
    finally:
        connection.close()


def _retryable(status: int) -> bool:
    return status == 0 or status >= 500 or status in (408, 429)


class WebhookNotifier:
    """Listens to job changes; sends one signed notification per terminal state to every URL that wants it."""

    def __init__(
        self,
        settings: WebhookSettings,
        tenant_webhooks: Callable[[str], tuple[str, ...]],
        metrics: ServiceMetrics,
    ):
        self._settings = settings
        self._tenant_webhooks = tenant_webhooks
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def on_change(self, record: JobRecord, events: list[EventRecord]) -> None:
        """A scheduler listener (on the loop, must not block): a change into a terminal state starts deliveries."""
        if record.state not in TERMINAL or not any(event.kind == "state_change" for event in events):
            return
        spec = job_spec_pb2.JobSpec.FromString(record.spec)
        urls = dict.fromkeys([*spec.notifications.webhook_urls, *self._tenant_webhooks(record.tenant)])
        if not urls:
            return
        kind = f"job.{record.state.value.lower()}"
        payload = {
            "type": kind,
            "created": time.time(),
            "job": MessageToDict(convert.job_to_proto(record)),
        }
        for url in urls:
            event_id = f"evt-{secrets.token_hex(12)}"
            body = json.dumps({"id": event_id, **payload}, sort_keys=True).encode()
            task = asyncio.get_running_loop().create_task(self._deliver(url, body, event_id, kind))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, body: bytes, event_id: str, kind: str) -> None:
        settings = self._settings
        delay = settings.first_backoff_s
        for attempt in range(1, settings.max_attempts + 1):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "tuneforge-webhooks/1",
                "Tuneforge-Event": kind,
                "Tuneforge-Event-Id": event_id,
                "Tuneforge-Delivery-Attempt": str(attempt),
                SIGNATURE_HEADER: sign(settings.secret, timestamp, body),
            }
            try:
                status = await asyncio.to_thread(_post, url, body, headers, settings.allow_private)
            except DestinationRefused as exc:
                log.warning("webhook %s not sent: %s", url, exc)
                self._metrics.webhook_deliveries.labels("refused").inc()
                return
            if 200 <= status < 300:
                self._metrics.webhook_deliveries.labels("delivered").inc()
                return
            if not _retryable(status) or attempt == settings.max_attempts:
                log.warning("webhook %s gave up after %d attempts (last status %s)", url, attempt, status or "none")
                self._metrics.webhook_deliveries.labels("failed").inc()
                return
            self._metrics.webhook_deliveries.labels("retried").inc()
            await asyncio.sleep(delay)  # the backoff itself, not synchronisation
            delay = min(delay * 2, 600.0)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
