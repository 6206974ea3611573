"""The access file (`--access-file`, TOML): hashed bearer tokens, client-certificate names, and tenant quotas.

Only SHA-256 digests of tokens are stored, so the file leaks no credential. The file is read again when it changes
(checked at most once a second); a broken edit keeps the last good version in force and says why in the log.

    [[tokens]]
    name = "team-a-ci"            # shown in the audit log
    sha256 = "9f86d0..."          # `tuneforge new-token` prints a token and this line
    tenant = "team-a"
    role = "user"                 # or "admin"

    [[certificates]]              # with --tls-client-ca: a client certificate's common name names its tenant
    common_name = "trainer.team-b.svc"
    tenant = "team-b"

    [default_quota]               # every tenant's limits unless [tenants.NAME] says otherwise
    max_running_jobs = 4
    [tenants.team-a]
    weight = 2                    # fair share: team-a gets twice team-b's workers when both wait

    [webhooks]                    # called when any of the tenant's jobs ends (besides the job's own)
    team-a = ["https://hooks.team-a.example/tuneforge"]
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tuneforge.server.auth.caller import Caller, Role
from tuneforge.server.settings import SettingsError

log = logging.getLogger(__name__)
UNLIMITED = 2**62


@dataclass(frozen=True)
class TenantQuota:
    """One tenant's limits and share. Every limit defaults to none."""

    max_running_jobs: int = UNLIMITED
    max_queued_jobs: int = UNLIMITED
    max_stored_bytes: int = UNLIMITED
    """Uploaded files plus finished artifacts."""
    max_upload_bytes: int = UNLIMITED
    max_gpus_per_job: int = UNLIMITED
    max_streams: int = UNLIMITED
    """Concurrent streaming calls: watches, downloads and uploads."""
    weight: float = 1.0
    """Fair-share weight when tenants compete for workers."""


QUOTA_FIELDS = {f.name for f in fields(TenantQuota)}


@dataclass(frozen=True)
class AccessConfig:
    """What one version of the access file says."""

    tokens: dict[str, Caller] = field(default_factory=dict)
    """By SHA-256 hex digest of the token."""
    certificates: dict[str, Caller] = field(default_factory=dict)
    """By certificate common name."""
    default_quota: TenantQuota = field(default_factory=TenantQuota)
    quotas: dict[str, TenantQuota] = field(default_factory=dict)
    webhooks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Tenant -> URLs called when any of its jobs ends."""

    def quota(self, tenant: str) -> TenantQuota:
        return self.quotas.get(tenant, self.default_quota)

    def caller_for_token(self, token: str) -> Caller | None:
        return self.tokens.get(hashlib.sha256(token.encode()).hexdigest())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AccessFileError(SettingsError):
    """The access file says something that cannot be used; the message names where."""


def _caller(entry: dict[str, Any], where: str, subject: str) -> Caller:
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant or "/" in tenant:
        raise AccessFileError(f"{where}: `tenant` must be a non-empty name without '/'")
    try:
        role = Role(entry.get("role", "user"))
    except ValueError:
        raise AccessFileError(f"{where}: `role` must be user or admin") from None
    return Caller(tenant, role, subject)


def _quota(values: dict[str, Any], base: TenantQuota, where: str) -> TenantQuota:
    unknown = set(values) - QUOTA_FIELDS
    if unknown:
        raise AccessFileError(f"{where}: unknown quota {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise AccessFileError(f"{where}.{name}: must be a number >= 0")
    if values.get("weight", 1) <= 0:
        raise AccessFileError(f"{where}.weight: must be above 0")
    converted: dict[str, Any] = {k: (float(v) if k == "weight" else int(v)) for k, v in values.items()}
    return replace(base, **converted)


def parse_access(text: str) -> AccessConfig:
    """Parses and checks the whole file; AccessFileError names the first problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccessFileError(f"not valid TOML: {exc}") from None
    tokens = {}
    for i, entry in enumerate(data.get("tokens", [])):
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AccessFileError(f"tokens[{i}].sha256: must be 64 hex digits (the token's SHA-256, not the token)")
        tokens[digest] = _caller(entry, f"tokens[{i}]", str(entry.get("name", f"token {digest[:8]}")))
    certificates = {}
    for i, entry in enumerate(data.get("certificates", [])):
        name = entry.get("common_name")
        if not isinstance(name, str) or not name:
            raise AccessFileError(f"certificates[{i}].common_name: required")
        certificates[name] = _caller(entry, f"certificates[{i}]", f"certificate {name}")
    default = _quota(data.get("default_quota", {}), TenantQuota(), "default_quota")
    quotas = {name: _quota(values, default, f"tenants.{name}") for name, values in data.get("tenants", {}).items()}
    webhooks = {}
    for tenant, urls in data.get("webhooks", {}).items():
        good = isinstance(urls, list) and all(
            isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls
        )
        if not good:
            raise AccessFileError(f"webhooks.{tenant}: must be a list of http(s) URLs")
        webhooks[tenant] = tuple(urls)
    return AccessConfig(tokens, certificates, default, quotas, webhooks)


class AccessFile:
    """The access file as it is now: re-read when its size, time or inode changes."""

    CHECK_EVERY_S = 1.0

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._config = self._load()  # a bad file at start is fatal: AccessFileError propagates

    def _stat(self) -> tuple[int, int, int]:
        status = os.stat(self._path)
        return status.st_mtime_ns, status.st_size, status.st_ino

    def _load(self) -> AccessConfig:
        self._signature = self._stat()  # first: a broken version is reported once, not at every check
        return parse_access(self._path.read_text())

    @property
    def config(self) -> AccessConfig:
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY_S:
            return self._config
        with self._lock:
            self._checked = now
            try:
                if self._stat() != self._signature:
                    self._config = self._load()
                    log.info("access file %s reloaded: %d tokens", self._path, len(self._config.tokens))
            except (OSError, AccessFileError) as exc:
                log.error("access file %s not reloaded, the previous version stays in force: %s", self._path, exc)
            return self._config


QuotaLookup = Callable[[str], TenantQuota]
"""A tenant's quota as the access file says now."""


def no_quotas(tenant: str) -> TenantQuota:
    """Authentication off: no limits."""
    return TenantQuota()


def webhooks_of(access: AccessFile | None) -> Callable[[str], tuple[str, ...]]:
    """A tenant's webhooks as the access file says now (none without one)."""
    if access is None:
        return lambda tenant: ()
    return lambda tenant: access.config.webhooks.get(tenant, ())


def quotas_of(access: AccessFile | None) -> QuotaLookup:
    if access is None:
        return no_quotas
    return lambda tenant: access.config.quota(tenant)
