"""Perplexity under the GPTQ protocol (docs/method.md, Evaluation protocol): the test text tokenized once, cut into
non-overlapping windows of seqlen tokens (the remainder dropped), ppl = exp(mean window NLL)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DGQError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int
    seqlen: int


def windows_of(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """(n_windows, seqlen) non-overlapping windows of a 1-D id sequence."""
    count = ids.numel() // seqlen
    if count == 0:
        raise DGQError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        count = min(count, limit)
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, device: str = "cpu", on_batch=None) -> Perplexity:
    """Mean over windows of the mean next-token NLL inside each window, exponentiated."""
    total = 0.0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").mean(1)
        if not torch.isfinite(nll).all():
            raise DGQError("the model produced non-finite losses")
        total += float(nll.sum())
        if on_batch is not None:
            on_batch(len(batch))
    return Perplexity(math.exp(total / len(windows)), len(windows), windows.shape[1])
