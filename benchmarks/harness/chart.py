"""The PNG chart: one panel per table row, one bar per system, machinery highlighted."""

from __future__ import annotations

import math
from pathlib import Path

from harness.plan import REFERENCE
from harness.report import Cell


def draw(header: list[str], rows: list[tuple[str, str, list[Cell], str]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(sec, label, cells) for sec, label, cells, _ in rows if any(c.value is not None for c in cells)]
    if not panels:
        return
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (sec, label, cells) in zip(axes.flat, panels, strict=False):
        names = [h for h, c in zip(header, cells, strict=True) if c.value is not None]
        values = [c.value for c in cells if c.value is not None]
        colors = ["#d62728" if n == REFERENCE else "#1f77b4" for n in names]
        ypos = range(len(names))
        ax.barh(list(ypos), values, color=colors)
        ax.set_yticks(list(ypos), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{sec}: {label}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        for y, (v, c) in enumerate(zip(values, [c for c in cells if c.value is not None], strict=True)):
            text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
            ax.text(v, y, f" {text}{'*' if c.partial else ''}", va="center", fontsize=7)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
