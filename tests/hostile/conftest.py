"""One real server for the hostile battery: several tenants (two users, an admin, and a tenant with tight quotas),
tiny BERT and ViT models under its model root, tight call limits so a lock-out shows with tens of calls, and an
address-space limit on the server and its workers so a memory regression fails here instead of taking the machine
down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import SERVER_ARGS
from tests.media import make_tiny_vit
from tests.tiny import make_tiny_bert
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.local_server import LocalServer, start_local_server
from tuneforge.server.auth.access import token_digest
from tuneforge.workers.core.faults import ENVIRONMENT_VARIABLE

ADDRESS_SPACE_BYTES = 10 << 30
USERS = {"alice": "team-a", "bob": "team-b", "root": "team-ops", "quota": "team-q"}
QUOTAS = """
[tenants.team-q]
max_running_jobs = 0
max_queued_jobs = 1
max_stored_bytes = 10000000
max_upload_bytes = 5000000
max_streams = 4
"""
MAX_TENANT_RPCS = 20
MAX_CONCURRENT_RPCS = 60
IDLE_TIMEOUT_S = 3.0
CRASHING_FILE = "crash.jsonl"
"""A job on a file of this name meets a bug in the worker (injected)."""
UNHARMED_LATENCY_S = 2.0
"""Another tenant's call during an attack: milliseconds normally; a lock-out fails or hangs."""


def token_of(user: str) -> str:
    """Secret tokens, distinct from the names the audit log shows: the log must never hold one."""
    return f"tok-{user}-5e3d9b1c"


def access_file(path: Path) -> Path:
    entries = "".join(
        f'[[tokens]]\nname = "{user}"\nsha256 = "{token_digest(token_of(user))}"\ntenant = "{tenant}"\n'
        + ('role = "admin"\n' if user == "root" else "")
        for user, tenant in USERS.items()
    )
    path.write_text(entries + QUOTAS)
    return path


@dataclass
class Battery:
    server: LocalServer
    models: Path
    log: Path


def as_user(battery: Battery | LocalServer, user: str, timeout_s: float = 30) -> TuneforgeClient:
    server = battery.server if isinstance(battery, Battery) else battery
    return TuneforgeClient(server.target, timeout_s=timeout_s, credentials=Credentials(token=token_of(user)))


def assert_others_unharmed(battery: Battery) -> None:
    """The health check answers SERVING, and another tenant's ordinary call answers quickly."""
    with as_user(battery, "bob", timeout_s=10) as bob:
        assert bob.health() == "SERVING"
        began = time.perf_counter()
        bob.list_files()
        assert time.perf_counter() - began < UNHARMED_LATENCY_S


@pytest.fixture(scope="package")
def battery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Battery]:
    models = tmp_path_factory.mktemp("hostile-models")
    make_tiny_bert(models / "tiny-bert", dropout=0.0)
    make_tiny_vit(models / "tiny-vit")
    data = tmp_path_factory.mktemp("hostile-data")
    log = data.parent / "hostile-server.log"
    args = [
        *SERVER_ARGS,
        "--log-level",
        "INFO",
        "--access-file",
        str(access_file(data.parent / "hostile-access.toml")),
        "--max-concurrent-rpcs",
        str(MAX_CONCURRENT_RPCS),
        "--max-tenant-rpcs",
        str(MAX_TENANT_RPCS),
        "--upload-idle-timeout-s",
        str(IDLE_TIMEOUT_S),
        "--worker-memory-mb",
        "4096",
        "--webhook-max-attempts",
        "1",
    ]
    cwd = tmp_path_factory.mktemp("hostile-cwd")  # the server's working directory, where a "hub id" may lie
    (cwd / "outside" / "evil").mkdir(parents=True)
    (cwd / "outside" / "evil" / "config.json").write_text('{"auto_map": {}}')
    server = start_local_server(
        data,
        workers=1,
        model_roots=[models],
        extra_args=args,
        log_path=log,
        address_space_bytes=ADDRESS_SPACE_BYTES,
        cwd=cwd,
        env={ENVIRONMENT_VARIABLE: json.dumps({"raise_when_training_file": CRASHING_FILE})},
    )
    try:
        with as_user(server, "bob") as bob:
            bob.wait_until_serving(120)
        yield Battery(server, models, log)
    finally:
        assert server.stop() == 0
    text = log.read_text()
    for user in USERS:
        assert token_of(user) not in text, "a secret token reached the log"
    assert "created in a different Context" not in text
