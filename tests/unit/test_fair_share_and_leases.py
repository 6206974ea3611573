"""The scheduler's pure parts, with exact outcomes: weighted fair share and wait reasons (server/fair_share.py),
lease expiry and kills (server/leases.py), and the pool's slots (server/worker_slots.py)."""

from __future__ import annotations

from tuneforge.server.auth.access import TenantQuota
from tuneforge.server.fair_share import next_tenant, wait_reason
from tuneforge.server.job_states import JobState
from tuneforge.server.leases import LeaseAction, due, taken_over
from tuneforge.server.records import JobRecord
from tuneforge.server.store.base import QueueHead
from tuneforge.server.worker_slots import WorkerSlot, WorkerSlots
from tuneforge.workers.messages import WorkerReady

QUOTAS = {"a": TenantQuota(weight=2.0), "b": TenantQuota(), "capped": TenantQuota(max_running_jobs=1)}


def head(tenant: str, order: int, priority: int = 0) -> QueueHead:
    return QueueHead(tenant=tenant, priority=priority, order=order, job_id=f"ft-{tenant}-{order}")


def test_the_fewest_running_jobs_per_weight_go_first() -> None:
    heads = [head("a", 5), head("b", 1)]
    assert next_tenant(heads, {"a": 1, "b": 1}, QUOTAS.__getitem__, {}) == "a", "1/2 per weight beats 1/1"
    assert next_tenant(heads, {"a": 2, "b": 0}, QUOTAS.__getitem__, {}) == "b"


def test_ties_go_to_the_least_recently_served_then_priority_then_age() -> None:
    heads = [head("a", 5), head("b", 1)]
    assert next_tenant(heads, {"a": 2, "b": 1}, QUOTAS.__getitem__, {"a": 10.0, "b": 20.0}) == "a"
    assert next_tenant(heads, {}, QUOTAS.__getitem__, {}) == "b", "never served either: the older job"
    assert next_tenant([head("a", 5, priority=3), head("b", 1)], {}, QUOTAS.__getitem__, {}) == "a"


def test_a_tenant_at_its_running_quota_waits_and_none_means_nobody() -> None:
    assert next_tenant([head("capped", 1), head("b", 9)], {"capped": 1, "b": 5}, QUOTAS.__getitem__, {}) == "b"
    assert next_tenant([head("capped", 1)], {"capped": 1}, QUOTAS.__getitem__, {}) is None
    assert next_tenant([], {}, QUOTAS.__getitem__, {}) is None


def test_wait_reasons_in_order_of_what_holds_a_job_back() -> None:
    quota = TenantQuota(max_running_jobs=2)
    assert wait_reason(130.0, 100.0, "t", 0, quota, 1, 1, 2) == "restart back-off: its next attempt may start in 30 s"
    assert wait_reason(None, 100.0, "t", 2, quota, 1, 1, 2) == "tenant t has 2 running jobs, its max_running_jobs quota"
    assert wait_reason(None, 100.0, "t", 1, quota, 3, 0, 2) == (
        "every worker is busy (2 in the pool); 2 of the tenant's jobs are ahead of it"
    )
    assert wait_reason(99.0, 100.0, "t", 1, quota, 1, 1, 2) == "a worker is free: starting"


def busy(last_heard: float, kill_at: float | None = None, lease_expired: bool = False) -> WorkerSlot:
    return WorkerSlot(state="busy", job="j", attempt=1, last_heard=last_heard, kill_at=kill_at,
                      lease_expired=lease_expired)  # fmt: skip


def test_silent_workers_lose_their_lease_and_deaf_ones_are_killed() -> None:
    slots = [
        ("idle", WorkerSlot(state="idle", last_heard=0.0)),
        ("talking", busy(last_heard=99.0)),
        ("silent", busy(last_heard=80.0)),
        ("deaf", busy(last_heard=70.0, kill_at=95.0, lease_expired=True)),
        ("expired, in grace", busy(last_heard=70.0, kill_at=105.0, lease_expired=True)),
    ]
    assert due(slots, now=100.0, lease_timeout_s=10.0) == [
        LeaseAction("silent", kill=False, silent_s=20.0),
        LeaseAction("deaf", kill=True),
    ]


def job(worker: str | None, heartbeat: float | None, start: float | None = 0.0) -> JobRecord:
    return JobRecord(
        id=f"ft-{worker}",
        display_name="",
        spec=b"",
        priority=0,
        state=JobState.RUNNING,
        create_time=0.0,
        update_time=0.0,
        worker=worker,
        heartbeat_time=heartbeat,
        start_time=start,
    )


def test_another_replicas_silent_jobs_are_taken_over() -> None:
    records = [job("r1-worker-0", 50.0), job("r2-worker-0", 95.0), job("r2-worker-1", 50.0), job(None, None)]
    records.append(job("r2-worker-2", None, start=10.0))
    taken = taken_over(records, now=100.0, lease_timeout_s=30.0, owns=lambda w: w.startswith("r1-"))
    assert [(r.worker, silent) for r, silent in taken] == [("r2-worker-1", 50.0), ("r2-worker-2", 90.0)]


def ready(name: str, gpus: int = 0) -> WorkerReady:
    return WorkerReady(worker=name, pid=1, device="cuda:0" if gpus else "cpu", gpus=gpus, host="h")


def test_slots_answer_which_worker_takes_calls_and_how_many_gpus() -> None:
    slots = WorkerSlots(["w-1", "w-0"])
    assert slots.for_calls() is None and slots.gpus_per_worker() is None, "nobody is ready yet"
    assert slots.ready(ready("w-1", gpus=2)) is False, "w-0 is still starting"
    assert slots.for_calls() == "w-1" and slots.gpus_per_worker() is None
    assert slots.ready(ready("w-0", gpus=1)) is True
    assert slots.for_calls() == "w-0" and slots.gpus_per_worker() == 2, "idle ones first, by name"
    for name in ("w-0", "w-1"):
        slot = slots.get(name)
        assert slot is not None
        slot.state, slot.job = "busy", f"job-{name}"
    assert slots.for_calls() == "w-0" and slots.idle() == [], "busy workers answer calls on a side thread"
    slots.freed("w-1")
    freed = slots.get("w-1")
    assert freed is not None and (freed.state, freed.job, freed.gpus, freed.device) == ("idle", None, 2, "cuda:0")
    assert slots.for_calls() == "w-1"
    before = slots.restarting("w-0")
    again = slots.get("w-0")
    assert (
        before.job == "job-w-0" and again is not None and (again.state, again.job, again.gpus) == ("starting", None, 0)
    )
    assert slots.gpus_per_worker() is None, "a restarting worker has not said what it has"
