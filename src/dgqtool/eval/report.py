"""Several evaluation results side by side: a markdown table and a bar chart (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_path


def _tasks(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(task for run in runs for task in run["tasks"]))


def comparison_markdown(runs: list[dict]) -> str:
    """One row per model, one perplexity column per task, and the change against the first model."""
    tasks = _tasks(runs)
    base = runs[0]["tasks"]
    lines = ["| model | kind | " + " | ".join(f"{t} ppl | Δ vs first" for t in tasks) + " |",
             "|---|---|" + "---|---|" * len(tasks)]
    for run in runs:
        cells = []
        for task in tasks:
            score = run["tasks"].get(task)
            if score is None:
                cells += ["–", "–"]
                continue
            delta = score["ppl"] - base[task]["ppl"] if task in base else None
            cells += [f"{score['ppl']:.3f}", "–" if delta is None or run is runs[0] else f"{delta:+.3f}"]
        lines.append(f"| {run['model']} | {run['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_plot(runs: list[dict], path: Path) -> bool:
    """Grouped bars of perplexity per task; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = _tasks(runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(4, 2 + 1.5 * len(tasks)), 3.5))
    for i, run in enumerate(runs):
        values = [run["tasks"].get(t, {}).get("ppl", 0.0) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=Path(run["model"]).name)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("perplexity (lower is better)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True
