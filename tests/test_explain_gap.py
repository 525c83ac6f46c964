"""scripts/explain_gap.py: DGQ's split of the group-wise scales, measured on real search artifacts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dgqtool.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import explain_gap  # noqa: E402


def test_split_statistics_by_hand():
    s2 = torch.tensor([[2, 20]], dtype=torch.int8)
    s1 = torch.tensor([1.0])
    zero = torch.tensor([[8, 8]], dtype=torch.uint8)
    group_scale = torch.tensor([[2.5, 20.0]])
    codes = torch.tensor([[[0, 15], [2, 9]]])  # group 2 may use codes 2..14 only: one of its two sits at 2
    stats = explain_gap.split_statistics(codes, s2, s1, zero, group_scale)
    assert stats["scale_mismatch_mean"] == pytest.approx((0.2 + 0.0) / 2)
    assert stats["s2_median"] == 2  # torch's median of two is the lower one
    assert stats["groups_s2_le_4"] == 0.5
    assert stats["groups_clamped"] == 0.5  # S2 = 20 reaches only 127 // 20 = 6 codes either side of zp = 8
    assert stats["weights_at_clamp"] == 0.25


@pytest.fixture(scope="module")
def work_dirs(tiny_llama, corpus_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("gap")
    for method in ("groupwise", "dgq"):
        result = CliRunner().invoke(app, [str(a) for a in (
            "quantize", tiny_llama, "-o", root / method, "--calib-data", corpus_file, "--nsamples", "4",
            "--seqlen", "64", "--group", "32", "--grid1", "6", "--grid2", "6", "--method", method, "--recipe", "paper", "--no-verify")])
        assert result.exit_code == 0, result.output
    return root / "groupwise.work", root / "dgq.work"


def test_dgq_splits_the_groupwise_scales(work_dirs):
    """The script's premise: both methods share phase 1, so S2 = max(1, round(S' / s1)) with S' the
    group-wise run's fp16 scale."""
    groupwise, dgq = work_dirs
    d, g = (load_file(w / "search" / "layer_000.safetensors") for w in (dgq, groupwise))
    name = "self_attn.q_proj"
    ratio = g[f"{name}.scales"].float() / d[f"{name}.scales_s1"].float().unsqueeze(-1)
    s2 = d[f"{name}.scales_s2"].float()
    assert bool(((s2 - ratio).abs() <= 0.5 + 1e-2).logical_or(s2 == 1).all())


def test_compare_reads_every_linear(work_dirs):
    rows = explain_gap.compare(*work_dirs)
    assert len(rows) == 2 * 7  # two decoder layers, q/k/v/o/gate/up/down
    assert all(r["error_groupwise"] > 0 and r["error_dgq"] > 0 for r in rows)
    assert all(0 <= r["scale_mismatch_mean"] <= 0.5 for r in rows)
    assert set(explain_gap.by_linear(rows)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
