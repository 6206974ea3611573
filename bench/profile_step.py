"""Where a training step's time goes: a short run of each workload of core_vs_trainer.py (the core, or Trainer as
that bench runs it) under torch.profiler, after warm-up steps. Prints the operators and regions by total time,
so that a speed change starts from a measurement.

    .venv/bin/python bench/profile_step.py [--workloads text,image,audio] [--contender core|trainer] [--steps 12]

The profile covers the whole short run from the first step (data loading, forward, backward, clipping, the
optimizer, the core's reports and its checkpoint at the end); the first steps include warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core_vs_trainer as fair


def profile(name: str, contender: str, steps: int, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from transformers import TrainerCallback

    workload = fair.WORKLOADS[name]
    scratch = Path(tempfile.mkdtemp())
    model = scratch / "model"
    workload.build(model)
    data = workload.write_data(scratch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = torch.profiler.profile(activities=activities)
    if contender == "core":
        from tuneforge.workers.messages import LogEmitted, WorkerEvent

        def send(event: WorkerEvent) -> None:  # profiling starts as the training loop does
            if isinstance(event, LogEmitted) and event.message.startswith("training: "):
                profiler.start()

        spec = fair.core_spec(workload.task, model, 1, workload.clip_seconds, max_steps=steps)
        fair.run_core_job(spec, data, send)
        profiler.stop()
    else:

        class Start(TrainerCallback):  # type: ignore[misc]
            def on_train_begin(self, args: object, state: object, control: object, **kwargs: object) -> None:
                profiler.start()

        fair.TRAINER_CALLBACKS.append(Start())
        fair.TRAINER_MAX_STEPS = steps
        fair.run_trainer(workload, model, data, 1, False)
        profiler.stop()
    print(f"{workload.description}: {contender}, {steps} steps of batch {fair.BATCH}")
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=rows, max_name_column_width=70))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="text,image,audio")
    parser.add_argument("--contender", choices=["core", "trainer"], default="core")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in args.workloads.split(","):
        profile(name, args.contender, args.steps, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
