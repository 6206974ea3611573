"""The sweep controller: asks Optuna for points, runs each as an ordinary job, feeds the job's evaluations back to
the pruner, cancels pruned trials, and ends the sweep with its best trial.

The sweep record in the store is the truth: every trial's parameters and reported values are written there before
anything acts on them, and a restarted server rebuilds each running sweep's Optuna study from it (finished trials
added as they ended, running ones asked again with their parameters and their reports replayed). Trial jobs are
created with a request id derived from the sweep and trial number, so a crash between recording a trial and creating
its job never makes two jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from tuneforge.server import sweep_convert
from tuneforge.server.auth.access import UNLIMITED, QuotaLookup, no_quotas
from tuneforge.server.bounded import bounded
from tuneforge.server.db import StoreRunner
from tuneforge.server.errors import ApiError
from tuneforge.server.event_hub import EventHub
from tuneforge.server.job_factory import JobFactory
from tuneforge.server.job_files import missing_files
from tuneforge.server.job_states import TERMINAL, IllegalTransition, JobState
from tuneforge.server.memory_estimate import memory_problem
from tuneforge.server.names import new_id
from tuneforge.server.records import DEFAULT_TENANT, EventRecord, JobRecord, NewEvent
from tuneforge.server.scheduler import Scheduler
from tuneforge.server.search_space import SearchPlan, make_pruner, make_sampler, plan_search, trial_spec
from tuneforge.server.spec_validation import validate_spec
from tuneforge.server.store.base import JobStore
from tuneforge.server.sweep_records import SWEEP_TERMINAL, SweepRecord, SweepState, TrialRecord, TrialState
from tuneforge.v1 import job_spec_pb2, jobs_pb2, sweeps_pb2
from tuneforge.workers.spec import TrainingSpec

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class LiveSweep:
    """A running sweep's Optuna study and the Optuna trial behind each of its running trials."""

    plan: SearchPlan
    base: job_spec_pb2.JobSpec
    study: optuna.Study
    running: dict[int, optuna.trial.Trial] = field(default_factory=dict)
    parked: optuna.trial.Trial | None = None
    """A point asked for but not started because the tenant's queued-jobs quota was full: started first next time."""
    read: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per trial job: the last event sequence read from the store, and how many evaluations that included."""


class LostLease(Exception):
    """Another replica drives this sweep now: this one lets it go."""


class SweepController:
    """Drives running sweeps: asks Optuna for points, starts their jobs, reads the jobs' evaluations and ends from
    the store, prunes, and ends the sweep. All changes go through one lock, on the event loop.

    With replicas, exactly one replica drives a sweep at a time: it holds the sweep's lease (`driver` and
    `driver_heartbeat` in the store), renews it every third of a lease, and every change it makes is fenced on still
    holding it. A replica that stops renewing loses the sweep to the next that finds the lease expired, which
    rebuilds the study from the stored trials and goes on; trial outcomes come from the store, so it does not matter
    which replica's workers ran them."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        scheduler: Scheduler,
        jobs: JobFactory,
        hub: EventHub,
        model_roots: list[Path],
        quotas: QuotaLookup = no_quotas,
        replica: str = "",
        lease_timeout_s: float = 30.0,
    ):
        self._quotas = quotas
        self._replica, self._lease_timeout_s = replica, lease_timeout_s
        self._store, self._db, self._scheduler, self._jobs, self._hub = store, db, scheduler, jobs, hub
        self._model_roots = model_roots
        self._live: dict[str, LiveSweep] = {}
        self._waiting: dict[str, str] = {}
        """Sweeps held back by their tenant's queued-jobs quota, to the tenant: any of its jobs starting frees room."""
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Takes up every running sweep no other replica drives, and starts following them."""
        self._scheduler.add_listener(self._job_changed)
        async with self._lock:
            await self._claim_free_sweeps()
        self._driver = asyncio.create_task(self._drive(), name="sweeps")

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()

    @property
    def _tick_s(self) -> float:
        """How often running sweeps are read from the store even without a wake-up (and their leases renewed)."""
        return max(0.2, min(2.0, self._lease_timeout_s / 3))

    # ------------------------------------------------------------ API-facing actions

    async def plan(self, spec: sweeps_pb2.SweepSpec) -> tuple[SearchPlan | None, list[Any]]:
        """Checks the spec (validating each probe point reads model folders: off the event loop)."""
        return await asyncio.to_thread(plan_search, spec, self._model_roots)

    async def create(
        self, sweep: sweeps_pb2.Sweep, plan: SearchPlan, request_id: str | None, tenant: str = DEFAULT_TENANT
    ) -> SweepRecord:
        live = await asyncio.to_thread(self._new_live, sweep.spec, plan)  # built before anything is stored
        now = time.time()
        record = SweepRecord(
            id=new_id("sw"),
            display_name=sweep.display_name,
            spec=sweep.spec.SerializeToString(),
            state=SweepState.RUNNING,
            create_time=now,
            update_time=now,
            tenant=tenant,
            driver=self._replica,
            driver_heartbeat=now,
        )
        stored, created = await self._db.call(
            self._store.create_sweep, record, [sweep_convert.state_event(None, SweepState.RUNNING)], request_id
        )
        if created:
            async with self._lock:
                self._live[stored.id] = live
                await self._fill(stored.id)
            self._hub.publish(stored.id, [], ended=False)
        return await self._get(stored.id)

    async def cancel(self, sweep_id: str) -> SweepRecord | None:
        """Cancels the sweep and its running trials (IllegalTransition when it already ended)."""
        async with self._lock:
            record = await self._db.call(self._store.get_sweep, sweep_id)
            if record is None:
                return None
            if record.state in SWEEP_TERMINAL:
                raise IllegalTransition(record.state, SweepState.CANCELLED, "sweep")
            self._forget(sweep_id)
            cancelled = _ended(SweepState.CANCELLED, "CANCELLED", "the sweep was cancelled")
            updated = await self._update(sweep_id, cancelled, fenced=False)  # any replica may cancel
            await self._cancel_running_jobs(record)
            return updated

    # ------------------------------------------------------------ following trials through the store

    def _job_changed(self, record: JobRecord, events: list[EventRecord]) -> None:
        """A job changed on this replica: a hint to read the store now rather than at the next tick (the store is
        what counts, so trials that run on other replicas are followed all the same). Only what a sweep acts on
        wakes it: a trial's evaluation or change of state, or a waiting tenant's job leaving the queue; training
        progress, the bulk of the events, does not."""
        kinds = {event.kind for event in events}
        trial = record.sweep_id in self._live and bool(kinds & {"evaluation_metrics", "state_change"})
        room = record.tenant in self._waiting.values() and "state_change" in kinds
        if trial or room:
            self._wake.set()

    async def _drive(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._tick_s)  # a wake-up or the tick, whichever first
            self._wake.clear()
            try:
                async with self._lock:
                    await self._claim_free_sweeps()
                    for sweep_id in list(self._live):
                        try:
                            await self._sync(sweep_id)
                        except LostLease:
                            log.warning("sweep %s: another replica drives it now", sweep_id)
                            self._forget(sweep_id)
            except Exception:  # one bad read must not stop the sweeps
                log.exception("sweeps: a pass over the running sweeps failed")

    async def _sync(self, sweep_id: str) -> None:
        """Renews the lease, applies what the store says about each running trial's job (new evaluations, its
        end), then starts trials while there is room."""
        live = self._live.get(sweep_id)
        if live is None:
            return
        sweep = await self._update(sweep_id, self._renew)
        if sweep.state is not SweepState.RUNNING:
            self._forget(sweep_id)
            return
        for trial in sweep.trials:
            if trial.state is TrialState.RUNNING and trial.job_id:
                await self._follow(trial.job_id, live)
        await self._fill(sweep_id)

    async def _follow(self, job_id: str, live: LiveSweep) -> None:
        """Reads a trial job's events past those already read: each evaluation counts once (by its place among the
        job's evaluations, so a replica taking over repeats none), then the job's end."""
        job = await self._db.call(self._store.get_job, job_id)  # read before its events: an end has them all
        if job is None:
            return
        after, evaluations = live.read.get(job_id, (0, 0))
        while True:
            events = await self._db.call(self._store.list_events, job_id, after, 500)
            for event in events:
                after = event.sequence
                if event.kind != "evaluation_metrics":
                    continue
                evaluations += 1
                metrics = jobs_pb2.JobEvent.FromString(event.payload).evaluation_metrics.metrics
                await self._report(job, live, metrics, evaluations)
            live.read[job_id] = (after, evaluations)
            if len(events) < 500:
                break
        if job.state in TERMINAL:
            await self._trial_ended(job, live)

    def _renew(self, current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]] | None:
        """The lease renewed, at most twice a tick (a pass may run at every trial's evaluation)."""
        if current.state is not SweepState.RUNNING or time.time() - current.driver_heartbeat < self._tick_s / 2:
            return None
        return self._held(current), []

    def _held(self, current: SweepRecord) -> SweepRecord:
        """The sweep with this replica's lease on it, from now."""
        return replace(current, driver=self._replica, driver_heartbeat=time.time())

    def _claimable(self, record: SweepRecord) -> bool:
        expired = record.driver_heartbeat < time.time() - self._lease_timeout_s
        return not self._replica or record.driver in ("", self._replica) or expired

    async def _claim_free_sweeps(self) -> None:
        """Takes up running sweeps nobody drives: every one at a start without replicas, else those whose driver's
        lease expired (or that name this replica, after its restart). The claim is one store transaction, so two
        replicas never both win it."""
        for record in await self._db.call(self._store.sweeps_in_states, [SweepState.RUNNING]):
            if record.id in self._live or not self._claimable(record):
                continue
            claimed = await self._claim(record.id)
            if claimed is None:
                continue
            if record.driver and record.driver != self._replica:
                log.warning("sweep %s: %s stopped renewing its lease; %s drives it now", record.id, record.driver,
                            self._replica)  # fmt: skip
            try:
                await self._restore(claimed)
            except Exception as exc:  # one sweep that cannot be rebuilt ends; the server and the others go on
                log.exception("could not restore sweep %s", record.id)
                await self._fail_unrestorable(record, exc)

    async def _claim(self, sweep_id: str) -> SweepRecord | None:
        """The sweep with this replica's lease on it, if it is still running and claimable; None otherwise."""
        won: list[SweepRecord] = []

        def claim(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]] | None:
            won.clear()  # the last call counts: the store may run it again
            if current.state is not SweepState.RUNNING or not self._claimable(current):
                return None
            won.append(self._held(current))
            return won[0], []

        claimed = await self._db.call(self._store.update_sweep, sweep_id, claim)
        return claimed[0] if claimed is not None and won else None

    async def _report(self, job: JobRecord, live: LiveSweep, metrics: Any, index: int) -> None:
        """The job's `index`-th evaluation: recorded, told to the pruner, and the trial cancelled if the pruner says
        so. An evaluation already recorded (read again after a takeover) changes nothing."""
        optuna_trial = live.running.get(job.trial_number)
        if optuna_trial is None or live.plan.metric not in metrics:
            return
        value = float(metrics[live.plan.metric])
        sweep = await self._get(job.sweep_id)
        trial = sweep.trials[job.trial_number]
        if trial.state is not TrialState.RUNNING or trial.pruning or (trial.reports and index <= trial.reports[-1][0]):
            return
        try:
            optuna_trial.report(value, index)
            prune = bool(optuna_trial.should_prune())  # pruners may answer with a numpy bool, which JSON refuses
        except Exception:  # the report is still recorded; the trial just is not pruned
            log.exception("sweep %s: the pruner failed on trial %d", job.sweep_id, trial.number)
            prune = False
        updated = replace(trial, reports=[*trial.reports, (index, value)], pruning=prune)
        await self._update(job.sweep_id, _replace_trial(updated, []))
        if prune:
            log.info("sweep %s: pruning trial %d at evaluation %d", job.sweep_id, trial.number, index)
            await self._cancel_job(job.id)

    async def _trial_ended(self, job: JobRecord, live: LiveSweep) -> None:
        optuna_trial = live.running.pop(job.trial_number, None)
        sweep = await self._get(job.sweep_id)
        trial = sweep.trials[job.trial_number]
        if optuna_trial is None or trial.state is not TrialState.RUNNING:
            return
        value = job.artifact_metrics.get(live.plan.metric)
        if job.state is JobState.SUCCEEDED and value is not None:
            _tell(live, optuna_trial, values=float(value))
            ended = replace(trial, state=TrialState.COMPLETE, value=float(value))
        elif trial.pruning:
            _tell(live, optuna_trial, state=optuna.trial.TrialState.PRUNED)
            ended = replace(trial, state=TrialState.PRUNED)
        else:
            _tell(live, optuna_trial, state=optuna.trial.TrialState.FAIL)
            reason = job.error_reason or job.state.value
            ended = replace(trial, state=TrialState.FAILED, error_reason=reason, error_message=job.error_message)
        seconds = job.run_seconds

        def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
            record, events = _replace_trial(ended, [sweep_convert.trial_event(ended)])(current)
            record = replace(record, worker_seconds=current.worker_seconds + seconds)
            if ended.state is TrialState.COMPLETE and _better(ended, record, live.plan.maximize):
                record = replace(record, best_trial=ended.number)
                events.append(sweep_convert.best_trial_event(ended))
            return record, events

        await self._update(job.sweep_id, change)

    # ------------------------------------------------------------ starting trials and ending the sweep

    async def _fill(self, sweep_id: str) -> None:
        """Starts trials until `parallelism` run, `max_trials` started or the budget is spent; ends the sweep when
        nothing runs and nothing more will start."""
        live = self._live.get(sweep_id)
        if live is None:
            return
        plan = live.plan
        sweep = await self._get(sweep_id)
        self._waiting.pop(sweep_id, None)
        while sweep.state is SweepState.RUNNING:
            running = sum(t.state is TrialState.RUNNING for t in sweep.trials)
            can_start = len(sweep.trials) < plan.max_trials and not await self._budget_spent(sweep, plan)
            if can_start and running < plan.parallelism:
                started = await self._start_trial(sweep, live)
                if started is None:  # the tenant's queued-jobs quota is full: wait for one of its jobs to start
                    self._waiting[sweep_id] = sweep.tenant
                    return
                sweep = started
                continue
            if running == 0:
                await self._finish(sweep)
            return

    async def _start_trial(self, sweep: SweepRecord, live: LiveSweep) -> SweepRecord | None:
        """Asks for the next point and starts its job; None (the point kept for later) when the tenant has no room
        for another queued job."""
        number = len(sweep.trials)
        optuna_trial = live.parked or live.study.ask(live.plan.distributions)
        live.parked = None
        params = dict(optuna_trial.params)
        spec = trial_spec(live.base, params, live.plan.metric)
        result = await asyncio.to_thread(validate_spec, spec, self._model_roots)
        problems = [f"{v.field}: {v.description}" for v in result.violations]
        missing = await missing_files(self._store, self._db, spec, "job.spec", sweep.tenant)  # a file parameter
        problems += [f"{v.field}: {v.description}" for v in missing]  # may only name the tenant's own files
        if result.spec is not None:
            too_big = await asyncio.to_thread(memory_problem, result.spec, self._scheduler.worker_memory_bytes)
            if too_big is not None:
                estimate, limit = too_big
                problems.append(estimate.refusal(limit))
        if problems:
            _tell(live, optuna_trial, state=optuna.trial.TrialState.FAIL)
            message = bounded("; ".join(problems))
            failed = TrialRecord(number, "", params, TrialState.FAILED, None, [], False, "INVALID_INPUT", message)
            return await self._update(sweep.id, _append_trial(failed))
        if await self._queue_full(sweep.tenant):
            live.parked = optuna_trial
            return None
        trial = TrialRecord(number, new_id("ft"), params)
        recorded = await self._update(sweep.id, _append_trial(trial))  # recorded before the job exists
        live.running[number] = optuna_trial
        try:
            await self._create_job(sweep, trial, spec, result.spec)
        except ApiError as error:
            if error.reason != "QUOTA_EXCEEDED":
                raise
            live.running.pop(number, None)  # another create took the room meanwhile: the point waits
            live.parked = optuna_trial
            await self._update(sweep.id, _drop_trial(number))
            return None
        return recorded

    async def _queue_full(self, tenant: str) -> bool:
        limit = self._quotas(tenant).max_queued_jobs
        return limit < UNLIMITED and await self._db.call(self._store.count_jobs, tenant, [JobState.QUEUED]) >= limit

    async def _create_job(
        self, sweep: SweepRecord, trial: TrialRecord, spec: job_spec_pb2.JobSpec, resolved: TrainingSpec | None
    ) -> None:
        name = f"{sweep.display_name or sweep.id} trial {trial.number}"
        request_id = f"{sweep.id}/trial-{trial.number}"
        await self._jobs.create(
            spec, name[:200], request_id, trial.job_id, sweep.id, trial.number, sweep.tenant, resolved=resolved
        )

    async def _budget_spent(self, sweep: SweepRecord, plan: SearchPlan) -> bool:
        if not plan.budget_s:
            return False
        used = sweep.worker_seconds
        now = time.time()
        for trial in sweep.trials:
            if trial.state is TrialState.RUNNING and trial.job_id:
                job = await self._db.call(self._store.get_job, trial.job_id)
                if job is not None:
                    used += job.run_seconds + (now - job.start_time if job.start_time else 0.0)
        return used >= plan.budget_s

    async def _finish(self, sweep: SweepRecord) -> None:
        self._forget(sweep.id)
        succeeded = sweep.best_trial is not None
        state = SweepState.SUCCEEDED if succeeded else SweepState.FAILED

        def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
            ended = replace(current, state=state, end_time=time.time())
            if not succeeded:
                ended = replace(ended, error_reason="NO_TRIAL_COMPLETED", error_message=_why_none(current))
            return ended, [sweep_convert.state_event(current.state, state)]

        await self._update(sweep.id, change)
        log.info("sweep %s ended %s", sweep.id, state.value)

    # ------------------------------------------------------------ restart

    def _new_live(self, spec: sweeps_pb2.SweepSpec, plan: SearchPlan) -> LiveSweep:
        direction = optuna.study.StudyDirection.MAXIMIZE if plan.maximize else optuna.study.StudyDirection.MINIMIZE
        study = optuna.create_study(sampler=make_sampler(plan), pruner=make_pruner(plan), direction=direction)
        return LiveSweep(plan, spec.base, study)

    async def _restore(self, record: SweepRecord) -> None:
        spec = sweeps_pb2.SweepSpec.FromString(record.spec)
        plan, problems = await self.plan(spec)
        if plan is None:
            described = "; ".join(f"{v.field}: {v.description}" for v in problems)
            raise ValueError(f"its spec no longer validates: {described}")
        live = await asyncio.to_thread(self._new_live, spec, plan)
        distributions = plan.distributions
        for trial in record.trials:
            if trial.state is TrialState.RUNNING:
                continue
            state = {
                TrialState.COMPLETE: optuna.trial.TrialState.COMPLETE,
                TrialState.PRUNED: optuna.trial.TrialState.PRUNED,
                TrialState.FAILED: optuna.trial.TrialState.FAIL,
            }[trial.state]
            live.study.add_trial(
                optuna.trial.create_trial(
                    params=trial.params,
                    distributions=distributions,
                    value=trial.value if state is optuna.trial.TrialState.COMPLETE else None,
                    intermediate_values=dict(trial.reports),
                    state=state,
                )
            )
        self._live[record.id] = live  # the caller holds the lock
        for trial in record.trials:
            if trial.state is TrialState.RUNNING:
                await self._resume_trial(record, trial, live)
        await self._fill(record.id)

    async def _resume_trial(self, sweep: SweepRecord, trial: TrialRecord, live: LiveSweep) -> None:
        """A trial running when its sweep was last driven: asked again with its parameters, reports replayed; its job
        is created if the crash came first. What its job did since (evaluations, its end) is read from the store
        by the next pass, like any trial's."""
        live.study.enqueue_trial(trial.params)
        optuna_trial = live.study.ask(live.plan.distributions)
        for index, value in trial.reports:
            optuna_trial.report(value, index)
        live.running[trial.number] = optuna_trial
        job = await self._db.call(self._store.get_job, trial.job_id)
        if job is None:  # a spec that no longer validates is stored unresolved: its first attempt fails with why
            spec = trial_spec(live.base, trial.params, live.plan.metric)
            result = await asyncio.to_thread(validate_spec, spec, self._model_roots)
            await self._create_job(sweep, trial, spec, result.spec)
        elif trial.pruning and job.state not in TERMINAL:
            await self._cancel_job(job.id)

    async def _fail_unrestorable(self, record: SweepRecord, exc: Exception) -> None:
        """A sweep the restarted server cannot rebuild ends FAILED with the reason, and its trials' jobs stop."""
        self._forget(record.id)
        message = bounded(f"the sweep could not be rebuilt after a restart: {exc}")
        failed = _ended(
            SweepState.FAILED, "RESTORE_FAILED", message, error_reason="RESTORE_FAILED", error_message=message
        )
        await self._update(record.id, failed)
        await self._cancel_running_jobs(record)

    # ------------------------------------------------------------ helpers

    def _forget(self, sweep_id: str) -> None:
        self._live.pop(sweep_id, None)
        self._waiting.pop(sweep_id, None)

    async def _cancel_running_jobs(self, record: SweepRecord) -> None:
        for trial in record.trials:
            if trial.state is TrialState.RUNNING and trial.job_id:
                await self._cancel_job(trial.job_id)

    async def _cancel_job(self, job_id: str) -> None:
        with contextlib.suppress(IllegalTransition):  # it ended meanwhile
            await self._scheduler.cancel(job_id)

    async def _get(self, sweep_id: str) -> SweepRecord:
        record = await self._db.call(self._store.get_sweep, sweep_id)
        assert record is not None, sweep_id
        return record

    async def _update(self, sweep_id: str, change: Any, fenced: bool = True) -> SweepRecord:
        """Applies a change to the sweep; `fenced`: only while this replica holds its lease (LostLease otherwise)."""

        def guarded(current: SweepRecord) -> Any:
            if fenced and current.driver != self._replica:
                return None
            return change(current)

        result = await self._db.call(self._store.update_sweep, sweep_id, guarded)
        assert result is not None, sweep_id
        record, events = result
        if fenced and record.driver != self._replica:
            raise LostLease(sweep_id)
        if events:
            self._hub.publish(sweep_id, events, record.state in SWEEP_TERMINAL)
        return record


