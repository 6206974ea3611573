"""TLS and mutual TLS against the real server, with certificates made by the test: the right client gets in; a
certificate from another CA, an expired one, none at all, a plaintext client and a client that does not trust the
server are all refused. A client certificate's common name can name the tenant. Plaintext off loopback is refused
unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certificates import Authority, Issued, issue, make_authority
from tuneforge.clients.client import TuneforgeClient, TuneforgeError
from tuneforge.clients.credentials import Credentials
from tuneforge.clients.local_server import LocalServer, start_local_server

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued
    tenant_client: Issued
    expired_client: Issued
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = make_authority(folder, "tuneforge-test-ca"), make_authority(folder, "other-ca")
    return Pki(
        ca,
        other,
        issue(folder, ca, "tuneforge-server", server=True),
        issue(folder, ca, "ci-runner"),
        issue(folder, ca, "trainer.team-b"),
        issue(folder, ca, "ci-runner", expired=True),
        issue(folder, other, "ci-runner"),
    )


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalServer]:
    data = tmp_path_factory.mktemp("mtls-server")
    access = data.parent / "mtls-access.toml"
    access.write_text('[[certificates]]\ncommon_name = "trainer.team-b"\ntenant = "team-b"\n')
    args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca.cert)]
    server = start_local_server(data, workers=0, extra_args=[*args, "--access-file", str(access)])
    yield server
    assert server.stop() == 0


def health(server: LocalServer, credentials: Credentials) -> str:
    with TuneforgeClient(server.target, timeout_s=10, credentials=credentials) as client:
        return client.health()


def test_a_client_certificate_from_the_trusted_ca_gets_in(mtls_server: LocalServer, pki: Pki) -> None:
    good = Credentials(tls_ca=pki.ca.cert, tls_cert=pki.client.cert, tls_key=pki.client.key)
    assert health(mtls_server, good) == "SERVING"


@pytest.mark.parametrize("case", ["other CA", "expired", "no client certificate", "plaintext", "untrusted server"])
def test_everyone_else_is_refused(mtls_server: LocalServer, pki: Pki, case: str) -> None:
    credentials = {
        "other CA": Credentials(tls_ca=pki.ca.cert, tls_cert=pki.stranger.cert, tls_key=pki.stranger.key),
        "expired": Credentials(tls_ca=pki.ca.cert, tls_cert=pki.expired_client.cert, tls_key=pki.expired_client.key),
        "no client certificate": Credentials(tls_ca=pki.ca.cert),
        "plaintext": Credentials(),
        "untrusted server": Credentials(tls_ca=pki.other_ca.cert, tls_cert=pki.client.cert, tls_key=pki.client.key),
    }[case]
    assert health(mtls_server, credentials) == "UNREACHABLE"


def test_a_certificate_named_in_the_access_file_is_its_tenant(mtls_server: LocalServer, pki: Pki) -> None:
    team_b = Credentials(tls_ca=pki.ca.cert, tls_cert=pki.tenant_client.cert, tls_key=pki.tenant_client.key)
    with TuneforgeClient(mtls_server.target, timeout_s=10, credentials=team_b) as client:
        assert client.list_jobs() == []
    unnamed = Credentials(tls_ca=pki.ca.cert, tls_cert=pki.client.cert, tls_key=pki.client.key)
    with (
        TuneforgeClient(mtls_server.target, timeout_s=10, credentials=unnamed) as client,
        pytest.raises(TuneforgeError, match="UNAUTHENTICATED"),
    ):
        client.list_jobs()


def test_tls_without_client_certificates(tmp_path: Path, pki: Pki) -> None:
    args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    server = start_local_server(tmp_path / "data", workers=0, extra_args=args)
    try:
        assert health(server, Credentials(tls_ca=pki.ca.cert)) == "SERVING"
        assert health(server, Credentials()) == "UNREACHABLE"
        command = [sys.executable, "-m", "tuneforge.clients.cli", "--server", server.target, "--timeout", "5", "health"]
        environment = {**os.environ, "TUNEFORGE_TLS_CA": str(pki.ca.cert)}  # as a container's health check runs
        checked = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environment)
        assert (checked.returncode, checked.stdout.strip()) == (0, "SERVING"), checked.stderr
    finally:
        assert server.stop() == 0


def test_plaintext_off_loopback_only_when_asked(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tuneforge.server", "--host", "0.0.0.0", "--port", "0", "--workers", "0"]
    refused = subprocess.run([*command, "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "refusing to serve plaintext on 0.0.0.0" in refused.stderr and "--allow-plaintext" in refused.stderr
    assert not (tmp_path / "d").exists()  # nothing started
