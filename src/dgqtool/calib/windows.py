"""Calibration windows: token segments of the calibration text at GPTQ-style random starts."""

from __future__ import annotations

import random

import torch

from ..corpora import load_corpus, tokenize
from ..errors import DGQError


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
