"""Writing evaluation results: RULER's length-by-task table (text and markdown), its JSON and a heatmap PNG.

Every file is written atomically (temp file, fsync, rename), so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import json
import os

from ..utils import atomic_write, atomic_write_text


def _short(task: str) -> str:
    return task.replace("niah_", "").replace("multikey", "mk").replace("multivalue", "mv").replace("multiquery", "mq")


def ruler_table(report: dict, markdown: bool = False) -> str:
    """Rows: lengths; columns: tasks and their average; cells: scores 0-100."""
    tasks, lengths = report["tasks"], report["lengths"]
    header = ["length", *tasks, "average"]
    rows = [[str(n), *(f"{report['scores'][t][n]:.1f}" for t in tasks), f"{report['average'][n]:.1f}"] for n in lengths]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *rows])


def ruler_heatmap(report: dict, path: str) -> None:
    """Scores as a lengths x tasks grid of colours (red 0 .. green 100), each cell labelled with its score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, lengths = report["tasks"], report["lengths"]
    grid = [[report["scores"][t][n] for t in tasks] + [report["average"][n]] for n in lengths]
    columns = [_short(t) for t in tasks] + ["average"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 1.4 + 0.5 * len(lengths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.axvline(len(tasks) - 0.5, color="black", lw=1.5)
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("task")
    ax.set_ylabel("length (tokens)")
    ax.set_title(f"RULER: {os.path.basename(report['checkpoint'])} (samples per cell: {report['samples']})")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _length_label(n: int) -> str:
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def write_ruler_report(report: dict, out_dir: str) -> dict[str, str]:
    """ruler.json, ruler.md and ruler.png in out_dir; returns their paths."""
    files = {k: os.path.join(out_dir, f"ruler.{k}") for k in ("json", "md", "png")}
    atomic_write_text(files["json"], json.dumps(report, indent=1) + "\n")
    md = [
        f"# RULER: {report['checkpoint']}",
        "",
        f"{report['samples']} samples per task and length, seed {report['seed']}, greedy decoding; scores 0-100 "
        "(string_match_all; string_match_part for qa). qa_1 and qa_2 are synthetic stand-ins for SQuAD and "
        "HotpotQA.",
        "",
        ruler_table(report, markdown=True),
        "",
        "![RULER heatmap](ruler.png)",
        "",
    ]
    atomic_write_text(files["md"], "\n".join(md))
    ruler_heatmap(report, files["png"])
    return files
