"""Webhooks through the real server: a job's end arrives signed (HMAC-SHA256 over the timestamp and body, recomputed
here), with the job in the payload; a 5xx is retried with the same event, a 4xx is given up at once, a receiver that
never answers well is given up after the last attempt; the tenant's webhooks from the access file hear every job,
failed ones too; and the delivery counters agree with what the receivers got."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, Samples, long_spec, sample, scrape_until, text_spec, wait_for_end
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.local_server import start_local_server
from tuneforge.server.auth.access import token_digest
from tuneforge.server.webhooks import SIGNATURE_HEADER
from tuneforge.v1 import jobs_pb2

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
def receivers() -> Iterator[Callable[[list[int]], Receiver]]:
    """Starts receivers answering the given statuses in turn (then 200), and stops them all afterwards."""
    started: list[tuple[Receiver, threading.Thread]] = []

    def start(statuses: list[int]) -> Receiver:
        server = Receiver(statuses)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join()


def drained(receiver: Receiver) -> list[tuple[dict[str, str], bytes, int]]:
    requests = []
    while not receiver.received.empty():
        requests.append(receiver.received.get_nowait())
    return requests


def test_deliveries_are_signed_retried_given_up_and_counted(
    receivers: Callable[[list[int]], Receiver],
    tmp_path: Path,
    model_root: Path,
    tiny_bert: Path,
    keyword_dataset: Path,
) -> None:
    """A job that succeeds (its receiver answers 500, then 200) and a job that fails (one receiver answers 404, one
    503 every time), with the tenant's own receiver from the access file hearing about both. Each receiver gets
    exactly the requests the retry rules say; the counters agree."""
    flaky, tenant, gone, down = receivers([500]), receivers([]), receivers([404]), receivers([503, 503, 503])
    secret_file = tmp_path / "webhook.key"
    secret_file.write_text(SECRET)
    access = tmp_path / "access.toml"
    access.write_text(
        f'[[tokens]]\nname = "alice"\nsha256 = "{token_digest("alice-secret")}"\ntenant = "team-a"\nrole = "user"\n'
        f'[webhooks]\nteam-a = ["{tenant.url}"]\n'
    )
    args = [*SERVER_ARGS, "--webhook-secret-file", str(secret_file), "--webhook-allow-private"]
    args += ["--webhook-backoff-s", "0.05", "--webhook-max-attempts", "3", "--access-file", str(access)]
    server = start_local_server(tmp_path / "data", workers=1, model_roots=[model_root], extra_args=args)
    try:
        with TuneforgeClient(server.target, timeout_s=30, credentials=Credentials(token="alice-secret")) as client:
            client.wait_until_serving(120)
            file = client.upload_file(keyword_dataset).name
            succeeding = text_spec(tiny_bert, file, epochs=1)
            succeeding.notifications.webhook_urls.append(flaky.url)
            failing = long_spec(tiny_bert, file)
            failing.resources.max_runtime.seconds = 1
            failing.notifications.webhook_urls.extend([gone.url, down.url])
            succeeded = wait_for_end(client, client.create_job(succeeding).name)
            failed = wait_for_end(client, client.create_job(failing).name)
            assert (succeeded.state, failed.state) == (STATE.SUCCEEDED, STATE.FAILED)
            assert server.metrics_url is not None
            expected = {"delivered": 3, "retried": 3, "failed": 2, "refused": 0}  # see each receiver below

            def counted(samples: Samples) -> dict[str, float]:
                return {o: sample(samples, "tuneforge_webhook_deliveries_total", outcome=o) for o in expected}

            _, samples = scrape_until(server.metrics_url, lambda s: counted(s) == expected, timeout_s=60)
            assert counted(samples) == expected
    finally:
        assert server.stop() == 0

    requests = {name: drained(r) for name, r in (("flaky", flaky), ("tenant", tenant), ("gone", gone), ("down", down))}
    seen = {
        name: [(h["Tuneforge-Event"], h["Tuneforge-Delivery-Attempt"], status) for h, _, status in got]
        for name, got in requests.items()
    }
    assert seen["flaky"] == [("job.succeeded", "1", 500), ("job.succeeded", "2", 200)]
    assert sorted(seen["tenant"]) == [("job.failed", "1", 200), ("job.succeeded", "1", 200)]
    assert seen["gone"] == [("job.failed", "1", 404)], "a 4xx is not retried"
    assert seen["down"] == [("job.failed", str(n), 503) for n in (1, 2, 3)], "three attempts, then given up"
    for name, got in requests.items():
        for headers, body, _ in got:
            assert signed_by(SECRET.encode(), headers[SIGNATURE_HEADER], body), name
            assert not signed_by(b"another secret of thirty-two chars!", headers[SIGNATURE_HEADER], body), name
            payload = json.loads(body)
            assert payload["id"] == headers["Tuneforge-Event-Id"] and payload["type"] == headers["Tuneforge-Event"]
            job = succeeded if payload["type"] == "job.succeeded" else failed
            assert payload["job"]["name"] == job.name
            assert payload["job"]["state"] == jobs_pb2.Job.State.Name(job.state)
        bodies = {h["Tuneforge-Event-Id"]: body for h, body, _ in got}
        assert len(bodies) == len({body for _, body, _ in got}), f"{name}: a retry resends its event's very body"
    assert [len({h["Tuneforge-Event-Id"] for h, _, _ in requests[name]}) for name in ("flaky", "down")] == [1, 1]
    assert json.loads(requests["flaky"][1][1])["job"]["artifact"]["sha256"] == succeeded.artifact.sha256
    assert json.loads(requests["down"][0][1])["job"]["error"]["reason"] == "DEADLINE_EXCEEDED"
