"""Figures drawn on ``matplotlib.figure.Figure`` objects and saved to files: no pyplot state and no global
backend switch, so importing the library leaves matplotlib's backend as the user set it."""

from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["grid", "overlay", "save"]


def grid(rows: int, columns: int, cell: tuple[float, float] = (1.9, 1.9)) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``columns`` axes (always a 2-D array), each ``cell`` inches wide and high."""
    figure = Figure(figsize=(cell[0] * columns, cell[1] * rows))
    return figure, figure.subplots(rows, columns, squeeze=False)


def overlay(ax: Axes, image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5) -> None:
    """An image [H, W, 3] in [0, 1] with a heat map [h, w] in [0, 1] over it (jet colours, stretched to the image
    when smaller); no ticks."""
    image, heatmap = np.asarray(image), np.asarray(heatmap)
    height, width = image.shape[:2]
    ax.imshow(image)
    ax.imshow(heatmap, cmap="jet", alpha=alpha, vmin=0, vmax=1, extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    ax.set_xticks([])
    ax.set_yticks([])


def save(figure: Figure, path: Path, dpi: int = 100) -> Path:
    """Lay the figure out tightly and write it (the format follows the suffix)."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path
