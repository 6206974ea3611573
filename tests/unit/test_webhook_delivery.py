"""Where a webhook may go and how it gets there: only public addresses (every special range refused, whatever the
spelling), one name lookup whose checked address is the one connected to, no redirect followed, and an unknown
name is a failed delivery that is retried, not a crash."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from tuneforge.server import webhooks
from tuneforge.server.metrics.service_metrics import ServiceMetrics
from tuneforge.server.webhooks import DestinationRefused, WebhookNotifier, WebhookSettings, resolve_destination

REFUSED = [
    "127.0.0.1",  # loopback
    "127.1",  # loopback, short spelling
    "2130706433",  # loopback as one number
    "::1",
    "::ffff:127.0.0.1",  # loopback mapped into IPv6
    "10.0.0.8",  # private
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",  # link-local: cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "192.0.2.10",  # documentation
    "198.18.0.1",  # benchmarking
    "0.0.0.0",
    "fd00::1",  # unique local
    "fe80::1",  # link-local
    "224.0.0.1",  # multicast
    "localhost",
]


@pytest.mark.parametrize("host", REFUSED)
def test_every_non_public_address_is_refused(host: str) -> None:
    with pytest.raises(DestinationRefused, match="not a public address"):
        resolve_destination(host, 80, allow_private=False)
    assert resolve_destination(host, 80, allow_private=True)


def test_a_public_address_is_allowed() -> None:
    assert resolve_destination("8.8.8.8", 443, allow_private=False) == "8.8.8.8"


def test_a_name_with_any_private_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [("8.8.8.8", 80), ("10.1.2.3", 80)]  # no DNS here: the resolver's answer is given
    monkeypatch.setattr(
        webhooks.socket,
        "getaddrinfo",
        lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", answer) for answer in answers],
    )
    with pytest.raises(DestinationRefused, match=r"10\.1\.2\.3"):
        resolve_destination("hooks.example", 80, allow_private=False)


class Receiver(BaseHTTPRequestHandler):
    """Answers /hook with a redirect to /metadata, and records every path asked for."""

    paths: list[str] = []
    hosts: list[str] = []

    def do_POST(self) -> None:
        self.paths.append(self.path)
        self.hosts.append(self.headers["Host"])
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(302 if self.path == "/hook" else 200)
        self.send_header("Location", "/metadata")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[int]:
    Receiver.paths, Receiver.hosts = [], []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def test_redirects_are_not_followed_and_the_name_is_resolved_once(
    receiver: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counted(host: str, *args: Any, **kwargs: Any) -> Any:  # a spy: the real resolver answers
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", counted)
    status = webhooks._post(f"http://localhost:{receiver}/hook", b"{}", {}, allow_private=True)
    assert status == 302 and Receiver.paths == ["/hook"], "the redirect to /metadata was not followed"
    names = [host for host in lookups if not _is_address(host)]  # connecting to a literal address looks up nothing
    assert names == ["localhost"], "connected to the address checked, without a second lookup of the name"
    assert Receiver.hosts == [f"localhost:{receiver}"]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def test_an_unknown_name_is_a_retried_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", unknown)
    assert webhooks._post("https://nowhere.example/hook", b"{}", {}, allow_private=False) == 0
    metrics = ServiceMetrics()
    notifier = WebhookNotifier(WebhookSettings(b"k" * 32, max_attempts=2, first_backoff_s=0.01), lambda t: (), metrics)
    asyncio.run(notifier._deliver("https://nowhere.example/hook", b"{}", "evt-1", "job.succeeded"))
    assert metrics.webhook_deliveries.labels("retried")._value.get() == 1
    assert metrics.webhook_deliveries.labels("failed")._value.get() == 1


def test_the_shipped_verifier_refuses_stale_and_foreign_signatures() -> None:
    import time

    from tuneforge.server.webhooks import sign, verify_signature

    secret, body = b"k" * 32, b'{"type": "job.succeeded"}'
    now = int(time.time())
    assert verify_signature(secret, sign(secret, now, body), body)
    assert not verify_signature(secret, sign(secret, now - 301, body), body), "older than 5 minutes"
    assert not verify_signature(secret, sign(secret, now + 301, body), body), "from the future"
    assert not verify_signature(b"x" * 32, sign(secret, now, body), body)
    assert not verify_signature(secret, sign(secret, now, body), body + b" "), "a changed body"
    assert not verify_signature(secret, "v1=" + sign(secret, now, body).split("v1=")[1], body), "no timestamp"
