"""Smoothing: the percentile rule of Eq. 7 and exact output preservation on real architectures."""

import torch

from dgqtool.stages.smooth import apply_smoothing
from dgqtool.quant.smooth import cap_column_growth, percentile_scales, smoothquant_scales
from smoothing_scales import random_smoothing_scales


def test_percentile_scales_shrink_only_outliers_to_the_threshold():
    z = torch.ones(1000)
    z[:3] = torch.tensor([50.0, 20.0, 10.0])
    z[3:8] = 2.0
    # 0.5 % of 1000 channels + 1.5 -> the 6th largest maximum is the threshold (2.0)
    k = percentile_scales(z, 0.5)
    assert torch.equal(k[:3], torch.tensor([25.0, 10.0, 5.0]))
    assert (k[3:] == 1).all()
    assert (z / k).max() == 2.0


def test_smoothquant_scales_balance_activation_and_weight():
    act, weight = torch.tensor([16.0, 1.0]), torch.tensor([1.0, 4.0])
    k = smoothquant_scales(act, weight, 0.5)
    torch.testing.assert_close(act / k, weight * k)


def test_column_growth_cap_by_hand():
    k = torch.tensor([1.0, 348.0, 10.0, 3.0])
    weight_absmax = torch.tensor([0.5, 0.1, 0.2, 2.0])  # largest column max: 2.0
    # growth 1: column j may reach 2.0, so k_j <= 2.0 / w_j = 4, 20, 10, 1
    assert torch.equal(cap_column_growth(k, weight_absmax, 1.0), torch.tensor([1.0, 20.0, 10.0, 1.0]))
    assert torch.equal(cap_column_growth(k, weight_absmax, 100.0), k)  # a loose cap changes nothing


def test_smoothing_leaves_the_fp32_output_unchanged(tiny_model):
    model, adapter = tiny_model
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    scales = random_smoothing_scales(model, adapter)
    assert len(scales) >= 6  # norms and the linear -> linear pairs all fold
    apply_smoothing(model, adapter, scales)
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert float((after - before).norm() / before.norm()) < 1e-4
