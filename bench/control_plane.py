"""The control plane under load: while jobs train on 2 workers, 200 concurrent WatchJob streams and a steady
stream of GetJob and ListJobs calls, with 100,000 finished jobs already in the store. Two layouts of the watchers:
concentrated on 2 long jobs, and spread over 50 short jobs that take turns on the workers; each on SQLite and on
PostgreSQL. Reports p50/p99 latencies from at least 1,000 calls per method, the delay from an event's commit to its
arrival at the watchers (p50/p99), confirms every watcher got every event of its job, and times ListJobs' first
page at that store size while idle.

    .venv/bin/python bench/control_plane.py [--jobs-in-store 100000] [--watchers 200] [--rate 50] [--samples 1000]
                                            [--stores sqlite,postgresql] [--layouts "2 jobs,50 jobs"]

One server per run (2 workers, tiny BERT jobs logging every step) on loopback; the clients run in this process on
grpc.aio, the watchers in 4 child processes (their traffic must not delay the timed calls). The baseline is the same
listing calls on the idle server, measured in the same run. PostgreSQL is a private cluster started here (Debian's
`postgresql` package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import local_server
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2, jobs_pb2_grpc


def training_spec(model: Path, training_file: str, epochs: int, log_every_steps: int) -> pb.JobSpec:
    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=str(model),
        data=pb.DataSpec(training_file=training_file, validation_fraction=0.25),
        hyperparameters=pb.Hyperparameters(
            epochs=epochs, batch_size=8, learning_rate=2e-3, seed=1, schedule=pb.Schedule(kind=pb.Schedule.CONSTANT)
        ),
        evaluation=pb.EvaluationSpec(log_every_steps=log_every_steps),
    )


def seed_store(data_dir: Path, count: int, spec: bytes, dsn: str = "") -> float:
    """`count` finished jobs written through the server's own store (SQLite in the data dir, or PostgreSQL at
    `dsn`), as a busy server's history; returns seconds."""
    from tuneforge.server.job_states import JobState
    from tuneforge.server.records import JobRecord
    from tuneforge.server.store.postgres import PostgresJobStore
    from tuneforge.server.store.sqlite import SqliteJobStore

    started = time.perf_counter()
    store = PostgresJobStore(dsn) if dsn else SqliteJobStore(data_dir / "tuneforge.db")
    now = time.time()
    states = [JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED]
    records = (
        JobRecord(
            id=uuid.uuid4().hex[:16],
            display_name=f"history {i}",
            spec=spec,
            priority=0,
            state=states[i % 5],
            create_time=now - count + i,
            update_time=now - count + i + 60,
            end_time=now - count + i + 60,
            step=100,
            total_steps=100,
            epoch=2,
            total_epochs=2,
            latest_metrics={"loss": 0.1},
            best_metrics={"eval_accuracy": 0.9},
            error_reason="INVALID_INPUT" if i % 5 == 3 else "",
        )
        for i in range(count)
    )
    store.import_jobs(records)
    store.close()
    return time.perf_counter() - started


@dataclass
class Latencies:
    """Seconds per call, by method."""

    calls: dict[str, list[float]] = field(default_factory=dict)

    def add(self, method: str, seconds: float) -> None:
        self.calls.setdefault(method, []).append(seconds)

    def line(self, method: str) -> str:
        values = sorted(self.calls.get(method, []))
        if not values:
            return f"{method:<22} no calls"
        p50 = statistics.median(values) * 1000
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
        return f"{method:<22} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   ({len(values)} calls)"


async def timed(latencies: Latencies, method: str, call: object) -> object:
    started = time.perf_counter()
    result = await call  # type: ignore[misc]
    latencies.add(method, time.perf_counter() - started)
    return result


async def idle_listing(stub: jobs_pb2_grpc.JobServiceStub, latencies: Latencies, calls: int) -> None:
    """ListJobs' first page (newest 50), unfiltered and filtered to a rare state, on the idle server."""
    running = jobs_pb2.ListJobsRequest(page_size=50, states=[jobs_pb2.Job.RUNNING])
    for _ in range(calls):
        await timed(latencies, "ListJobs (idle)", stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=50)))
        await timed(latencies, "ListJobs RUNNING (idle)", stub.ListJobs(running))


