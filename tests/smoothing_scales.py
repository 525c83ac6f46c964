"""Random smoothing vectors for every foldable pair of a model: the input of the exactness tests."""

import torch

from dgqtool.models.adapters import can_fold, decoder_layers
from dgqtool.stages.graph import input_key


def random_smoothing_scales(model, adapter, seed: int = 1) -> dict[str, torch.Tensor]:
    """k in [1, 10) for each activation whose producer can absorb 1 / k (as the smooth stage names them)."""
    gen = torch.Generator().manual_seed(seed)
    scales = {}
    for i, layer in enumerate(decoder_layers(model, adapter)):
        for group in adapter.inputs:
            if can_fold(layer, group):
                width = layer.get_submodule(group.linears[0]).in_features
                scales[f"{input_key(i, group)}.smooth"] = 1 + 9 * torch.rand(width, generator=gen)
    return scales
