"""Whose queued job starts next, and why a queued job waits: weighted fair share between tenants, as pure
functions of what the store says (the queue's heads, running jobs per tenant) and the quotas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tuneforge.server.auth.access import QuotaLookup, TenantQuota
from tuneforge.server.store.base import QueueHead


def next_tenant(
    heads: Sequence[QueueHead], running: Mapping[str, int], quotas: QuotaLookup, last_served: Mapping[str, float]
) -> str | None:
    """The tenant with the fewest running jobs per unit of weight, among those with a claimable job and under their
    running-jobs quota; ties go to the tenant served least recently, then to the higher priority, then to the older
    job. None when no tenant may start a job now."""
    turns = []
    for head in heads:
        quota = quotas(head.tenant)
        active = running.get(head.tenant, 0)
        if active < quota.max_running_jobs:
            served = last_served.get(head.tenant, float("-inf"))
            turns.append((active / quota.weight, served, -head.priority, head.order, head.tenant))
    return min(turns)[-1] if turns else None


def wait_reason(
    not_before: float | None,
    now: float,
    tenant: str,
    running: int,
    quota: TenantQuota,
    position: int,
    idle_workers: int,
    pool_size: int,
) -> str:
    """Why a QUEUED job has not started yet, in words: its restart back-off, its tenant's quota, busy workers, or
    nothing (it is about to start)."""
    if not_before is not None and not_before > now:
        return f"restart back-off: its next attempt may start in {not_before - now:.0f} s"
    if running >= quota.max_running_jobs:
        return f"tenant {tenant} has {running} running jobs, its max_running_jobs quota"
    ahead = f"; {position - 1} of the tenant's jobs are ahead of it" if position > 1 else ""
    if not idle_workers:
        return f"every worker is busy ({pool_size} in the pool){ahead}"
    return f"a worker is free: starting{ahead}"