async def watch(stub: jobs_pb2_grpc.JobServiceStub, name: str) -> tuple[list[int], list[float]]:
    """Every event sequence the stream delivers, from the start until the job ends, and for each event committed
    after the stream was opened (the history before it is a catch-up, not a delivery) the seconds from its commit
    (the event's stored time) to its arrival here."""
    sequences, delays = [], []
    opened = time.time()
    async for event in stub.WatchJob(jobs_pb2.WatchJobRequest(name=name, after_sequence=0)):
        committed = event.time.ToNanoseconds() / 1e9
        sequences.append(event.sequence)
        if committed >= opened:
            delays.append(time.time() - committed)
    return sequences, delays


async def steady_load(
    stub: jobs_pb2_grpc.JobServiceStub, names: list[str], latencies: Latencies, rate: float, done: asyncio.Event
) -> None:
    """GetJob and ListJobs, alternating, at `rate` calls per second (open loop: a slow answer does not slow the
    offered load), until `done`."""
    in_flight: set[asyncio.Task[object]] = set()
    interval, index = 1.0 / rate, 0
    next_at = time.perf_counter()
    while not done.is_set():
        if index % 2 == 0:
            call = timed(latencies, "GetJob", stub.GetJob(jobs_pb2.GetJobRequest(name=names[index % len(names)])))
        else:
            call = timed(latencies, "ListJobs", stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=50)))
        task = asyncio.ensure_future(call)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        index += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await asyncio.gather(*in_flight)


