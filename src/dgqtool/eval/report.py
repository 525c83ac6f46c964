"""Several evaluation results side by side: a markdown table and a bar chart (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from ..artifacts import atomic_path


def _tasks(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(task for run in runs for task in run["tasks"]))


def comparison_markdown(runs: list[dict]) -> str:
    """One row per model, one column per task (ppl, or zero-shot accuracy), and the change against the first."""
    from .runner import headline

    tasks = _tasks(runs)
    base = runs[0]["tasks"]
    lines = ["| model | kind | " + " | ".join(f"{t} {headline(_first(runs, t))[0]} | Δ vs first" for t in tasks) + " |",
             "|---|---|" + "---|---|" * len(tasks)]
    for run in runs:
        cells = []
        for task in tasks:
            score = run["tasks"].get(task)
            if score is None:
                cells += ["–", "–"]
                continue
            value = headline(score)[1]
            delta = value - headline(base[task])[1] if task in base and run is not runs[0] else None
            cells += [f"{value:.3f}", "–" if delta is None else f"{delta:+.3f}"]
        lines.append(f"| {run['model']} | {run['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _first(runs: list[dict], task: str) -> dict:
    return next(run["tasks"][task] for run in runs if task in run["tasks"])


def comparison_plot(runs: list[dict], path: Path) -> bool:
    """Grouped bars of each task's headline number; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from .runner import headline

    tasks = _tasks(runs)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(4, 2 + 1.5 * len(tasks)), 3.5))
    for i, run in enumerate(runs):
        values = [headline(run["tasks"][t])[1] if t in run["tasks"] else 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=Path(run["model"]).name)
    ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("perplexity (lower is better) / accuracy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True
