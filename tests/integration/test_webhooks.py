"""Webhooks through the real server: a local receiver answers 500 first and 200 after; the job's end arrives signed
(HMAC-SHA256 over the timestamp and body), with the job in the payload, and the same event id on the retry."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from clients.client import TuneforgeClient
from clients.local_server import start_local_server
from server.webhooks import SIGNATURE_HEADER, verify_signature
from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, sample, scrape_until, text_spec, wait_for_end

pytestmark = pytest.mark.integration


def signed_by(secret: bytes, header: str, body: bytes) -> bool:
    """The signature as the README documents it, recomputed here rather than with the server's own code:
    `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`, with t within 5 minutes of now."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert set(fields) == {"t", "v1"}, header
    digest = hmac.new(secret, f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(digest, fields["v1"]) and abs(time.time() - int(fields["t"])) <= 300


SECRET = "s3cret-" * 6


class Receiver(ThreadingHTTPServer):
    def __init__(self, statuses: list[int]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.statuses = statuses
        self.received: queue.Queue[tuple[dict[str, str], bytes, int]] = queue.Queue()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/tuneforge"


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.server.received.put((dict(self.headers), body, status))
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver([500])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_finished_job_is_announced_signed_and_retried(
    receiver: Receiver, tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    secret_file = tmp_path / "webhook.key"
    secret_file.write_text(SECRET)
    args = [*SERVER_ARGS, "--webhook-secret-file", str(secret_file), "--webhook-allow-private"]
    args += ["--webhook-backoff-s", "0.2"]
    server = start_local_server(tmp_path / "data", workers=1, model_roots=[model_root], extra_args=args)
    try:
        with TuneforgeClient(server.target, timeout_s=30) as client:
            client.wait_until_serving(120)
            spec = text_spec(tiny_bert, client.upload_file(keyword_dataset).name, epochs=1)
            spec.notifications.webhook_urls.append(receiver.url)
            job = client.create_job(spec)
            final = wait_for_end(client, job.name)
            assert final.state == STATE.SUCCEEDED
            first = receiver.received.get(timeout=60)
            second = receiver.received.get(timeout=60)
            assert receiver.received.empty()
            for (headers, body, _), attempt in zip((first, second), ("1", "2"), strict=True):
                assert signed_by(SECRET.encode(), headers[SIGNATURE_HEADER], body)
                assert not signed_by(b"another secret of thirty-two chars!", headers[SIGNATURE_HEADER], body)
                assert verify_signature(SECRET.encode(), headers[SIGNATURE_HEADER], body)  # the shipped verifier agrees
                assert headers["Tuneforge-Event"] == "job.succeeded"
                assert headers["Tuneforge-Delivery-Attempt"] == attempt
            assert (first[2], second[2]) == (500, 200)
            assert first[1] == second[1]  # the same event, sent again
            payload = json.loads(second[1])
            assert payload["id"] == first[0]["Tuneforge-Event-Id"] == second[0]["Tuneforge-Event-Id"]
            assert payload["type"] == "job.succeeded"
            assert payload["job"]["name"] == job.name and payload["job"]["state"] == "SUCCEEDED"
            assert payload["job"]["artifact"]["sha256"] == final.artifact.sha256
            assert server.metrics_url is not None
            _, samples = scrape_until(
                server.metrics_url,
                lambda s: sample(s, "tuneforge_webhook_deliveries_total", outcome="delivered") == 1,
                timeout_s=30,
            )
            assert sample(samples, "tuneforge_webhook_deliveries_total", outcome="retried") == 1
    finally:
        assert server.stop() == 0
