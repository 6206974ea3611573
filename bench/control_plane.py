"""The control plane under load: while 2 jobs train (cancelled after --seconds), 200 concurrent WatchJob streams
and a steady stream of GetJob and ListJobs calls, with 100,000 finished jobs already in the store. Reports p50/p99
latencies, confirms every watcher got every event of its job, and times ListJobs' first page at that store size
while idle.

    .venv/bin/python bench/control_plane.py [--jobs-in-store 100000] [--watchers 200] [--rate 50]

One server (2 workers, tiny BERT jobs logging every step) on loopback; the clients run in this process on
grpc.aio. The baseline is the same calls on the idle server, measured in the same run.
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
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2, jobs_pb2_grpc

from clients.client import TuneforgeClient
from clients.local_server import local_server


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


def seed_store(data_dir: Path, count: int, spec: bytes) -> float:
    """`count` finished jobs written through the server's own store, as a busy server's history; returns seconds."""
    from server.job_states import JobState
    from server.records import JobRecord
    from server.store.sqlite import SqliteJobStore

    started = time.perf_counter()
    store = SqliteJobStore(data_dir / "tuneforge.db")
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


async def watch(stub: jobs_pb2_grpc.JobServiceStub, name: str) -> list[int]:
    """Every event sequence the stream delivers, from the start until the job ends."""
    sequences = []
    async for event in stub.WatchJob(jobs_pb2.WatchJobRequest(name=name, after_sequence=0)):
        sequences.append(event.sequence)
    return sequences


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


async def watch_all(target: str, names: list[str], watchers: int) -> list[list[int]]:
    """`watchers` streams, watcher i on job i mod len(names), each until its job ends."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        return list(await asyncio.gather(*(watch(stub, names[i % len(names)]) for i in range(watchers))))


async def under_load(
    target: str, names: list[str], rate: float, watchers: subprocess.Popen[str]
) -> tuple[Latencies, list[list[int]]]:
    """The steady calls, from this process, until the watchers' process has seen the jobs end; returns their
    latencies and what each watcher received."""
    latencies = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        done = asyncio.Event()
        load = asyncio.ensure_future(steady_load(stub, names, latencies, rate, done))
        output, _ = await asyncio.to_thread(watchers.communicate)
        done.set()
        await load
    return latencies, json.loads(output)


def start_watchers(target: str, names: list[str], watchers: int) -> subprocess.Popen[str]:
    """The watchers run in their own process: their thousands of messages a second must not delay the event loop
    that times the calls."""
    command = [sys.executable, __file__, "--watch", target, *names, "--watchers", str(watchers)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


async def idle(target: str, calls: int) -> Latencies:
    latencies = Latencies()
    async with grpc.aio.insecure_channel(target) as channel:
        await idle_listing(jobs_pb2_grpc.JobServiceStub(channel), latencies, calls)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-in-store", type=int, default=100_000)
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0, help="GetJob + ListJobs calls per second under load")
    parser.add_argument("--log-every-steps", type=int, default=5, help="training metrics events every N steps")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the jobs train under the load")
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
    data_dir = scratch / "data"
    data_dir.mkdir()
    seconds = seed_store(data_dir, args.jobs_in_store, training_spec(model, "files/x", 1, 1).SerializeToString())
    print(f"{args.jobs_in_store:,} finished jobs written to the store in {seconds:.1f} s")
    with local_server(data_dir, workers=2, model_roots=[model.parent]) as server:
        client = TuneforgeClient(server.target)
        client.wait_until_serving()
        baseline = asyncio.run(idle(server.target, 100))
        file = client.upload_file(data)
        names = [client.create_job(training_spec(model, file.name, 1000, args.log_every_steps)).name for _ in range(2)]
        for name in names:  # load starts once both train
            next(e for e in client.watch(name) if e.WhichOneof("payload") == "training_metrics")
        stop = threading.Timer(args.seconds, lambda: [client.cancel_job(name) for name in names])
        stop.start()
        started = time.perf_counter()
        watchers = start_watchers(server.target, names, args.watchers)
        latencies, received = asyncio.run(under_load(server.target, names, args.rate, watchers))
        load_seconds = time.perf_counter() - started
        stop.join()
        stored = [[e.sequence for e in client.list_job_events(name)] for name in names]
        events = [len(sequences) for sequences in stored]
        assert all(sequences == list(range(1, len(sequences) + 1)) for sequences in stored)
        complete = sum(sequences == stored[i % len(names)] for i, sequences in enumerate(received))
        total = len(received)
        states = [jobs_pb2.Job.State.Name(client.get_job(name).state) for name in names]
        client.close()
    print(f"idle server, {args.jobs_in_store:,} jobs in the store:")
    print("  " + baseline.line("ListJobs (idle)"))
    print("  " + baseline.line("ListJobs RUNNING (idle)"))
    print(
        f"under load for {load_seconds:.0f} s: 2 jobs training ({', '.join(states)}; {sum(events)} events), "
        f"{total} watchers, {args.rate:g} calls/s"
    )
    print("  " + latencies.line("GetJob"))
    print("  " + latencies.line("ListJobs"))
    print(f"watchers that got every event of their job, in order: {complete} of {total}")
    return 0 if complete == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
