"""The Ray pool on a two-node cluster (two `ray start` nodes with two fake GPUs each, so each worker's pair is
reserved through a placement group): data-parallel jobs run on both nodes, and when one node's processes are all
killed mid-job, the job resumes from its checkpoint on the other."""

from __future__ import annotations

import re
from pathlib import Path

import ray

from tests.integration.conftest import SERVER_ARGS
from tests.integration.helpers import STATE, log_lines, text_spec, wait_for_end
from tests.ray_cluster import node_environment, ray_cluster
from tuneforge.clients.client import TuneforgeClient
from tuneforge.clients.local_server import start_local_server

RUNS_ON = re.compile(r"attempt (\d+) runs on (\S+) at \S+/node-([0-9a-f]+)")


def nodes_by_resource(address: str) -> dict[str, str]:
    """`node_0`, `node_1`... -> the first 12 hex digits of that node's Ray id (what workers report)."""
    ray.init(address=address, log_to_driver=False)
    try:
        return {
            resource: node["NodeID"][:12]
            for node in ray.nodes()
            for resource in node["Resources"]
            if resource.startswith("node_") and node["Alive"]
        }
    finally:
        ray.shutdown()


def placements(client: TuneforgeClient, job: str) -> dict[int, tuple[str, str]]:
    """attempt -> (worker, node id) from the job's log."""
    found = {}
    for line in log_lines(client.list_job_events(job)):
        if match := RUNS_ON.match(line):
            found[int(match[1])] = (match[2], match[3])
    return found


def test_jobs_run_on_both_nodes_and_a_lost_node_s_job_resumes_on_the_other(
    tmp_path: Path, model_root: Path, tiny_bert: Path, keyword_dataset: Path
) -> None:
    with ray_cluster(nodes=2, gpus_per_node=2, cpus_per_node=2, log=tmp_path / "ray.log") as cluster:
        head, other = (nodes_by_resource(cluster.address)[f"node_{i}"] for i in range(2))
        ray_args = ["--pool", "ray", "--ray-address", cluster.address, "--ray-gpus-per-worker", "2"]
        args = [*SERVER_ARGS, *ray_args, "--restart-backoff-s", "0.2", "--log-level", "INFO"]
        server = start_local_server(
            tmp_path / "data",
            workers=2,
            model_roots=[model_root],
            extra_args=args,
            env=node_environment(),
            log_path=tmp_path / "server.log",
            timeout_s=120,
        )
        try:
            with TuneforgeClient(server.target, timeout_s=30) as client:
                client.wait_until_serving(120)
                file = client.upload_file(keyword_dataset).name
                jobs = []
                for _ in range(2):
                    spec = text_spec(tiny_bert, file, epochs=6)
                    spec.evaluation.checkpoint_every_steps = 4
                    spec.resources.ranks = 2  # data-parallel inside a Ray worker as in a local one
                    jobs.append(client.create_job(spec).name)
                # Follow both until each has started on a node; the one on the non-head node is the victim.
                victim = None
                for job in jobs:
                    for event in client.watch(job, timeout_s=180):
                        if event.WhichOneof("payload") == "checkpoint_saved":
                            break
                    if placements(client, job)[1][1] == other:
                        victim = job
                on_nodes = {placements(client, job)[1][1] for job in jobs}
                assert on_nodes == {head, other}, (on_nodes, head, other)
                assert victim is not None
                cluster.nodes[1].kill()
                finals = {job: wait_for_end(client, job, timeout_s=240) for job in jobs}
                for job, final in finals.items():
                    assert final.state == STATE.SUCCEEDED, (job, final.error)
                assert finals[victim].attempt == 2
                first, second = placements(client, victim)[1], placements(client, victim)[2]
                assert (first[1], second[1]) == (other, head)
                lines = log_lines(client.list_job_events(victim))
                assert any(line.startswith("resumed from the checkpoint at step") for line in lines), lines
                assert sum("data-parallel over 2 ranks (gloo)" in line for line in lines) == 2, lines
        finally:
            assert server.stop() == 0
