"""Calibration text -> token segments (GPTQ-style random windows)."""

from __future__ import annotations

import random

import torch

from ..data import load_corpus
from ..errors import DGQError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence (1-D long tensor), tokenized once as in the eval protocol."""
    return torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)


def sample_segments(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at random starts (Python `random`, seeded): (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 1:
        raise DGQError("--nsamples and --seqlen must be positive")
    if ids.numel() <= seqlen:
        raise DGQError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; "
            "pass more text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def calibration_tokens(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int, data_dir: str | None) -> torch.Tensor:
    return sample_segments(tokenize(tokenizer, load_corpus(spec, "train", data_dir)), nsamples, seqlen, seed)
