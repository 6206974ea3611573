"""Data-parallel training over several ranks with torch.distributed (NCCL on CUDA, gloo on the CPU).

Every rank builds the same model from the same seed and walks the same global micro-batches; each takes its own
contiguous share of every micro-batch and weighs its rows as one rank would weigh them in the whole micro-batch.
After a step's micro-batches, one all-reduce sums the ranks' gradients, rows and loss, so every rank takes the same
optimizer step as one rank with the whole batch would. The plan (micro-batch,
accumulation, steps) does not depend on the number of ranks, so a checkpoint resumes on any number of them.

Gradients are reduced by hand rather than through DistributedDataParallel: gradual unfreezing changes which
parameters train between epochs (DDP fixes them when it wraps the model), a rank may have no rows in an epoch's last
micro-batch, and one flat all-reduce per step carries the loss and row count along with the gradients.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among a job's data-parallel ranks."""

    rank: int = 0
    world_size: int = 1
    address: str = "127.0.0.1"
    port: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 reports, evaluates and writes checkpoints and the artifact."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on host, for the ranks' rendezvous (only this job's ranks connect to it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def join(ranks: Ranks, device: torch.device) -> None:
    """Joins the job's process group (blocks until every rank has joined or the timeout passes)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://{ranks.address}:{ranks.port}",
        rank=ranks.rank,
        world_size=ranks.world_size,
        timeout=TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r trains on the r-th of the worker's GPUs, counted from its own (or on the CPU)."""
    return torch.device("cuda", (device.index or 0) + rank) if device.type == "cuda" else device


def share_of(count: int, ranks: Ranks) -> range:
    """This rank's contiguous share of `count` rows (shares differ by at most one row; some may be empty)."""
    base, extra = divmod(count, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return range(start, start + base + (1 if ranks.rank < extra else 0))


class ShardedBatches:
    """A batch sampler's global micro-batches, cut down to this rank's share of each. A rank whose share is empty
    gets the batch's first row with weight zero, so every rank runs the same number of forward passes."""

    def __init__(self, batches: Any, ranks: Ranks):
        self._batches = batches
        self._ranks = ranks

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Any:
        for batch in self._batches:
            indices = list(batch)
            share = [indices[i] for i in share_of(len(indices), self._ranks)]
            size = len(indices)
            yield [(index, True, size) for index in share] if share else [(indices[0], False, size)]


class WeightedRows(Dataset[tuple[Any, bool, int]]):
    """Items of a dataset, each with whether it counts and the size of its global micro-batch (see ShardedBatches)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool, int]) -> tuple[Any, bool, int]:
        index, counts, size = key
        return self.dataset[index], counts, size


def counting_collate(collate: Callable[[list[Any]], Any]) -> Callable[[list[tuple[Any, bool, int]]], Any]:
    """Collates a share; puts its count of real rows under `rows` (zero for the stand-in row) and the global
    micro-batch's under `batch_rows`."""

    def collated(items: list[tuple[Any, bool, int]]) -> Any:
        batch = collate([item for item, _, _ in items])
        batch["rows"] = torch.tensor(sum(counts for _, counts, _ in items))
        batch["batch_rows"] = torch.tensor(items[0][2])
        return batch

    return collated


def share_weight(batch: dict[str, torch.Tensor], micro_batches: int) -> tuple[int, float]:
    """Pops a share's row counts; returns its real rows and the factor that turns the mean loss over the share into
    its part of the step's loss as one rank computes it (the mean over each micro-batch, over the micro-batches)."""
    rows, batch_rows = int(batch.pop("rows")), int(batch.pop("batch_rows"))
    return rows, rows / (batch_rows * micro_batches)


def all_reduce_step(parameters: Sequence[torch.nn.Parameter], rows: int, loss: torch.Tensor) -> tuple[int, float]:
    """Sums every rank's gradients, rows and weighted loss in one all-reduce: each rank then holds the gradient of
    the step's loss over all its rows. Returns the step's rows and loss."""
    device = loss.device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    tail = torch.stack([loss.detach().float(), torch.tensor(float(rows), device=device)])
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), tail])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        size = grad.numel()
        parameter.grad = flat[offset : offset + size].view_as(grad).to(grad.dtype)
        offset += size
    return int(flat[-1].item()), float(flat[-2].item())


def agree(flags: Sequence[bool]) -> list[bool]:
    """Rank 0's flags, on every rank (stop, pause, deadline decisions are rank 0's)."""
    values = torch.tensor([int(flag) for flag in flags], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.broadcast(values, src=0)
    return [bool(v) for v in values.tolist()]


def share_object(value: Any) -> Any:
    """Rank 0's value (evaluation metrics), on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
