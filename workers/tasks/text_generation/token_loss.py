"""The loss of a causal language model without its full logits: the decoder's hidden states at the positions that are
scored, projected onto the vocabulary a chunk at a time, each chunk's logits recomputed in the backward pass instead of
kept. Peak memory for the loss is one chunk x vocabulary in fp32, not batch x sequence x vocabulary, and prompts and
padding are never projected at all."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from tuneforge.workers.core.prepared_task import Batch

IGNORED = -100
"""The label of a token the loss skips (transformers' convention)."""
CHUNK_ELEMENTS = 2**25
"""Logits one chunk holds (128 MiB in fp32): a chunk is this many divided by the vocabulary, in tokens."""
RESHAPED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
"""Config fields of models whose logits are more than the head's projection (Gemma 2's soft cap, Cohere's scale):
they keep transformers' own loss."""


@dataclass(frozen=True)
class ScoredTokens:
    """The negative log-likelihood of every scored token, and the row of the batch it belongs to."""

    losses: torch.Tensor
    rows: torch.Tensor


def projects_in_chunks(model: nn.Module) -> bool:
    """Whether the model's logits are its head's linear projection of its decoder's output, so chunks can compute
    them; any other model is scored through its own forward."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in RESHAPED_LOGITS):
        return False
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return False
    return isinstance(head, nn.Linear) and isinstance(decoder, nn.Module) and decoder is not model


def scored_tokens(model: nn.Module, batch: Batch) -> ScoredTokens:
    """Each label the batch scores (labels shifted one left, as transformers does) with its negative log-likelihood."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    scored = targets != IGNORED
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[scored]
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    if not projects_in_chunks(model):
        logits = model(**inputs).logits[:, :-1][scored]
        return ScoredTokens(functional.cross_entropy(logits.float(), targets[scored], reduction="none"), rows)
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state  # type: ignore[operator]
    head: nn.Linear = model.get_output_embeddings()  # type: ignore[operator]
    chosen = hidden[:, :-1][scored]
    wanted = targets[scored]
    chunk = max(16, CHUNK_ELEMENTS // head.out_features)
    pieces = [
        _chunk_losses(head, chosen[start : start + chunk], wanted[start : start + chunk])
        if not torch.is_grad_enabled()
        else checkpoint(
            _chunk_losses, head, chosen[start : start + chunk], wanted[start : start + chunk], use_reentrant=False
        )
        for start in range(0, len(wanted), chunk)
    ]
    losses = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return ScoredTokens(losses, rows)


def _chunk_losses(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The mean loss over the batch's scored tokens, equal to transformers' `model(**batch).loss`."""
    losses = scored_tokens(model, batch).losses
    return losses.sum() / max(1, losses.numel())
