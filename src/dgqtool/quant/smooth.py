"""Smoothing scales (Sec. 3.4): percentile clipping (Eq. 7) and SmoothQuant, and how they fold.

A smoothing vector k divides the input channels of a linear (X / k) and multiplies the matching
weight columns (W * k), so the float output is unchanged; 1 / k is folded into whatever produced X
(a norm's weight and bias, or the output rows of a previous linear). fold_group does both for one
input group of the adapter table.
"""

from __future__ import annotations

import math

import torch


def percentile_scales(act_absmax: torch.Tensor, percentile: float = 0.5) -> torch.Tensor:
    """Eq. 7: k_j = max(1, z_j / P) with P the floor(p/100 * C + 1.5)-th largest channel max.

    act_absmax: (C,) max over calibration tokens of |X[:, j]|. Channels below the percentile keep
    k = 1; only the outlier channels are shrunk to the threshold.
    """
    channels = act_absmax.numel()
    rank = min(channels, max(1, math.floor(percentile / 100 * channels + 1.5)))
    threshold = torch.topk(act_absmax.float(), rank).values[-1].clamp(min=1e-8)
    return torch.clamp(act_absmax.float() / threshold, min=1.0)


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant: k_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the baseline option."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def cap_column_growth(k: torch.Tensor, weight_absmax: torch.Tensor, growth: float) -> torch.Tensor:
    """Limit k so that no weight column grows past `growth` times the largest column max before
    smoothing. DGQ's per-row int8 second level must reach the row's maximum; a column blown up by
    a large k_j sets that maximum in every row and coarsens all the row's other groups."""
    limit = growth * weight_absmax.float().max() / weight_absmax.float().clamp(min=1e-8)
    return torch.minimum(k, limit.clamp(min=1.0))


@torch.no_grad()
def fold_into_producer(weight: torch.Tensor, bias: torch.Tensor | None, k: torch.Tensor) -> None:
    """Divide what produces X by k: a norm's weight (C,) or a linear's output rows (C, h_in)."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight.div_(k.to(weight.dtype).reshape(shape))
    if bias is not None:
        bias.div_(k.to(bias.dtype))


@torch.no_grad()
def fold_into_consumer(weight: torch.Tensor, k: torch.Tensor) -> None:
    """Multiply a linear's input columns (o, C) by k."""
    weight.mul_(k.to(weight.dtype).unsqueeze(0))


@torch.no_grad()
def fold_group(layer: torch.nn.Module, adapter, group, k: torch.Tensor) -> None:
    """Fold one smoothing vector into a decoder layer as the adapter table describes it: the
    producer's rows (its last 1 / producer_parts of them) divided by k -- for a norm computing
    x_hat * (offset + w), w becomes (offset + w) / k - offset -- and the columns of every consumer,
    the quantized linears and the float ones (routers), multiplied by k."""
    producer = layer.get_submodule(group.producer)
    rows = producer.weight.shape[0] // group.producer_parts
    start = producer.weight.shape[0] - rows
    weight = producer.weight.data[start:]
    bias = getattr(producer, "bias", None)
    bias = bias.data[start:] if bias is not None else None
    offset = adapter.norm_offset if producer.weight.dim() == 1 else 0.0
    if offset:  # in fp32 and rounded once, with the k the consumers get (rounded to their dtype)
        k_used = k.to(weight.dtype).float()
        weight.copy_((weight.float() + offset) / k_used - offset)
        if bias is not None:
            bias.div_(k.to(bias.dtype))
    else:
        fold_into_producer(weight, bias, k)
    for name in group.linears + group.float_consumers:
        fold_into_consumer(layer.get_submodule(name).weight.data, k)
