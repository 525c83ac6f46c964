#!/usr/bin/env python3
"""Quantize one model with several recipes and score each on perplexity (GPTQ protocol) and
zero-shot tasks.

    python scripts/reproduce_table.py smollm2-135m --group 64 --out results/smollm2

Every row runs `dgq quantize` then `dgq eval` as subprocesses, exactly as a user would; the FP
row evaluates the original model. Writes RESULTS.json and RESULTS.md in --out (ppl, or acc_norm
where lm-eval reports it and acc otherwise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dgqtool.eval.runner import headline

FP_ROW = "FP (original)"
# name -> extra `dgq quantize` flags
ROWS: dict[str, list[str]] = {
    "W4A8 RTN (g, fp16 scales, no smoothing)": ["--method", "rtn", "--smooth", "none"],
    "W4A8 SmoothQuant + RTN": ["--method", "rtn", "--smooth", "smoothquant"],
    "RTN dual-grained (Table 1 RTN)": ["--method", "rtn-dg", "--smooth", "none"],
    "group-wise W4A8, fp16 scales (upper bound)": ["--method", "groupwise"],
    "DGQ dynamic": ["--method", "dgq"],
    "DGQ static": ["--method", "dgq", "--act", "static"],
    "DGQ, no smoothing": ["--method", "dgq", "--smooth", "none"],
    "DGQ, objective X (authors' code)": ["--method", "dgq", "--objective", "x"],
    "DGQ + phase-3 refinement (ours)": ["--method", "dgq", "--refine"],
    "DGQ static + phase-3 refinement": ["--method", "dgq", "--act", "static", "--refine"],
    "DGQ, 32 calibration samples": ["--method", "dgq", "--nsamples", "32"],
    "DGQ + GPTQ codes (ours)": ["--method", "dgq", "--gptq"],
    "DGQ static + GPTQ codes": ["--method", "dgq", "--act", "static", "--gptq"],
    "group-wise, fp16 scales + GPTQ codes": ["--method", "groupwise", "--gptq"],
    "DGQ, no smoothing + GPTQ codes": ["--method", "dgq", "--smooth", "none", "--gptq"],
    "DGQ, smoothing capped (column growth 1)": ["--method", "dgq", "--max-column-growth", "1"],
    "DGQ, smoothing capped + GPTQ codes": ["--method", "dgq", "--max-column-growth", "1", "--gptq"],
    "group-wise, smoothing capped": ["--method", "groupwise", "--max-column-growth", "1"],
    "DGQ static, smoothing capped + GPTQ codes": ["--method", "dgq", "--act", "static", "--max-column-growth", "1", "--gptq"],
}


def dgq(*args: str) -> None:
    cmd = [sys.executable, "-m", "dgqtool.cli", *args]
    print("+ dgq", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def evaluate(target: str, out: Path, name: str, common: list[str]) -> dict:
    result = out / f"{name}.eval.json"
    dgq("eval", target, "--output", str(result), *common)
    return json.loads(result.read_text())["tasks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--group", default="128")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--rows", nargs="*", help="subset of row names (substring match)")
    parser.add_argument("--tasks", nargs="*", default=["wikitext2"])
    parser.add_argument("--limit", help="windows / items per task (default: all)")
    parser.add_argument("--batch-size", default="1", help="windows / lm-eval requests per forward")
    parser.add_argument("--quantize-args", default="", help="extra flags for every `dgq quantize`")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [f for t in args.tasks for f in ("--task", t)] + (["--limit", args.limit] if args.limit else [])
    common += ["--batch-size", args.batch_size]
    selected = lambda name: not args.rows or any(r in name for r in args.rows)
    table = {FP_ROW: evaluate(args.model, args.out, "fp", common)} if selected(FP_ROW) else {}
    timings: dict[str, float] = {}
    for index, (name, flags) in enumerate(ROWS.items()):
        if not selected(name):
            continue
        ckpt = args.out / f"row{index}"
        start = time.time()
        dgq("quantize", args.model, "-o", str(ckpt), "--group", args.group, "--force", "--no-verify",
            *flags, *args.quantize_args.split())
        timings[name] = time.time() - start
        table[name] = evaluate(str(ckpt), args.out, f"row{index}", common)
        write_results(args.out, args.tasks, table, timings)  # after every row: partial runs keep their numbers


def _cell(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric == "ppl" else f"{value:.3f}"


def write_results(out: Path, tasks: list[str], table: dict, timings: dict) -> None:
    (out / "RESULTS.json").write_text(json.dumps({"ppl": table, "quantize_seconds": timings}, indent=2))
    lines = ["| method | " + " | ".join(tasks) + " | quantize s |", "|---" * (len(tasks) + 2) + "|"]
    for name, scores in table.items():
        cells = " | ".join(_cell(*headline(scores[t])) for t in tasks)
        lines.append(f"| {name} | {cells} | {timings.get(name, 0):.0f} |")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

if __name__ == "__main__":
    main()
