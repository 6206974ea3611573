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
from tuneforge.v1 import job_spec_pb2, jobs_pb2, sweeps_pb2

from server import sweep_convert
from server.db import StoreRunner
from server.event_hub import EventHub
from server.job_factory import JobFactory
from server.job_states import TERMINAL, IllegalTransition, JobState
from server.names import new_id
from server.records import DEFAULT_TENANT, EventRecord, JobRecord, NewEvent
from server.scheduler import Scheduler
from server.search_space import SearchPlan, make_pruner, make_sampler, plan_search, trial_spec
from server.spec_validation import validate_spec
from server.store.base import JobStore
from server.sweep_records import SWEEP_TERMINAL, SweepRecord, SweepState, TrialRecord, TrialState

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class LiveSweep:
    """A running sweep's Optuna study and the Optuna trial behind each of its running trials."""

    plan: SearchPlan
    base: job_spec_pb2.JobSpec
    study: optuna.Study
    running: dict[int, optuna.trial.Trial] = field(default_factory=dict)


class SweepController:
    """Owns every running sweep. All changes go through one lock, on the event loop."""

    def __init__(
        self,
        store: JobStore,
        db: StoreRunner,
        scheduler: Scheduler,
        jobs: JobFactory,
        hub: EventHub,
        model_roots: list[Path],
    ):
        self._store, self._db, self._scheduler, self._jobs, self._hub = store, db, scheduler, jobs, hub
        self._model_roots = model_roots
        self._live: dict[str, LiveSweep] = {}
        self._lock = asyncio.Lock()
        self._inbox: asyncio.Queue[tuple[JobRecord, list[EventRecord]]] = asyncio.Queue()
        self._consumer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Rebuilds every running sweep from the store and tops up its trials."""
        self._scheduler.add_listener(self._job_changed)
        for record in await self._db.call(self._store.sweeps_in_states, [SweepState.RUNNING]):
            try:
                await self._restore(record)
            except Exception:
                log.exception("could not restore sweep %s", record.id)
        self._consumer = asyncio.create_task(self._consume(), name="sweeps")

    async def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()

    # ------------------------------------------------------------ API-facing actions

    def plan(self, spec: sweeps_pb2.SweepSpec) -> tuple[SearchPlan | None, list[Any]]:
        return plan_search(spec, self._model_roots)

    async def create(
        self, sweep: sweeps_pb2.Sweep, plan: SearchPlan, request_id: str | None, tenant: str = DEFAULT_TENANT
    ) -> SweepRecord:
        now = time.time()
        record = SweepRecord(
            id=new_id("sw"),
            display_name=sweep.display_name,
            spec=sweep.spec.SerializeToString(),
            state=SweepState.RUNNING,
            create_time=now,
            update_time=now,
            tenant=tenant,
        )
        stored, created = await self._db.call(
            self._store.create_sweep, record, [sweep_convert.state_event(None, SweepState.RUNNING)], request_id
        )
        if created:
            async with self._lock:
                self._live[stored.id] = self._new_live(sweep.spec, plan)
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
            self._live.pop(sweep_id, None)

            def change(current: SweepRecord) -> tuple[SweepRecord, list[NewEvent]]:
                trials = [_stopped(t) if t.state is TrialState.RUNNING else t for t in current.trials]
                ended = replace(current, state=SweepState.CANCELLED, trials=trials, end_time=time.time())
                return ended, [sweep_convert.state_event(current.state, SweepState.CANCELLED)]

            updated = await self._update(sweep_id, change)
            for trial in record.trials:
                if trial.state is TrialState.RUNNING and trial.job_id:
                    await self._cancel_job(trial.job_id)
            return updated

    # ------------------------------------------------------------ job events

    def _job_changed(self, record: JobRecord, events: list[EventRecord]) -> None:
        if record.sweep_id:
            self._inbox.put_nowait((record, events))

    async def _consume(self) -> None:
        while True:
            record, events = await self._inbox.get()
            try:
                async with self._lock:
                    await self._apply_job_change(record, events)
            except Exception:  # one bad event must not stop the sweeps
                log.exception("sweep %s: failed to apply a change of %s", record.sweep_id, record.id)

    async def _apply_job_change(self, job: JobRecord, events: list[EventRecord]) -> None:
        live = self._live.get(job.sweep_id)
        if live is None:
            return
        for event in events:
            if event.kind == "evaluation_metrics":
                await self._report(job, live, jobs_pb2.JobEvent.FromString(event.payload).evaluation_metrics.metrics)
        if job.state in TERMINAL:
            await self._trial_ended(job, live)
            await self._fill(job.sweep_id)

    async def _report(self, job: JobRecord, live: LiveSweep, metrics: Any) -> None:
        """An evaluation of a trial: recorded, told to the pruner, and the trial cancelled if the pruner says so."""
        optuna_trial = live.running.get(job.trial_number)
        if optuna_trial is None or live.plan.metric not in metrics:
            return
        value = float(metrics[live.plan.metric])
        sweep = await self._get(job.sweep_id)
        trial = sweep.trials[job.trial_number]
        if trial.state is not TrialState.RUNNING or trial.pruning:
            return
        index = len(trial.reports) + 1
        optuna_trial.report(value, index)
        prune = bool(optuna_trial.should_prune())  # pruners may answer with a numpy bool, which JSON refuses
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
            live.study.tell(optuna_trial, float(value))
            ended = replace(trial, state=TrialState.COMPLETE, value=float(value))
        elif trial.pruning:
            live.study.tell(optuna_trial, state=optuna.trial.TrialState.PRUNED)
            ended = replace(trial, state=TrialState.PRUNED)
        else:
            live.study.tell(optuna_trial, state=optuna.trial.TrialState.FAIL)
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
        while sweep.state is SweepState.RUNNING:
            running = sum(t.state is TrialState.RUNNING for t in sweep.trials)
            can_start = len(sweep.trials) < plan.max_trials and not await self._budget_spent(sweep, plan)
            if can_start and running < plan.parallelism:
                sweep = await self._start_trial(sweep, live)
                continue
            if running == 0:
                await self._finish(sweep)
            return

    async def _start_trial(self, sweep: SweepRecord, live: LiveSweep) -> SweepRecord:
        number = len(sweep.trials)
        optuna_trial = live.study.ask(live.plan.distributions)
        params = dict(optuna_trial.params)
        spec = trial_spec(live.base, params, live.plan.metric)
        result = validate_spec(spec, self._model_roots)
        problems = "; ".join(f"{v.field}: {v.description}" for v in result.violations + result.unimplemented)
        if problems:
            live.study.tell(optuna_trial, state=optuna.trial.TrialState.FAIL)
            failed = TrialRecord(number, "", params, TrialState.FAILED, None, [], False, "INVALID_INPUT", problems)
            return await self._update(sweep.id, _append_trial(failed))
        trial = TrialRecord(number, new_id("ft"), params)
        recorded = await self._update(sweep.id, _append_trial(trial))  # recorded before the job exists
        live.running[number] = optuna_trial
        await self._create_job(sweep, trial, spec)
        return recorded

    async def _create_job(self, sweep: SweepRecord, trial: TrialRecord, spec: job_spec_pb2.JobSpec) -> None:
        name = f"{sweep.display_name or sweep.id} trial {trial.number}"
        request_id = f"{sweep.id}/trial-{trial.number}"
        await self._jobs.create(spec, name[:200], request_id, trial.job_id, sweep.id, trial.number, sweep.tenant)

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
        self._live.pop(sweep.id, None)
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
        plan, problems = self.plan(spec)
        if plan is None:
            raise ValueError(f"its spec no longer validates: {problems}")
        live = self._new_live(spec, plan)
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
        self._live[record.id] = live
        async with self._lock:
            for trial in record.trials:
                if trial.state is TrialState.RUNNING:
                    await self._resume_trial(record, trial, live)
            await self._fill(record.id)

    async def _resume_trial(self, sweep: SweepRecord, trial: TrialRecord, live: LiveSweep) -> None:
        """A trial running when the server stopped: asked again with its parameters, reports replayed; its job is
        created if the crash came first, and its end applied if it ended unseen."""
        live.study.enqueue_trial(trial.params)
        optuna_trial = live.study.ask(live.plan.distributions)
        for index, value in trial.reports:
            optuna_trial.report(value, index)
        live.running[trial.number] = optuna_trial
        job = await self._db.call(self._store.get_job, trial.job_id)
        if job is None:
            await self._create_job(sweep, trial, trial_spec(live.base, trial.params, live.plan.metric))
        elif job.state in TERMINAL:
            await self._trial_ended(job, live)
        elif trial.pruning:
            await self._cancel_job(job.id)

    # ------------------------------------------------------------ helpers

    async def _cancel_job(self, job_id: str) -> None:
        with contextlib.suppress(IllegalTransition):  # it ended meanwhile
            await self._scheduler.cancel(job_id)

    async def _get(self, sweep_id: str) -> SweepRecord:
        record = await self._db.call(self._store.get_sweep, sweep_id)
        assert record is not None, sweep_id
        return record

    async def _update(self, sweep_id: str, change: Any) -> SweepRecord:
        result = await self._db.call(self._store.update_sweep, sweep_id, change)
        assert result is not None, sweep_id
        record, events = result
        if events:
            self._hub.publish(sweep_id, events, record.state in SWEEP_TERMINAL)
        return record


def _stopped(trial: TrialRecord) -> TrialRecord:
    return replace(trial, state=TrialState.FAILED, error_reason="CANCELLED", error_message="the sweep was cancelled")


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