async def watch_all(target: str, names: list[str], watchers: int) -> list[tuple[list[int], list[float]]]:
    """`watchers` streams, watcher i on job i mod len(names), each until its job ends."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        return list(await asyncio.gather(*(watch(stub, names[i % len(names)]) for i in range(watchers))))


async def under_load(
    target: str, names: list[str], rate: float, watchers: list[subprocess.Popen[str]], samples: int
) -> tuple[Latencies, list[tuple[list[int], list[float]]]]:
    """The steady calls, from this process, until the watchers' process has seen the jobs end and each method has
    `samples` latencies; returns them and what each watcher received."""
    latencies = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        done = asyncio.Event()
        load = asyncio.ensure_future(steady_load(stub, names, latencies, rate, done))
        outputs = [(await asyncio.to_thread(process.communicate))[0] for process in watchers]
        while min(len(latencies.calls.get(m, [])) for m in ("GetJob", "ListJobs")) < samples:
            await asyncio.sleep(0.2)
        done.set()
        await load
    return latencies, [watcher for output in outputs for watcher in json.loads(output)]


def start_watchers(target: str, names: list[str], watchers: int, processes: int) -> list[subprocess.Popen[str]]:
    """The watchers run in `processes` processes of their own: their thousands of messages a second must not delay
    the event loop that times the calls, nor queue behind each other in one client (which would time the client,
    not the server). Watcher i watches job i mod len(names), whichever process holds it."""
    started = []
    for part in range(processes):
        mine = [names[i % len(names)] for i in range(part, watchers, processes)]
        command = [sys.executable, __file__, "--watch", target, *mine, "--watchers", str(len(mine))]
        started.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    return started


async def idle(target: str, calls: int) -> Latencies:
    latencies = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        await idle_listing(jobs_pb2_grpc.JobServiceStub(channel), latencies, calls)
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


@dataclass(frozen=True)
class Layout:
    """How the watched jobs are laid out: 2 long jobs training throughout (cancelled once the load has its
    samples), or 50 short jobs taking turns on the 2 workers."""

    jobs: int
    max_steps: int


LAYOUTS = {"2 jobs": Layout(2, 0), "50 jobs": Layout(50, 25)}


def scenario(store: str, layout_name: str, args: argparse.Namespace, model: Path, data: Path) -> bool:
    """One server (2 workers) on `store` (sqlite, or a PostgreSQL DSN) with the history in it; the watchers and
    the steady load while the layout's jobs train. Prints the figures; returns whether every watcher got every
    event of its job in order."""
    layout = LAYOUTS[layout_name]
    data_dir = Path(tempfile.mkdtemp()) / "data"
    data_dir.mkdir()
    history = training_spec(model, "files/x", 1, 1).SerializeToString()
    seeded = seed_store(data_dir, args.jobs_in_store, history, "" if store == "sqlite" else store)
    extra = ["--log-level", "WARNING"] + ([] if store == "sqlite" else ["--store", store])
    with local_server(data_dir, workers=2, model_roots=[model.parent], extra_args=extra) as server:
        client = TuneforgeClient(server.target)
        client.wait_until_serving()
        baseline = asyncio.run(idle(server.target, 100))
        file = client.upload_file(data)
        epochs = 1000 if not layout.max_steps else 1
        spec = training_spec(model, file.name, epochs, args.log_every_steps)
        spec.hyperparameters.max_steps = layout.max_steps
        names = [client.create_job(spec).name for _ in range(layout.jobs)]
        stop = None
        if not layout.max_steps:  # long jobs: the load starts once both train, and ends them when it has enough
            for name in names:
                next(e for e in client.watch(name) if e.WhichOneof("payload") == "training_metrics")
            seconds = max(args.seconds, 2 * args.samples / args.rate)
            stop = threading.Timer(seconds, lambda: [client.cancel_job(name) for name in names])
            stop.start()
        started = time.perf_counter()
        watchers = start_watchers(server.target, names, args.watchers, args.watcher_processes)
        latencies, received = asyncio.run(under_load(server.target, names, args.rate, watchers, args.samples))
        load_seconds = time.perf_counter() - started
        if stop is not None:
            stop.join()
        stored = {name: [e.sequence for e in client.list_job_events(name)] for name in names}
        assert all(sequences == list(range(1, len(sequences) + 1)) for sequences in stored.values())
        watched = [names[i % len(names)] for part in range(args.watcher_processes)
                   for i in range(part, args.watchers, args.watcher_processes)]  # fmt: skip
        complete = sum(got == stored[name] for name, (got, _) in zip(watched, received, strict=True))
        delays = [delay * 1000 for _, watcher_delays in received for delay in watcher_delays]
        client.close()
    where = "SQLite" if store == "sqlite" else "PostgreSQL"
    print(f"{where}, {args.jobs_in_store:,} jobs in the store (written in {seeded:.1f} s); {layout_name} watched")
    print("  idle: " + baseline.line("ListJobs (idle)"))
    print("  idle: " + baseline.line("ListJobs RUNNING (idle)"))
    print(
        f"  under load for {load_seconds:.0f} s: {layout.jobs} jobs ({sum(map(len, stored.values()))} events), "
        f"{len(received)} watchers over {layout.jobs} jobs in {args.watcher_processes} processes, {args.rate:g} "
        "calls/s, 2 workers training"
    )
    print("  " + latencies.line("GetJob"))
    print("  " + latencies.line("ListJobs"))
    print(
        f"  event commit -> watcher: p50 {percentile(delays, 0.5):.1f} ms   p99 {percentile(delays, 0.99):.1f} ms   "
        f"({len(delays)} deliveries; target p99 <= 50 ms)"
    )
    print(f"  watchers that got every event of their job, in order: {complete} of {len(received)}\n", flush=True)
    return complete == len(received)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-in-store", type=int, default=100_000)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="GetJob + ListJobs calls per second under load")
    parser.add_argument("--samples", type=int, default=1000, help="latencies per method under load, at least")
    parser.add_argument("--log-every-steps", type=int, default=5, help="training metrics events every N steps")
    parser.add_argument("--watcher-processes", type=int, default=4, help="client processes the watchers share")
    parser.add_argument("--seconds", type=float, default=30.0, help="least time the long jobs train under load")
    parser.add_argument("--stores", default="sqlite,postgresql", help="sqlite and/or postgresql (started here)")
    parser.add_argument("--layouts", default="2 jobs,50 jobs")
    parser.add_argument("--watch", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        print(json.dumps(asyncio.run(watch_all(args.watch[0], args.watch[1:], args.watchers))))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.tiny import keyword_rows, make_tiny_bert, write_jsonl

    scratch = Path(tempfile.mkdtemp())
    model = make_tiny_bert(scratch / "models" / "tiny-bert")
    data = write_jsonl(scratch / "train.jsonl", keyword_rows(160))
    complete = True
    for store in args.stores.split(","):
        postgres = None
        if store == "postgresql":
            from tests.postgres import start_postgres

            postgres = start_postgres()
        try:
            for layout in args.layouts.split(","):
                dsn = "sqlite" if postgres is None else postgres.new_database()
                complete &= scenario(dsn, layout, args, model, data)
        finally:
            if postgres is not None:
                postgres.stop()
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
