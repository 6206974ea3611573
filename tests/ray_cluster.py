"""A local Ray cluster for tests: nodes started with `ray start --block` in their own sessions (so a node's
processes can be killed together), fake GPUs, everything on 127.0.0.1. Use it only inside a network namespace with
just loopback (tests/netns.py): Ray otherwise binds and advertises the machine's own address."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import descendants
from tuneforge.workers.core.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started"


@dataclass
class RayNode:
    process: subprocess.Popen[str]
    name: str

    def kill(self) -> None:
        """Every process of the node at once (raylet, its workers and their actors), as when a machine dies. Ray
        gives each worker process its own process group, so the node's tree is walked rather than its group."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class RayCluster:
    address: str
    nodes: list[RayNode] = field(default_factory=list)


def node_environment() -> dict[str, str]:
    """What actors need to import Tuneforge from this checkout, offline."""
    path = os.pathsep.join([str(REPO), str(REPO / "protos"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _start_node(arguments: list[str], name: str, log: Path) -> RayNode:
    command = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *arguments]
    with open(log, "a") as errors:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=node_environment(),
            start_new_session=True,  # its own process group: kill() takes the whole node
        )
    assert process.stdout is not None
    for line in process.stdout:  # `ray start` says when the node is up
        if STARTED in line:
            return RayNode(process, name)
    raise RuntimeError(f"ray node {name} exited with {process.wait()} before starting; see {log}")


@contextmanager
def ray_cluster(nodes: int, gpus_per_node: int, cpus_per_node: int, log: Path) -> Iterator[RayCluster]:
    """A head and nodes-1 more nodes on this machine, each with its own fake GPUs and a `node_N` resource."""
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}")
    with ExitStack() as stack:
        stack.callback(lambda: [node.kill() for node in reversed(cluster.nodes)])
        for index in range(nodes):
            common = [
                f"--num-cpus={cpus_per_node}",
                f"--num-gpus={gpus_per_node}",
                f"--resources={json.dumps({f'node_{index}': 1})}",
            ]
            if index == 0:
                head = ["--head", f"--port={port}", "--include-dashboard=false", *common]
                cluster.nodes.append(_start_node(head, "head", log))
            else:
                cluster.nodes.append(_start_node([f"--address={cluster.address}", *common], f"node-{index}", log))
        yield cluster
