"""Figures drawn on ``matplotlib.figure.Figure`` objects and saved to files: no pyplot state and no global
backend switch, so importing the library leaves matplotlib's backend as the user set it."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["grid", "overlay", "pixels", "save", "show"]


def grid(rows: int, columns: int, cell: tuple[float, float] = (1.9, 1.9)) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``columns`` axes (always a 2-D array), each ``cell`` inches wide and high."""
    figure = Figure(figsize=(cell[0] * columns, cell[1] * rows))
    return figure, figure.subplots(rows, columns, squeeze=False)


def pixels(images: torch.Tensor, config: dict) -> torch.Tensor:
    """Images [B, C, H, W] normalised with a data config's ``mean`` and ``std``, back in [0, 1] as [B, H, W, C]
    for display."""
    mean, std = (torch.tensor(config[key])[:, None, None] for key in ("mean", "std"))
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def show(ax: Axes, image: torch.Tensor | np.ndarray, boxes: torch.Tensor | Sequence = (), color: str = "lime") -> None:
    """An image [H, W, 3] in [0, 1] with its boxes (XYXY pixels, as ``zoo.data`` gives them) outlined; no ticks."""
    ax.imshow(np.asarray(image))
    for x1, y1, x2, y2 in torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).tolist():
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=color))
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(ax: Axes, image: torch.Tensor | np.ndarray, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5,
            boxes: torch.Tensor | Sequence = ()) -> None:
    """An image [H, W, 3] in [0, 1] with a heat map [h, w] in [0, 1] over it (jet colours, stretched to the image
    when smaller) and its boxes outlined (as ``show``); no ticks."""
    show(ax, image, boxes)
    height, width = np.asarray(image).shape[:2]
    ax.imshow(np.asarray(heatmap), cmap="jet", alpha=alpha, vmin=0, vmax=1,
              extent=(-0.5, width - 0.5, height - 0.5, -0.5))


def save(figure: Figure, path: Path, dpi: int = 100, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    """Lay the figure out tightly within ``rect`` (left, bottom, right, top, in fractions of the figure) and write
    it (the format follows the suffix)."""
    figure.tight_layout(rect=rect)
    figure.savefig(path, dpi=dpi)
    return path
