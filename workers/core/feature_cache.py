"""Frozen backbone without waste: when nothing about an example changes between epochs (a frozen backbone, no
augmentation, no random crops), the backbone's output for it is the same every epoch. It is computed once, in one
no-grad pass, and every epoch (and every evaluation) trains and scores the head on the kept outputs.

Works on any transformers classifier without knowing its head: while replaying, the backbone's `forward` returns the
batch's kept output, so the model's own head code (pooling, dropout, projector, classifier) runs unchanged. A frozen
backbone runs in eval mode throughout (no dropout, fixed normalisation statistics), which is what makes its output a
function of the example alone; the result equals recomputing it every step, up to float rounding.

The pass wastes nothing either: examples go through in batches of similar length (little padding), and only the
output fields the head reads are kept (BERT's pooled output rather than every token's hidden state; wav2vec2's
hidden states without the convolutional features), found by replaying the first batch without each field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tuneforge.workers.core.prepared_task import Batch

BUDGET_ENV = "TUNEFORGE_FEATURE_CACHE_MB"
DEFAULT_BUDGET_MB = 2048
FEATURE = "backbone_output."
"""Prefix of the batch keys that carry kept backbone output (the rest are the model's own inputs)."""
MASK = "attention_mask"


def budget_bytes() -> int:
    """The most memory the kept outputs of one job may take (worker setting; 0 turns the cache off)."""
    return int(float(os.environ.get(BUDGET_ENV, DEFAULT_BUDGET_MB)) * 2**20)


def varies_per_epoch(dataset: Any) -> bool:
    """Whether a data set can yield different inputs for the same example in another epoch (augmentation, random
    crops). Data sets say so with a `varies_per_epoch` attribute; subsets ask the set they view."""
    inner = getattr(dataset, "dataset", None)
    if inner is not None and not hasattr(dataset, "varies_per_epoch"):
        return varies_per_epoch(inner)
    return bool(getattr(dataset, "varies_per_epoch", False))


class FrozenBackboneModel(nn.Module):
    """The model with its frozen backbone held in eval mode, replaying kept outputs when a batch carries them."""

    def __init__(self, model: nn.Module, backbone: nn.Module):
        super().__init__()
        self.model, self.backbone = model, backbone
        self.output_type: Callable[..., Any] = dict
        self.main_input = str(getattr(model, "main_input_name", "input_ids"))
        self.unread: dict[str, int] = {}
        """Output fields the head does not read, not kept: replayed as empty placeholders (a tuple field as that
        many empty tensors), so positional access to the other fields still finds them."""

    def train(self, mode: bool = True) -> FrozenBackboneModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, **batch: torch.Tensor) -> Any:
        kept = {key[len(FEATURE) :]: batch.pop(key) for key in list(batch) if key.startswith(FEATURE)}
        if not kept:
            return self.model(**batch)
        device = next(iter(kept.values())).device
        for name, parts in self.unread.items():
            placeholder = torch.empty(0, device=device)
            kept.update({f"{name}.{i}": placeholder for i in range(parts)} if parts else {name: placeholder})
        with self._replaying(_rebuild(self.output_type, kept)):
            return self.model(**{self.main_input: None, **batch})

    def fields_the_head_skips(self, inputs: Batch, fields: dict[str, torch.Tensor]) -> dict[str, int]:
        """The output fields (tuples by their name, with their number of parts) the head's result does not depend
        on, for one batch in eval mode: replaying without a field (an empty placeholder) either fails or changes
        the logits when it is read."""
        reference = self._head(inputs, fields, {})
        skipped = {}
        for name in sorted({key.partition(".")[0] for key in fields}):
            parts = sum(1 for key in fields if key.startswith(name + "."))
            try:
                same = torch.equal(self._head(inputs, fields, {name: parts}), reference)
            except (RuntimeError, IndexError, ValueError, TypeError, AttributeError):
                same = False
            if same:
                skipped[name] = parts
        return skipped

    def _head(self, inputs: Batch, fields: dict[str, torch.Tensor], unread: dict[str, int]) -> torch.Tensor:
        before, self.unread = self.unread, unread
        try:
            kept = {FEATURE + key: value for key, value in fields.items() if key.partition(".")[0] not in unread}
            logits: torch.Tensor = self(**inputs, **kept).logits
            return logits
        finally:
            self.unread = before

    @contextmanager
    def _replaying(self, output: Any) -> Iterator[None]:
        self.backbone.forward = lambda *args, **kwargs: output
        try:
            yield
        finally:
            del self.backbone.forward


@dataclass
class KeptFeatures(Dataset[dict[str, torch.Tensor]]):
    """One dict per example: the backbone's output fields, the model's other inputs and the label."""

    items: list[dict[str, torch.Tensor]]
    nbytes: int
    fields: list[str] = field(default_factory=list)
    """The backbone output fields kept (the ones the head reads)."""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def collate_kept(items: list[dict[str, torch.Tensor]]) -> Batch:
    """Stacks each field; sequences of different lengths are zero-padded at the end (masks mark them)."""
    batch: Batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        longest = max(value.shape[0] for value in values) if values[0].dim() else 0
        if values[0].dim() and any(value.shape[0] != longest for value in values):
            values = [_pad_to(value, longest) for value in values]
        batch[key] = torch.stack(values)
    return batch