def _tell(
    live: LiveSweep,
    trial: optuna.trial.Trial,
    values: float | None = None,
    state: optuna.trial.TrialState | None = None,
) -> None:
    """Tells the study how a trial ended. The sweep record is the truth: a sampler that fails here (as Optuna's
    GridSampler did, stopping the study outside optimize) is logged, and the record is still updated."""
    try:
        live.study.tell(trial, values, state)
    except Exception:
        log.exception("the sampler failed to take trial %d's outcome", trial.number)


def _drop_trial(number: int) -> Any:
    def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
        return replace(current, trials=[t for t in current.trials if t.number != number]), []

    return change


def _ended(state: SweepState, trial_reason: str, trial_message: str, **fields: Any) -> Any:
    """The sweep ends in `state` (with `fields`, such as its error); its running trials fail with the reason."""

    def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]] | None:
        if current.state in SWEEP_TERMINAL:
            return None
        stopped = [
            replace(t, state=TrialState.FAILED, error_reason=trial_reason, error_message=trial_message)
            if t.state is TrialState.RUNNING
            else t
            for t in current.trials
        ]
        ended = replace(current, state=state, trials=stopped, end_time=time.time(), **fields)
        return ended, [sweep_convert.state_event(current.state, state)]

    return change


def _append_trial(trial: TrialRecord) -> Any:
    def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
        return replace(current, trials=[*current.trials, trial]), [sweep_convert.trial_event(trial)]

    return change


def _replace_trial(trial: TrialRecord, events: list[NewEvent]) -> Any:
    def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
        trials = [trial if t.number == trial.number else t for t in current.trials]
        return replace(current, trials=trials), list(events)

    return change


def _better(trial: TrialRecord, sweep: SweepRecord, maximize: bool) -> bool:
    if sweep.best_trial is None:
        return True
    best = sweep.trials[sweep.best_trial].value
    assert trial.value is not None and best is not None
    return trial.value > best if maximize else trial.value < best


def _why_none(sweep: SweepRecord) -> str:
    reasons = sorted({t.error_reason for t in sweep.trials if t.error_reason})
    pruned = sum(t.state is TrialState.PRUNED for t in sweep.trials)
    return f"none of {len(sweep.trials)} trials completed ({pruned} pruned; failures: {', '.join(reasons) or 'none'})"
