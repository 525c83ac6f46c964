#!/usr/bin/env python3
"""Where DGQ loses to its own upper bound: compare the search artifacts of a `--method groupwise`
run and a `--method dgq` run made with the same calibration and smoothing.

    python scripts/explain_gap.py out/gw.work out/dgq.work [--out gap.json]

Both runs share phase 1 (the searched fp16 group scale S' per group); DGQ then stores it as
s1 · S2 with an integer S2 ≥ 1 and clamps the codes so that S2 · (code − zp) fits in int8. Per
linear this prints the relative output error of both (from the search manifests), how far s1 · S2
lands from S', how small the S2 integers are, and how many groups and weights lose code range to the clamp.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from dgqtool.format import linear_weight
from dgqtool.quant.dual_grained import CODE_MAX, code_interval


def search_errors(work: Path) -> dict[tuple[int, str], float]:
    manifest = json.loads((work / "search" / "manifest.json").read_text())
    return {(row["layer"], row["linear"]): row["searched"] for row in manifest["errors"]}


def split_statistics(codes: torch.Tensor, s2: torch.Tensor, s1: torch.Tensor, zero: torch.Tensor,
                     group_scale: torch.Tensor) -> dict:
    """Facts of DGQ's split of the fp16 group scales: codes (o, n_groups, g), s1 (o,), the rest (o, n_groups)."""
    s2 = s2.float()
    mismatch = (s2 * s1.float().unsqueeze(-1) / group_scale.float() - 1).abs()
    lo, hi = code_interval(zero.to(torch.int32), s2)
    lo, hi = lo.unsqueeze(-1), hi.unsqueeze(-1)
    at_narrowed_bound = ((codes == lo) & (lo > 0)) | ((codes == hi) & (hi < CODE_MAX))
    return {
        "scale_mismatch_mean": float(mismatch.mean()),
        "s2_median": float(s2.median()),
        "groups_s2_le_4": float((s2 <= 4).float().mean()),
        "groups_clamped": float(((lo > 0) | (hi < CODE_MAX)).float().mean()),
        "weights_at_clamp": float(at_narrowed_bound.float().mean()),
    }


def compare(groupwise: Path, dgq: Path) -> list[dict]:
    gw_errors, dgq_errors = search_errors(groupwise), search_errors(dgq)
    rows = []
    for layer_file in sorted((dgq / "search").glob("layer_*.safetensors")):
        d, g = load_file(layer_file), load_file(groupwise / "search" / layer_file.name)
        layer = int(layer_file.stem.split("_")[1])
        for name in sorted(k[: -len(".scales_s2")] for k in d if k.endswith(".scales_s2")):
            w, reference = linear_weight(name, d), linear_weight(name, g)
            codes = w.codes.reshape(*w.s2.shape, -1).to(torch.int32)
            stats = split_statistics(codes, w.s2, w.s1, w.zero, reference.scale)
            rows.append({"layer": layer, "linear": name, "error_groupwise": gw_errors[(layer, name)],
                         "error_dgq": dgq_errors[(layer, name)], **stats})
    return rows


def by_linear(rows: list[dict]) -> dict[str, dict]:
    """Means over layers per projection (q_proj, ..., down_proj)."""
    buckets: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        buckets[row["linear"].rsplit(".", 1)[-1]].append(row)
    keys = [k for k in rows[0] if k not in ("layer", "linear")]
    return {name: {k: sum(r[k] for r in group) / len(group) for k in keys} for name, group in buckets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groupwise_work", type=Path)
    parser.add_argument("dgq_work", type=Path)
    parser.add_argument("--out", type=Path, help="write every row and the summary as JSON")
    args = parser.parse_args()
    rows = compare(args.groupwise_work, args.dgq_work)
    summary = by_linear(rows)
    print("| linear | output error group-wise | DGQ | ratio | |s1·S2/S' − 1| | median S2 | groups S2 ≤ 4 "
          "| groups with a narrowed code range | weights at a narrowed bound |")
    print("|---" * 9 + "|")
    for name, s in summary.items():
        print(f"| {name} | {s['error_groupwise']:.2e} | {s['error_dgq']:.2e} | {s['error_dgq'] / s['error_groupwise']:.2f} "
              f"| {s['scale_mismatch_mean']:.1%} | {s['s2_median']:.0f} | {s['groups_s2_le_4']:.0%} | {s['groups_clamped']:.0%} "
              f"| {s['weights_at_clamp']:.1%} |")
    ratios = torch.tensor([r["error_dgq"] / r["error_groupwise"] for r in rows])
    correlation = {key: float(torch.corrcoef(torch.stack([ratios, torch.tensor([r[key] for r in rows])]))[0, 1])
                   for key in ("scale_mismatch_mean", "weights_at_clamp")}
    print(f"{len(rows)} linears: DGQ/group-wise output error {ratios.mean():.2f}x on average (max {ratios.max():.2f}x); "
          f"correlation across linears with the scale mismatch {correlation['scale_mismatch_mean']:.2f}, "
          f"with the clamped weights {correlation['weights_at_clamp']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "by_linear": summary, "correlation": correlation}, indent=2))


if __name__ == "__main__":
    main()
