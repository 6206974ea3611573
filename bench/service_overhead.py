"""What the service adds around the training core, cold and warm measured the same way on both sides.

    .venv/bin/python bench/service_overhead.py [--epochs 1] [--rounds 3]

Each round runs one sequence on each side, interleaved (in-process, service, in-process, service ...):
1. a cold worker: a 2-step probe sent the moment the process starts (in-process: a fresh Python process that then
   imports torch and the core; through the service: CreateJob sent as soon as a fresh server listens, while its
   worker process is still starting and importing);
2. a warm worker with a cold model: the full job (seed 0) after the probe (seed 1): torch is imported, the model
   is read from disk;
3. a warm model: the same full job again (the worker keeps the model in memory; so does the in-process side,
   through the same model cache).
For each: the time to the first training step (the core's `training:` log line, sent as the loop starts) and, for
the full jobs, the whole job (through the service: upload, CreateJob, watch to the end, download the artifact).
The job is core_vs_trainer's BERT (4 layers, hidden 256) on 2000 sentences. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from core_vs_trainer import (
    BATCH,
    LEARNING_RATE,
    WEIGHT_DECAY,
    build_bert,
    core_spec,
    run_core_job,
    write_sentences,
)

TRAINING_LINE = "training: "
"""How the core's log line at the start of the training loop begins."""


FIRST_PROBE_STEPS = 2
PHASES = ("cold worker", "warm worker, cold model", "warm model")


def in_process(model: Path, data: Path, epochs: int, spawned_at: float) -> dict[str, Any]:
    """This child's sequence: the probe (from the process's start), then the full job twice."""
    from tuneforge.workers.messages import LogEmitted, WorkerEvent
    from tuneforge.workers.tasks.runtime import import_every_runtime

    def timed_run(spec: Any, since: float) -> dict[str, float]:
        marks: dict[str, float] = {}

        def send(event: WorkerEvent) -> None:
            if isinstance(event, LogEmitted) and event.message.startswith(TRAINING_LINE):
                marks.setdefault("first_step", time.time() - since)

        run_core_job(spec, data, send)
        return {"first_step": marks["first_step"], "seconds": time.time() - since}

    import_every_runtime()  # as a worker does when it starts
    probe = core_spec("TEXT_CLASSIFICATION", model, 1, max_steps=FIRST_PROBE_STEPS)
    probe = dataclasses.replace(probe, hyperparameters=dataclasses.replace(probe.hyperparameters, seed=1))
    cold_worker = timed_run(probe, spawned_at)
    full = core_spec("TEXT_CLASSIFICATION", model, epochs)
    cold_model = timed_run(full, time.time())
    warm_model = timed_run(full, time.time())
    return dict(zip(PHASES, (cold_worker, cold_model, warm_model), strict=True))


def job_spec(model: Path, training_file: str, epochs: int, max_steps: int, seed: int):  # type: ignore[no-untyped-def]
    from tuneforge.v1 import job_spec_pb2 as pb

    return pb.JobSpec(
        task=pb.TEXT_CLASSIFICATION,
        base_model=str(model),
        data=pb.DataSpec(training_file=training_file, max_sequence_length=128),
        hyperparameters=pb.Hyperparameters(
            epochs=epochs,
            batch_size=BATCH,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            seed=seed,
            schedule=pb.Schedule(kind=pb.Schedule.CONSTANT),
            max_steps=max_steps,
        ),
        evaluation=pb.EvaluationSpec(log_every_steps=10),
    )


def through_service(model: Path, data: Path, epochs: int) -> dict[str, Any]:
    """A fresh server with one worker: the probe as soon as it listens, then the full job twice."""
    from tuneforge.clients.client import TuneforgeClient
    from tuneforge.clients.local_server import local_server

    def timed_job(client: TuneforgeClient, since: float, max_steps: int, seed: int, scratch: Path) -> dict[str, float]:
        file = client.upload_file(data)
        job = client.create_job(job_spec(model, file.name, epochs, max_steps, seed))
        marks: dict[str, float] = {}
        for event in client.watch(job.name, timeout_s=3600):
            if event.WhichOneof("payload") == "log" and event.log.message.startswith(TRAINING_LINE):
                marks.setdefault("first_step", time.time() - since)
        finished = client.get_job(job.name)
        assert finished.state == finished.SUCCEEDED, finished.error
        client.download_artifact(job.name, scratch / f"{job.name.split('/')[-1]}.tar")
        return {"first_step": marks["first_step"], "seconds": time.time() - since}

    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        started = time.time()
        with (
            local_server(scratch / "data", 1, [model.parent], ["--log-level", "WARNING"]) as server,
            TuneforgeClient(server.target) as client,
        ):
            cold_worker = timed_job(client, started, FIRST_PROBE_STEPS, 1, scratch)
            cold_model = timed_job(client, time.time(), 0, 0, scratch)
            warm_model = timed_job(client, time.time(), 0, 0, scratch)
    return dict(zip(PHASES, (cold_worker, cold_model, warm_model), strict=True))


def child(model: Path, data: Path, epochs: int, spawned_at: float) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(json.dumps(in_process(model, data, epochs, spawned_at)))


def run_child(model: Path, data: Path, epochs: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", "--model", str(model), "--data", str(data)]
    command += ["--epochs", str(epochs), "--spawned-at", repr(time.time())]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    result: dict[str, Any] = json.loads(output)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--spawned-at", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        child(args.model, args.data, args.epochs, args.spawned_at)
        return 0
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "models" / "bert"
    build_bert(model)
    data = write_sentences(scratch)
    sides: dict[str, list[dict[str, Any]]] = {"in-process": [], "service": []}
    for _ in range(args.rounds):
        sides["in-process"].append(run_child(model, data, args.epochs))
        sides["service"].append(through_service(model, data, args.epochs))
    print(
        f"BERT (4 layers, hidden 256), 2000 sentences, {args.epochs} epoch, batch {BATCH}, 1 worker, "
        f"{args.rounds} rounds"
    )
    print(
        f"{'':>26} {'first step, in-process':>23} {'first step, service':>20} {'job, in-process':>16} "
        f"{'job, service':>13}"
    )
    for phase in PHASES:
        figures = [statistics.median(r[phase][key] for r in sides[side]) for key in ("first_step", "seconds")
                   for side in ("in-process", "service")]  # fmt: skip
        job = f"{figures[2]:>15.1f}s {figures[3]:>12.1f}s" if phase != PHASES[0] else f"{'-':>16} {'-':>13}"
        print(f"{phase:>26} {figures[0]:>22.2f}s {figures[1]:>19.2f}s {job}")
    for phase in PHASES[1:]:
        rounds = zip(sides["service"], sides["in-process"], strict=True)
        ratio = statistics.median(service[phase]["seconds"] / local[phase]["seconds"] for service, local in rounds)
        print(f"{phase}: the whole job through the service / in-process {ratio:.3f} (median of rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