def _pad_to(value: torch.Tensor, length: int) -> torch.Tensor:
    padding = value.new_zeros((length - value.shape[0], *value.shape[1:]))
    return torch.cat([value, padding])


def _rebuild(output_type: Callable[..., Any], kept: dict[str, torch.Tensor]) -> Any:
    """The backbone's output object from kept fields (`hidden_states.3` goes back into a tuple)."""
    fields: dict[str, Any] = {}
    tuples: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in kept.items():
        name, _, index = key.partition(".")
        if index:
            tuples.setdefault(name, {})[int(index)] = value
        else:
            fields[name] = value
    for name, parts in tuples.items():
        fields[name] = tuple(parts[i] for i in sorted(parts))
    return output_type(**fields)


def _output_fields(output: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a backbone output (a ModelOutput or a tuple), tuples flattened to `name.index`."""
    pairs = output.items() if hasattr(output, "items") else ((str(i), v) for i, v in enumerate(output))
    fields: dict[str, torch.Tensor] = {}
    for name, value in pairs:
        if isinstance(value, torch.Tensor):
            fields[name] = value
        elif isinstance(value, tuple) and all(isinstance(part, torch.Tensor) for part in value):
            fields.update({f"{name}.{i}": part for i, part in enumerate(value)})
    return fields


def _per_example(batch: Batch, fields: dict[str, torch.Tensor], labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Splits a batch into examples; sequences as long as the attention mask are cut to the example's own length,
    so kept text is not stored with another batch's padding (an output field only when it has a sequence axis
    before its features: a pooled vector as long as the batch's sequences is no sequence)."""
    mask = batch.get(MASK)
    items = []
    for i in range(labels.shape[0]):
        length = int(mask[i].sum()) if mask is not None else -1
        item = {"labels": labels[i].clone()}
        rows = [(key, value[i], 1) for key, value in batch.items()]
        rows += [(FEATURE + name, value[i], 2) for name, value in fields.items()]
        for key, row, sequence_rank in rows:
            if mask is not None and row.dim() >= sequence_rank and row.shape[0] == mask.shape[1]:
                row = row[:length]
            item[key] = row.detach().to("cpu", copy=True)
        items.append(item)
    return items


def length_sorted_batches(dataset: Sequence[Any], main_input: str, batch_size: int) -> list[list[int]]:
    """Batches of indices, longest examples first, when the examples' lengths are at hand (in-memory token lists);
    in file order otherwise (media of one size)."""
    indices = list(range(len(dataset)))
    if isinstance(dataset, list) and dataset and isinstance(dataset[0], dict) and main_input in dataset[0]:
        indices.sort(key=lambda i: -len(dataset[i][main_input]))
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def keep_features(
    model: FrozenBackboneModel,
    dataset: Sequence[Any],
    collate: Callable[[list[Any]], Batch],
    to_device: Callable[[Batch], Batch],
    batch_size: int,
    budget: int,
) -> KeptFeatures | None:
    """One no-grad pass over `dataset` through the whole model (batches of similar length), keeping what the
    head reads of the backbone's output for each example. None when that would not fit in `budget` bytes (the
    caller then recomputes it every step)."""
    captured: list[Any] = []
    hook = model.backbone.register_forward_hook(lambda _module, _args, output: captured.append(output))
    items: list[dict[str, torch.Tensor] | None] = [None] * len(dataset)
    used = 0
    unread: dict[str, int] | None = None
    read: list[str] = []
    model.eval()
    try:
        with torch.no_grad():
            batches = length_sorted_batches(dataset, model.main_input, batch_size)
            # its own generator: a loader without one draws from the global generator the head's dropout uses
            loader: DataLoader[Any] = DataLoader(
                dataset,  # type: ignore[arg-type]
                batch_sampler=batches,
                collate_fn=collate,
                generator=torch.Generator(),
            )
            for indices, batch in zip(batches, loader, strict=True):
                labels = batch.pop("labels")
                inputs = {k: v for k, v in batch.items() if k != model.main_input}
                model(**to_device(batch))
                output = captured.pop()
                model.output_type = type(output) if hasattr(output, "items") else tuple_output
                fields = _output_fields(output)
                if unread is None:
                    unread = model.fields_the_head_skips(to_device(dict(inputs)), fields)
                    read = sorted({key.partition(".")[0] for key in fields} - set(unread))
                    captured.clear()  # the replays went through the hook too
                fields = {key: value for key, value in fields.items() if key.partition(".")[0] not in unread}
                examples = _per_example(inputs, fields, labels)
                used += sum(t.element_size() * t.nelement() for item in examples for t in item.values())
                if used > budget:
                    return None
                for index, example in zip(indices, examples, strict=True):
                    items[index] = example
    finally:
        hook.remove()
        model.train()
    if unread is not None:  # an empty data set learns nothing about the head (and must not undo what one did)
        model.unread = unread
    return KeptFeatures([item for item in items if item is not None], used, read)


def tuple_output(**fields: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rebuilds a backbone output that was a plain tuple (fields named by position)."""
    return tuple(fields[str(i)] for i in range(len(fields)))
