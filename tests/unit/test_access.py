"""The access file (tokens, certificate names, quotas) and the transport settings, each mistake named."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tuneforge.server.auth.access import AccessFile, AccessFileError, TenantQuota, parse_access, token_digest
from tuneforge.server.auth.caller import Caller, Role
from tuneforge.server.auth.interceptor import authenticate
from tuneforge.server.errors import ApiError
from tuneforge.server.settings import ServerSettings
from tuneforge.server.transport import TransportError, is_loopback, server_credentials

GOOD = f"""
[[tokens]]
name = "ci"
sha256 = "{token_digest("s3cret")}"
tenant = "team-a"

[[tokens]]
sha256 = "{token_digest("root-token")}"
tenant = "ops"
role = "admin"

[[certificates]]
common_name = "trainer.team-b"
tenant = "team-b"

[default_quota]
max_running_jobs = 2

[tenants.team-a]
weight = 3
max_queued_jobs = 10
"""


def test_tokens_certificates_and_quotas() -> None:
    config = parse_access(GOOD)
    assert config.caller_for_token("s3cret") == Caller("team-a", Role.USER, "ci")
    assert (
        config.caller_for_token("root-token") is not None and config.caller_for_token("root-token").role is Role.ADMIN
    )
    assert config.caller_for_token("S3CRET") is None
    assert config.quota("team-a") == TenantQuota(max_running_jobs=2, max_queued_jobs=10, weight=3.0)
    assert config.quota("anyone") == TenantQuota(max_running_jobs=2)
    assert authenticate(config, {"authorization": "Bearer s3cret"}, {}).tenant == "team-a"
    assert authenticate(config, {}, {"x509_common_name": [b"trainer.team-b"]}).tenant == "team-b"
    for metadata, context, reason in [
        ({}, {}, "MISSING_CREDENTIALS"),
        ({"authorization": "Basic abc"}, {}, "MALFORMED_CREDENTIALS"),
        ({"authorization": "Bearer nope"}, {"x509_common_name": [b"trainer.team-b"]}, "INVALID_TOKEN"),
        ({}, {"x509_common_name": [b"someone.else"]}, "MISSING_CREDENTIALS"),
    ]:
        with pytest.raises(ApiError) as refused:
            authenticate(config, metadata, context)
        assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tokens]]\nsha256 = "s3cret"\ntenant = "a"', "tokens[0].sha256: must be 64 hex digits"),
        (f'[[tokens]]\nsha256 = "{"a" * 64}"', "tokens[0]: `tenant` must be"),
        (f'[[tokens]]\nsha256 = "{"a" * 64}"\ntenant = "a"\nrole = "root"', "`role` must be user or admin"),
        ("[tenants.a]\nmax_jobs = 3", "tenants.a: unknown quota max_jobs"),
        ("[default_quota]\nmax_streams = -1", "default_quota.max_streams: must be a number >= 0"),
        ("[tenants.a]\nweight = 0", "tenants.a.weight: must be above 0"),
        ("[[tokens]\n", "not valid TOML"),
    ],
)
def test_mistakes_are_named(text: str, message: str) -> None:
    with pytest.raises(AccessFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_access(text)


def test_the_file_is_read_again_when_it_changes_and_a_broken_edit_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "access.toml"
    path.write_text(GOOD)
    access = AccessFile(path)
    access.CHECK_EVERY_S = 0.0  # check at every call
    assert access.config.caller_for_token("s3cret") is not None
    path.write_text(f'[[tokens]]\nsha256 = "{token_digest("new")}"\ntenant = "team-c"\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    assert access.config.caller_for_token("s3cret") is None  # revoked
    assert access.config.caller_for_token("new") == Caller("team-c", Role.USER, f"token {token_digest('new')[:8]}")
    path.write_text("[[tokens]\n")
    assert access.config.caller_for_token("new") is not None  # the broken edit is not in force
    with pytest.raises(AccessFileError):
        AccessFile(path)  # but a server does not start on it


def test_transport_settings(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    assert server_credentials(ServerSettings(tmp_path)) is None  # plaintext on loopback
    assert server_credentials(ServerSettings(tmp_path, host="0.0.0.0", allow_plaintext=True)) is None
    for settings, message in [
        (ServerSettings(tmp_path, host="0.0.0.0"), "refusing to serve plaintext"),
        (ServerSettings(tmp_path, tls_cert=tmp_path / "c.pem"), "go together"),
        (ServerSettings(tmp_path, tls_client_ca=tmp_path / "ca.pem"), "needs --tls-cert"),
    ]:
        with pytest.raises(TransportError, match=message):
            server_credentials(settings)


def test_tenant_webhooks() -> None:
    config = parse_access('[webhooks]\nteam-a = ["https://hooks.example/a", "http://10.1.2.3/b"]\n')
    assert config.webhooks == {"team-a": ("https://hooks.example/a", "http://10.1.2.3/b")}
    with pytest.raises(AccessFileError, match=r"webhooks\.team-b: must be a list of http"):
        parse_access('[webhooks]\nteam-b = "ftp://x"\n')
